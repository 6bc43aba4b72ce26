"""Pair decoding against the memory-bandwidth limit.

    python bench/decode.py [--model bundled] [--new-tokens 128] [--repeats 3]

On a CPU a decode step is bound by reading the weights once, so the limit for a pair is
    read bandwidth / weight bytes x 2 sequences (tokens/s),
with the read bandwidth measured here as torch's `x.sum()` over a 1 GB float32 tensor (the best of 3
sums). This machine's bandwidth moves between ~30 and ~50 GB/s from one minute to the next, so each
timed run is bracketed by two measurements and compared with their mean: `ratio` is the median over
the runs of (pair decode rate / that run's limit); read_bandwidth_gbs and limit_tokens_per_s are the
medians of the runs' bandwidths and limits, and ratio_of_medians is pair_tokens_per_s / limit_tokens_per_s.

Prints one JSON object:
- pair_tokens_per_s: `sample_pair` (engine path, sampling included: temperature 0.8, top-p 0.95),
  2 x (new_tokens - 1) tokens over the time from the first to the last token (median of the repeats);
- ttft_s: time to the first token of the pair (prefill + first sampling), median;
- hf_sample_pair_tokens_per_s: the same `sample_pair` through the HF forward (the path before the engine);
- hf_generate_pair_tokens_per_s: `model.generate(do_sample=True, num_return_sequences=2)`, prefill included;
- engine_pair_decode_only_tokens_per_s and batched_tokens_per_s: engine.decode alone (no sampling)
  for 2 rows and for --batch-rows rows; torch_backend_pair_decode_only_tokens_per_s: the same for the
  engine's torch backend (the fallback where the native kernels cannot run);
- loop_one_pair_tokens_per_s, loop_8_pairs_tokens_per_s and concurrent_8_pairs_speedup: one pair, then
  8 pairs sent at once, through one DecodeLoop (the app's shared decode loop), aggregate tokens/s from
  sending to the last token (prefill included), and their ratio (goal: at least 3);
- unmerged_vs_merged, mixed_versions_vs_same, rss_10_versions_vs_v0, ttft_after_swap_vs_before: per-row
  LoRA (random adapters with the trainer's config): a pair on an unmerged adapter against the merged
  copy's pair (engine steps, best of 3); a pair whose rows are on two versions against one on a single
  version; process memory with ten adapters resident against v0 alone; time to first token of the first
  request on a just-added version against requests before it (goals 0.9, 0.85, 1.10, 1.2);
- prefill_whole_history_s, prefill_from_kept_prefix_s: a conversation's next turn (a 600-token prompt, 10
  of its tokens new) prefilled whole against from the kept keys of the turn before (the loop's prefix
  cache), medians of 3;
- read_bandwidth_gbs, limit_tokens_per_s, weight_bytes, rss_mb (model + engine, before the 1 GB
  bandwidth buffer), engine_build_s, backend, threads.

Every run decodes exactly --new-tokens tokens (stop tokens are ignored) from fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
SEEDS = (1234, 5678)
BANDWIDTH_FLOATS = 256 * 1024 * 1024  # 1 GiB of float32


def parse_args(argv=None) -> argparse.Namespace:
    from playground.serving.models import DEFAULT_CACHE_DIR

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-rows", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--skip-hf", action="store_true", help="leave out the two HF baselines (the slow part)")
    return p.parse_args(argv)


def rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Bandwidth:
    """torch `x.sum()` over a 1 GiB float32 tensor: the best of 3 at each call."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.x = torch.ones(BANDWIDTH_FLOATS, dtype=torch.float32, device=device)
        self.samples: list[float] = []

    def measure(self) -> float:
        torch = self.torch
        best = 0.0
        for _ in range(3):
            if self.x.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            self.x.sum().item()
            best = max(best, self.x.numel() * 4 / (time.perf_counter() - t) / 1e9)
        self.samples.append(best)
        return best


def time_pair(model, tokenizer, prompt_ids, settings, use_engine):
    """(ttft_s, decode tokens/s from the first to the last token) of one sample_pair run."""
    from playground.serving.generation import sample_pair

    started = time.perf_counter()
    first = last = None
    steps = 0
    for _ in sample_pair(model, tokenizer, prompt_ids, settings, SEEDS, stop_ids=set(), use_engine=use_engine):
        now = time.perf_counter()
        first = first or now
        last = now
        steps += 1
    assert steps == settings.max_new_tokens
    return first - started, 2 * (steps - 1) / (last - first)


