"""Our pair decode against llama.cpp's, on the same weights at the same precision, in one run.

    make bench-peers                       # installs llama-cpp-python into the venv (builds it), then runs this
    python bench/vs_llamacpp.py [--new-tokens 128] [--repeats 5]

llama.cpp is the engine a CPU user would pick instead of ours. The app serves the bundled
SmolLM2-135M-Instruct Q4_1 GGUF dequantized to float32; llama.cpp is given the same file requantized to
F32 by its own `llama_model_quantize` (Q4_1 blocks dequantized exactly, as transformers' GGUF loader
does), so both read the same float32 weights. Both decode the pair the app decodes: two sequences
after one shared prompt, a step computing both rows' logits, with as many threads as torch uses here.
Each repeat times ours and then llama.cpp's, alternating, so the machine's drift hits both alike.

Prints one JSON object:
- vs_llamacpp: our pair decode tokens/s over llama.cpp's F32 pair decode tokens/s (median of the repeats'
  ratios; goal at least 1.0);
- ours_pair_decode_tokens_per_s, llamacpp_pair_decode_tokens_per_s: 2 x --new-tokens tokens decoded (fixed
  input tokens, no sampling: the engine's work alone) over the time of the steps, medians;
- llamacpp_q4_1_pair_decode_tokens_per_s: llama.cpp on the Q4_1 file as it ships (a quarter of the bytes
  read per step: what a llama.cpp user gets, at another precision), and ours_vs_llamacpp_q4_1;
  llamacpp_q4_1_note: null, or why that run went without its extra buffer types (see main);
- prompt_logits_max_abs_diff: the largest difference between our and llama.cpp's logits after the prompt
  (the same weights, both KV caches float32; the rest is each side's own summation order and llama.cpp's
  flash attention: 0.032 on logits of order 10 on 2026-12-01), and argmax_agrees;
- gguf: how the F32 file was made (source file, llama-cpp-python version, size), threads, new_tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
GGML_TYPE_F32 = 0  # ggml's enum ggml_type
FIXED_TOKEN = 100  # every decode step feeds this token id (+ the step): the work, not the words
LLAMA_CPP_VERSION = "0.3.36"  # what `make bench-peers` installs


def parse_args(argv=None) -> argparse.Namespace:
    from playground.serving.models import DEFAULT_CACHE_DIR

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--workdir", default=None, help="where the F32 GGUF is written (default: a temp folder)")
    return p.parse_args(argv)


def _drop_log(level, text, user_data) -> None:
    return None


try:  # the callback type exists only once llama-cpp-python is installed
    from llama_cpp import llama_log_callback as _callback_type

    _QUIET = _callback_type(_drop_log)
except ImportError:
    _QUIET = None


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C bindings: one model, one context for two sequences."""

    def __init__(self, path: Path, threads: int, n_ctx: int, extra_bufts: bool = True):
        import llama_cpp

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        # Extra buffer types repack weights for special kernels (AMX tiles on this CPU, for quantized types).
        mparams.use_extra_bufts = extra_bufts
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx
        cparams.n_seq_max = 2
        # One KV buffer for both sequences: the prompt is decoded once for the two (as our prefill is).
        cparams.kv_unified = True
        # The cache in float32 as ours (llama.cpp's default is float16: half the bytes, other logits).
        cparams.type_k = cparams.type_v = GGML_TYPE_F32
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not make a context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 2)

    def _clear(self) -> None:
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)

    def _decode(self, entries: list[tuple[int, int, tuple[int, ...], bool]]) -> None:
        """One llama_decode of (token, position, sequence ids, wants logits) entries."""
        b = self.batch
        for i, (token, pos, seqs, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = len(seqs)
            for j, s in enumerate(seqs):
                b.seq_id[i][j] = s
            b.logits[i] = logits
        b.n_tokens = len(entries)
        status = self.lib.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def prompt_logits(self, prompt_ids: list[int]) -> list[float]:
        self._clear()
        last = len(prompt_ids) - 1
        self._decode([(t, i, (0,), i == last) for i, t in enumerate(prompt_ids)])
        row = self.lib.llama_get_logits_ith(self.ctx, -1)
        return [row[i] for i in range(self.n_vocab)]

    def pair_decode(self, prompt_ids: list[int], steps: int) -> float:
        """Tokens/s of `steps` steps of two sequences after the shared prompt (the prompt once, in both)."""
        self._clear()
        last = len(prompt_ids) - 1
        self._decode([(t, i, (0, 1), i == last) for i, t in enumerate(prompt_ids)])
        pos = len(prompt_ids)
        self._decode([(FIXED_TOKEN, pos, (0,), True), (FIXED_TOKEN, pos, (1,), True)])  # warm step
        started = time.perf_counter()
        for i in range(1, steps + 1):
            token = FIXED_TOKEN + i
            self._decode([(token, pos + i, (0,), True), (token, pos + i, (1,), True)])
        return 2 * steps / (time.perf_counter() - started)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def requantize_f32(source: Path, target: Path, threads: int) -> None:
    """`source` (any GGUF) rewritten with every tensor in F32 by llama.cpp's own quantizer."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize to F32 returned {status}")


SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18  # x86-64 Linux


def allow_amx() -> None:
    """Ask Linux for the AMX tile state before llama.cpp runs: its AMX kernels (built where the CPU has AMX)
    otherwise die with an illegal instruction on their first tile load. torch asks for it when it starts,
    which is why they ran in a process with torch and not alone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    except (OSError, AttributeError):
        pass  # not x86-64 Linux: nothing to ask for


def peer_main(argv: list[str]) -> int:
    """The llama.cpp side, in a process of its own (no torch there: two OpenMP runtimes and llama.cpp's
    AMX kernels in one process crashed it with an illegal instruction). Reads one JSON request a line from
    standard input, answers one JSON value a line."""
    p = argparse.ArgumentParser()
    p.add_argument("--peer", required=True)
    p.add_argument("--requantize-from", default=None)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--n-ctx", type=int, required=True)
    p.add_argument("--no-extra-bufts", action="store_true")
    args = p.parse_args(argv)
    allow_amx()
    path = Path(args.peer)
    if args.requantize_from and not path.exists():
        requantize_f32(Path(args.requantize_from), path, args.threads)
    peer = LlamaCpp(path, args.threads, args.n_ctx, extra_bufts=not args.no_extra_bufts)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        if request["op"] == "logits":
            answer = peer.prompt_logits(request["ids"])
        else:
            answer = peer.pair_decode(request["ids"], request["steps"])
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    peer.close()
    return 0


class PeerProcess:
    """llama.cpp on one GGUF file in a child process (`peer_main`), asked one request at a time."""

    def __init__(self, path: Path, threads: int, n_ctx: int, requantize_from: Path | None = None,
                 extra_bufts: bool = True):
        command = [sys.executable, str(Path(__file__).resolve()), "--peer", str(path), "--threads", str(threads),
                   "--n-ctx", str(n_ctx)]
        if requantize_from is not None:
            command += ["--requantize-from", str(requantize_from)]
        if not extra_bufts:
            command.append("--no-extra-bufts")
        # llama.cpp's own report goes to a file next to the GGUF: the reason when it stops is there.
        self.log_path = path.with_suffix(".log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log_path.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"llama.cpp's process ended (exit status {self.proc.wait()}); its log ends:\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)
        self.log.close()


def ours_pair_decode(engine, prompt_ids: list[int], steps: int) -> float:
    import torch

    state, _ = engine.prefill(prompt_ids, 2, len(prompt_ids) + steps + 2)
    tokens = torch.full((2,), FIXED_TOKEN, dtype=torch.long)
    engine.decode(state, tokens)  # warm step, as llama.cpp's
    started = time.perf_counter()
    for i in range(1, steps + 1):
        engine.decode(state, tokens + i)
    return 2 * steps / (time.perf_counter() - started)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("error: llama-cpp-python is not installed: `make bench-peers` builds and installs it "
                         f"({LLAMA_CPP_VERSION}) into the venv, then runs this") from None
    import torch

    from playground.serving.generation import engine_for
    from playground.serving.models import BUNDLED, bundled_gguf_path, load_model
    from playground.serving.prompting import render

    threads = torch.get_num_threads()
    lm = load_model(BUNDLED, "cpu", args.cache_dir)
    engine = engine_for(lm.model)
    if engine is None:
        raise SystemExit("error: our engine does not run this model here; nothing to compare")
    prompt_ids = render(lm.tokenizer, PROMPT)
    # One unified KV buffer: the prompt once (both sequences share its cells), then each sequence its own
    # cells for every decoded token (the warm step included).
    n_ctx = len(prompt_ids) + 2 * (args.new_tokens + 2) + 8

    source = bundled_gguf_path()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vs-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "SmolLM2-135M-Instruct.F32.gguf"

    # The same weights: our logits after the prompt against llama.cpp's F32 ones.
    with torch.inference_mode():
        ours_logits = lm.model(torch.tensor([prompt_ids])).logits[0, -1].float()
    peer = PeerProcess(f32, threads, n_ctx, requantize_from=source)
    theirs = torch.tensor(peer.ask(op="logits", ids=prompt_ids))
    diff = float((ours_logits[: theirs.numel()] - theirs).abs().max())
    agrees = int(ours_logits.argmax()) == int(theirs.argmax())

    ours, peer_rates, ratios = [], [], []
    with torch.inference_mode():
        ours_pair_decode(engine, prompt_ids, 4)
        peer.ask(op="pair", ids=prompt_ids, steps=4)
        for _ in range(args.repeats):
            a = ours_pair_decode(engine, prompt_ids, args.new_tokens)
            b = peer.ask(op="pair", ids=prompt_ids, steps=args.new_tokens)
            ours.append(a)
            peer_rates.append(b)
            ratios.append(a / b)
    peer.close()

    # The Q4_1 file as it ships. llama.cpp built with -march=native on a CPU that reports AMX repacks Q4_1
    # for its AMX tile kernels; on a virtual machine that reports AMX but faults on the tile instructions
    # (this one: SIGILL at `tilezero`, though XCR0 and arch_prctl grant the tile state) the process dies,
    # and the run is repeated without extra buffer types (plain AVX-512 kernels), which the JSON says.
    q4_note = None
    q4 = PeerProcess(source, threads, n_ctx)
    try:
        q4.ask(op="pair", ids=prompt_ids, steps=4)
    except RuntimeError as error:
        q4_note = (f"with its default extra buffer types (AMX repacking) llama.cpp died here: "
                   f"{str(error).split(';')[0]}; measured with use_extra_bufts=false")
        q4.close()
        q4 = PeerProcess(source, threads, n_ctx, extra_bufts=False)
        q4.ask(op="pair", ids=prompt_ids, steps=4)
    q4_rates = [q4.ask(op="pair", ids=prompt_ids, steps=args.new_tokens) for _ in range(args.repeats)]
    q4.close()

    result = {
        "vs_llamacpp": round(statistics.median(ratios), 3),
        "ours_pair_decode_tokens_per_s": round(statistics.median(ours), 1),
        "llamacpp_pair_decode_tokens_per_s": round(statistics.median(peer_rates), 1),
        "llamacpp_q4_1_pair_decode_tokens_per_s": round(statistics.median(q4_rates), 1),
        "ours_vs_llamacpp_q4_1": round(statistics.median(ours) / statistics.median(q4_rates), 3),
        "llamacpp_q4_1_note": q4_note,
        "ratios": [round(r, 3) for r in ratios],
        "prompt_logits_max_abs_diff": round(diff, 6),
        "argmax_agrees": agrees,
        "gguf": {"source": source.name, "made_by": f"llama_model_quantize to F32, in llama-cpp-python "
                                                    f"{getattr(llama_cpp, '__version__', '?')} (allow_requantize)",
                 "f32_bytes": f32.stat().st_size, "q4_1_bytes": source.stat().st_size},
        "threads": threads, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt_ids),
        "backend": getattr(engine, "backend", None),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    if "--peer" in sys.argv[1:]:
        sys.exit(peer_main(sys.argv[1:]))
    main()