def time_engine_decode(engine, prompt_ids, rows, steps, adapter=None):
    import torch

    state, _ = engine.prefill(prompt_ids, rows, len(prompt_ids) + steps + 1, adapter=adapter)
    tokens = torch.full((rows,), 100, dtype=torch.long)
    engine.decode(state, tokens)
    started = time.perf_counter()
    for i in range(steps):
        engine.decode(state, tokens + i)
    return rows * steps / (time.perf_counter() - started)


def random_adapter(model, seed: int) -> tuple[dict, object]:
    """A LoRA with the trainer's config (trainers/dpo.py defaults) and random A and B, as the state dict
    and config `engine.read_adapter` gives for a published version (no copy of the model is made): its
    values rounded to bfloat16 as every round's are (trainers.runtime.round_adapter_to_bf16)."""
    import torch
    from peft import LoraConfig

    from trainers.dpo import DPOConfig

    cfg = DPOConfig()
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in cfg.target_modules and isinstance(module, torch.nn.Linear):
            key = f"base_model.model.{name}"
            weights[f"{key}.lora_A.weight"] = torch.randn(cfg.lora_r, module.in_features, generator=g) * 0.01
            weights[f"{key}.lora_B.weight"] = torch.randn(module.out_features, cfg.lora_r, generator=g) * 0.01
    return {k: v.to(torch.bfloat16).float() for k, v in weights.items()}, config


def merged_copy(model, adapter: tuple[dict, object]):
    """The base model with that LoRA merged in: what serving a version cost before per-row LoRA."""
    import copy

    from peft import get_peft_model, set_peft_model_state_dict

    weights, config = adapter
    peft_model = get_peft_model(copy.deepcopy(model), config)
    set_peft_model_state_dict(peft_model, weights)
    return peft_model.merge_and_unload().eval()


def time_mixed(engine, prompt_ids, adapters, steps):
    """Tokens/s of one pair whose two rows are two states on the given adapters (one decode_many a step)."""
    import torch

    states = [engine.prefill(prompt_ids, 1, len(prompt_ids) + steps + 1, adapter=a)[0] for a in adapters]
    tokens = torch.full((len(states),), 100, dtype=torch.long)
    engine.decode_many(states, tokens)
    started = time.perf_counter()
    for i in range(steps):
        engine.decode_many(states, tokens + i)
    return len(states) * steps / (time.perf_counter() - started)


def time_ttft(loop, model, tokenizer, prompt_ids, settings, adapter=None) -> float:
    started = time.perf_counter()
    for update in loop.stream(model, tokenizer, prompt_ids, settings, SEEDS, stop_ids=set(), adapter=adapter):
        if any(r.token_ids for r in update.replies):
            return time.perf_counter() - started
    raise AssertionError("no token")


def versions_measures(model, tokenizer, engine, prompt_ids, settings, steps: int) -> dict:
    """The per-row LoRA measures: an unmerged-adapter pair against the merged copy's pair, a pair on two
    versions against a pair on one, memory with ten adapters resident against v0, and time to first
    token of the first request on a just-promoted version against one before it."""
    from playground.serving.decode_loop import DecodeLoop
    from playground.serving.engine import Engine
    from playground.serving.generation import SamplingSettings

    # Memory first, before any merged copy exists (freed memory would hide the adapters' growth).
    import gc

    gc.collect()
    rss_v0 = rss_mb()
    for i in range(10):
        engine.add_adapter(f"bench-r{i}", *random_adapter(model, 10 + i))
    gc.collect()
    rss_10 = rss_mb()
    for i in range(10):
        engine.remove_adapter(f"bench-r{i}")
    # Time to first token: requests before a swap, then the first request on each of 3 new versions,
    # each made resident first as a promotion does.
    loop = DecodeLoop()
    first = SamplingSettings(temperature=0.8, top_p=0.95, max_new_tokens=2)
    before = [time_ttft(loop, model, tokenizer, prompt_ids, first) for _ in range(3)]
    after = []
    for i in range(3):
        engine.add_adapter(f"bench-new{i}", *random_adapter(model, 90 + i))
        after.append(time_ttft(loop, model, tokenizer, prompt_ids, first, adapter=f"bench-new{i}"))
        engine.remove_adapter(f"bench-new{i}")
    loop.close()
    # Speed: an unmerged adapter pair against the merged copy's pair; two versions in one pair.
    v1 = random_adapter(model, 1)
    engine.add_adapter("bench-v1", *v1)
    engine.add_adapter("bench-v2", *random_adapter(model, 2))
    merged_engine = Engine.from_model(merged_copy(model, v1))
    unmerged, merged_rate, same, mixed = [], [], [], []
    for _ in range(3):  # interleaved, so the bandwidth's drift falls on each alike
        unmerged.append(time_engine_decode(engine, prompt_ids, 2, steps, adapter="bench-v1"))
        merged_rate.append(time_engine_decode(merged_engine, prompt_ids, 2, steps))
        same.append(time_mixed(engine, prompt_ids, ["bench-v1", "bench-v1"], steps))
        mixed.append(time_mixed(engine, prompt_ids, ["bench-v1", "bench-v2"], steps))
    del merged_engine
    for name in ("bench-v1", "bench-v2"):
        engine.remove_adapter(name)
    before.sort()
    after.sort()
    return {
        "unmerged_pair_tokens_per_s": round(max(unmerged), 2), "merged_pair_tokens_per_s": round(max(merged_rate), 2),
        "unmerged_vs_merged": round(max(unmerged) / max(merged_rate), 3),
        "mixed_versions_pair_tokens_per_s": round(max(mixed), 2), "same_version_pair_tokens_per_s": round(max(same), 2),
        "mixed_versions_vs_same": round(max(mixed) / max(same), 3),
        "rss_v0_mb": round(rss_v0, 1), "rss_10_versions_mb": round(rss_10, 1),
        "rss_10_versions_vs_v0": round(rss_10 / rss_v0, 3),
        "ttft_before_swap_s": round(before[1], 4), "ttft_after_swap_s": round(after[1], 4),
        "ttft_after_swap_vs_before": round(after[1] / before[1], 3),  # medians of 3
    }


def prefix_measures(engine, history_tokens: int = 600, new_tokens: int = 10, repeats: int = 3) -> dict:
    """A conversation's next turn: prefilling a `history_tokens` prompt whole against prefilling it from the
    kept keys of the turn before (all but its last `new_tokens` tokens), as the decode loop's prefix cache
    does. Medians of `repeats`, interleaved."""
    import torch

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, engine.vocab_size, (history_tokens,), generator=g).tolist()
    earlier, _ = engine.prefill(prompt[:-new_tokens], 2, history_tokens + 8)
    kept = engine.keep_prefix(earlier, 0, prompt[:-new_tokens])
    whole, cached = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.prefill(prompt, 2, history_tokens + 8)
        whole.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.prefill(prompt, 2, history_tokens + 8, prefix=kept)
        cached.append(time.perf_counter() - t)
    return {"prefill_whole_history_s": round(statistics.median(whole), 4),
            "prefill_from_kept_prefix_s": round(statistics.median(cached), 4),
            "prefill_history_tokens": history_tokens, "prefill_new_tokens": new_tokens}


def time_concurrent(model, tokenizer, prompt_ids, settings, pairs: int, max_batch_rows: int) -> float:
    """Aggregate tokens/s of `pairs` pairs sent at once through one DecodeLoop (the app's decode loop),
    from the moment they are sent to the last token of the last pair, prefill included."""
    from bench.fixtures import run_together
    from playground.serving.decode_loop import DecodeLoop

    loop = DecodeLoop(max_batch_rows=max_batch_rows)
    counts = [0] * pairs

    def run(i):
        for update in loop.stream(model, tokenizer, prompt_ids, settings, (SEEDS[0] + i, SEEDS[1] + i), stop_ids=set()):
            counts[i] = sum(r.n_tokens for r in update.replies)

    elapsed = run_together(run, pairs)
    loop.close()
    assert counts == [2 * settings.max_new_tokens] * pairs, counts
    return sum(counts) / elapsed


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from playground.serving import engine as engine_mod
    from playground.serving.generation import SamplingSettings, engine_for
    from playground.serving.models import load_model
    from playground.serving.prompting import render

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, args.device, args.cache_dir)
    model, tokenizer = lm.model, lm.tokenizer
    prompt_ids = render(tokenizer, PROMPT)
    settings = SamplingSettings(temperature=0.8, top_p=0.95, max_new_tokens=args.new_tokens)
    warm = SamplingSettings(temperature=0.8, top_p=0.95, max_new_tokens=4)

    t = time.perf_counter()
    engine = engine_for(model)
    build_s = time.perf_counter() - t
    if engine is None:
        print("the engine does not support this model: timing the HF path only", file=sys.stderr)
    time_pair(model, tokenizer, prompt_ids, warm, use_engine=None)  # warm-up
    rss = rss_mb()

    # Before the 1 GB bandwidth buffer exists, so the memory ratio is of the serving process alone.
    versions = versions_measures(model, tokenizer, engine, prompt_ids, settings, min(48, args.new_tokens)) \
        if engine is not None else {}
    if engine is not None:
        versions.update(prefix_measures(engine))
    bandwidth = Bandwidth(lm.device)
    bandwidth.measure()
    pair_rates, ttfts, ratios, run_bandwidths = [], [], [], []
    weight_gb = lm.weight_bytes / 1e9
    for _ in range(args.repeats):
        ttft, rate = time_pair(model, tokenizer, prompt_ids, settings, use_engine=None)
        bw = statistics.mean([bandwidth.samples[-1], bandwidth.measure()])
        pair_rates.append(rate)
        ttfts.append(ttft)
        run_bandwidths.append(bw)
        ratios.append(rate / (bw / weight_gb * 2))
    result = {}
    torch_decode_pair = None
    if engine is not None:
        decode_pair = time_engine_decode(engine, prompt_ids, 2, min(64, args.new_tokens))
        batched = time_engine_decode(engine, prompt_ids, args.batch_rows, min(32, args.new_tokens))
        if engine.backend == "native":  # the fallback backend, for comparison
            fallback = engine_mod.Engine.from_model(model, native=False)
            torch_decode_pair = time_engine_decode(fallback, prompt_ids, 2, min(64, args.new_tokens))
            del fallback
        bandwidth.measure()
    else:
        decode_pair = batched = None
    one_pair_loop = time_concurrent(model, tokenizer, prompt_ids, settings, 1, 16)
    eight_pairs_loop = time_concurrent(model, tokenizer, prompt_ids, settings, 8, 16)
    bandwidth.measure()

    hf_pair = hf_generate = None
    if not args.skip_hf:
        time_pair(model, tokenizer, prompt_ids, warm, use_engine=False)
        _, hf_pair = time_pair(model, tokenizer, prompt_ids, settings, use_engine=False)
        ids = torch.tensor([prompt_ids], device=lm.device)
        torch.manual_seed(SEEDS[0])
        with torch.inference_mode():
            model.generate(input_ids=ids, do_sample=True, num_return_sequences=2, max_new_tokens=4,
                           attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.pad_token_id)
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 num_return_sequences=2, temperature=0.8, top_p=0.95, top_k=0,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
            elapsed = time.perf_counter() - t
        hf_generate = (out.shape[0] * (out.shape[1] - ids.shape[1])) / elapsed
        bandwidth.measure()

    read_bw = statistics.median(run_bandwidths)
    limit = read_bw / weight_gb * 2
    pair = statistics.median(pair_rates)

    def r(x, digits=2):
        return None if x is None else round(x, digits)

    result.update({
        "pair_tokens_per_s": r(pair),
        "limit_tokens_per_s": r(limit),
        "ratio": r(statistics.median(ratios), 3),
        "ratio_of_medians": r(pair / limit, 3),
        "read_bandwidth_gbs": r(read_bw),
        "weight_bytes": lm.weight_bytes,
        "ttft_s": r(statistics.median(ttfts), 4),
        "hf_sample_pair_tokens_per_s": r(hf_pair),
        "hf_generate_pair_tokens_per_s": r(hf_generate),
        "engine_pair_decode_only_tokens_per_s": r(decode_pair),
        "torch_backend_pair_decode_only_tokens_per_s": r(torch_decode_pair),
        "batched_rows": args.batch_rows if batched is not None else None,
        "batched_tokens_per_s": r(batched),
        "loop_one_pair_tokens_per_s": r(one_pair_loop),
        "loop_8_pairs_tokens_per_s": r(eight_pairs_loop),
        "concurrent_8_pairs_speedup": r(eight_pairs_loop / one_pair_loop, 3),
        **versions,
        "rss_mb": r(rss, 1),
        "engine_build_s": r(build_s, 3),
        "backend": engine.backend if engine is not None else "hf",
        "threads": torch.get_num_threads(),
        "model": lm.model_id,
        "new_tokens": args.new_tokens,
        "prompt_tokens": len(prompt_ids),
        "repeats": {
            "pair_tokens_per_s": [r(x) for x in pair_rates],
            "ratio": [r(x, 3) for x in ratios],
            "ttft_s": [r(x, 4) for x in ttfts],
            "read_bandwidth_gbs": [r(x) for x in run_bandwidths],
            "bandwidth_samples_gbs": [r(x) for x in bandwidth.samples],
        },
    })
    if (engine is None or engine.backend != "native") and engine_mod._native_error:
        result["native_unavailable"] = engine_mod._native_error
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
