"""What a training round costs against the machine's compute limit: reward model, PPO and DPO rounds.

    PYTHONPATH=. .venv/bin/python bench/train_cost.py            # the bundled model: 64 pairs, 32 prompts
    python -m bench.train_cost --quick                            # tiny settings, a smoke run
    python -m bench.train_cost --model PATH --pairs 64 --prompts 32 --out cost.json
    python -m bench.train_cost --passive-openmp     # on a machine other jobs share (the numbers are theirs too)

On the given model (default: the bundled SmolLM2-135M, CPU), one after the other: a reward-model round on
--pairs pairs (`trainers.reward.train_reward`), a PPO round on --prompts prompts (`trainers.ppo.train_ppo`,
PPOConfig's defaults: 2 iterations of 16 rollouts, each prompt once) scored by that reward model
(`--ppo-reward scripted` scores reply lengths instead), and a DPO round on the same pairs
(`trainers.dpo.train_dpo`). Every config is its trainer's default; no held-out pairs. Before them one
small round of each warms the kernels and the allocator up (not timed); after them, unless --no-profile,
one small round of each runs under torch.profiler (own timings, not the ones above).

Data: prompts are playground/sim/prompts.txt rendered with the tokenizer's chat template (the round's
own rendering); replies are random vocabulary tokens (special tokens left out), 60-120 tokens each
including the template's end-of-turn tokens, lengths drawn uniformly. Random tokens, not the model's
own samples: the cost depends on the token counts, not on which tokens they are, and sampling 128
replies would take minutes. PPO's rollouts are the model's own samples (PPO generates them).

FLOPs: what each pass needs, counted from the model's shape and the real tokens of every row
(multiply-add = 2 FLOPs):

    P      = layers x sum over the 7 projections (q, k, v, o, gate, up, down) of in x out: the frozen products
    P_lora = layers x sum over the LoRA-wrapped projections of r x (in + out)
    K      = (query, key) pairs attention needs: n(n+1)/2 for a causal row of n tokens; for a DPO row
             (prompt p, chosen c, the prompt's last token again, rejected r; trainers/dpo.py pack_pairs)
             (p+c)(p+c+1)/2 + p + r p + r(r+1)/2
    A      = 4 x layers x heads x head_dim per (query, key) pair: Q.K^T and P.V
    H      = 2 x hidden x vocab per LM-head row (positions that predict a reply token; none in the
             reward model, which reads a score head at the row's last token)

    forward  = 2 P N + 2 P_lora N (adapter on) + A K + H h          N decoder tokens, h LM-head rows
    backward = 2 (P - P_qkv,0) N    input gradients of the frozen products, no weight gradients; layer 0's
                                    q/k/v need none (their input, the frozen embeddings, takes no gradient)
             + 4 P_lora N - 2 r (d_q + d_k + d_v) N    LoRA A and B weight gradients and input gradients,
                                    less layer 0's q/k/v x-gradients (d_* their input widths; LoRA-wrapped only)
             + 2 A K                dQ, dK, dV and dP
             + H h                  the LM head's input gradient (its weight, the tied embedding, is frozen)

So the backward of the frozen weights costs as much as their forward (one product per weight, for the
input gradient), and a LoRA step is ~2x a forward, not the ~3x of full fine-tuning. A PPO rollout of
prompt p and t trained tokens (its reply, plus the stop token when it stopped) needs a generation of
p + t - 1 causal tokens with t LM-head rows (prefill, then t - 1 one-token steps), a scoring pass
(reference with the adapter off, then the policy: p + t tokens, t head rows each) and ppo_epochs
training passes; the reward model scores prompt + reply + end-of-turn in a forward without a head.

Not counted: RMS norms, rotary, SiLU, softmax and log-softmax, residual adds, the embedding lookup,
sampling, the optimizer, the score and value heads (2 x hidden per row), the fused LM head's
recomputation of the logits in its backward (trainers/logprobs.py spends H h more FLOPs to save
memory), padding, the masked-out (query, key) pairs a dense attention kernel computes anyway, and the
finished rows HF `generate` keeps decoding. All of that is what the implementation spends beyond the
need: it shows in the ratios, and the token counts say how much was padding.

The limit: the rounds' frozen products run in the trainers' matmul dtype (`matmul_dtype="auto"`: bf16
with float32 accumulation where trainers/fastlora.py `bf16_matmul_is_fast`), everything else in float32
(LoRA, attention, the LM head); the reward model's scoring after its round and the PPO reward model's
scoring run PEFT's own forward in the weights' float32. The rate of each dtype is measured in the same
run: `F.linear` of [1024 x in] by one decoder layer's seven weights, best of 10, at the start and the
end (the higher is kept). A pass's limit is sum over dtypes of its FLOPs / that dtype's rate, and
`*_vs_limit` is limit seconds / measured seconds (1.0: every needed product at the measured peak rate,
nothing else). Generation is memory-bound: a decode step reads the base weights (in the matmul dtype),
the LoRA weights and the LM head (float32) once for all rows, plus each running row's KV cache
(2 x layers x kv_heads x head_dim x 4 bytes a cached token); read bandwidth is bench/decode.py's
`Bandwidth` (x.sum() over 1 GiB, best of 3), measured before and after the PPO round (the mean).
`ppo_generate_vs_roofline` takes, forward by forward, the larger of the compute and the memory time.
tests/test_train_cost.py checks the forward and backward counts against torch.utils.flop_counter on the
tiny model (equal, once the LM head's recomputation is added).

Prints one JSON object (and writes it to --out): the keys named in `REQUIRED_KEYS`, the FLOPs (GFLOP),
needed and processed tokens and seconds of every pass under `phases`, the profile under `profile`, and
`where_the_rest_goes`, a list of measured facts. Progress goes to stderr. The goal the issue set: the
training phases at >= 0.5 of the limit (GOAL_VS_LIMIT).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

GOAL_VS_LIMIT = 0.5  # the goal for the training phases
REQUIRED_KEYS = (
    "reward_round_seconds", "reward_round_vs_limit", "ppo_round_seconds", "ppo_generate_share",
    "ppo_train_vs_limit", "ppo_generate_vs_limit", "ppo_generate_vs_bandwidth_limit", "dpo_round_seconds",
    "dpo_round_vs_limit", "matmul_gflops", "phases", "where_the_rest_goes",
)
REPLY_TOKENS = (60, 120)  # reply lengths, end-of-turn tokens included
QUICK_REPLY_TOKENS = (4, 12)
QUICK_MAX_NEW_TOKENS = 8
# Rows of the products the matmul rate is measured on: a training batch of 4 rows of ~250 tokens.
RATE_ROWS = 1024
RATE_REPEATS = 10
# The warm-up and profiled rounds: the fewest pairs a reward round accepts (trainers.reward.MIN_REWARD_PAIRS),
# and one PPO iteration of a few rollouts.
SMALL_PAIRS = 8
SMALL_ROLLOUTS = 4
# The scripted PPO reward (--ppo-reward scripted): replies near this many tokens score best.
SCRIPTED_TARGET_TOKENS = 48
FLOAT32 = "float32"
PRODUCT_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul",
               "aten::linear", "aten::_addmm_activation"}
COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"}
PROFILE_CATEGORIES = ("products", "lm_head", "attention", "copies_and_casts", "optimizer", "other_ops")


def log(message: str) -> None:
    print(f"[train_cost {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    from playground.serving.models import BUNDLED, DEFAULT_CACHE_DIR

    p = argparse.ArgumentParser(prog="python -m bench.train_cost", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=BUNDLED, help="as for app.py (default: %(default)s)")
    p.add_argument("--model-cache", default=DEFAULT_CACHE_DIR)
    p.add_argument("--pairs", type=int, default=None, help="pairs of the reward and DPO rounds (default 64; --quick 8)")
    p.add_argument("--prompts", type=int, default=None, help="prompts of the PPO round (default 32; --quick 4)")
    p.add_argument("--quick", action="store_true", help=f"tiny settings: replies of {QUICK_REPLY_TOKENS} tokens, "
                   f"PPO max_new_tokens {QUICK_MAX_NEW_TOKENS}")
    p.add_argument("--ppo-reward", choices=("model", "scripted"), default="model",
                   help="PPO's reward: the reward round's model (normalised), or a score of the reply's length")
    p.add_argument("--no-profile", action="store_true", help="leave out the profiled small rounds")
    p.add_argument("--seed", type=int, default=0, help="the data's seed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--passive-openmp", action="store_true",
                   help="OpenMP threads sleep instead of spinning (trainers/procenv.py), as a scheduled round's "
                   "do: for a machine other jobs share, where spinning threads wait on descheduled ones")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.pairs = args.pairs if args.pairs is not None else (SMALL_PAIRS if args.quick else 64)
    args.prompts = args.prompts if args.prompts is not None else (4 if args.quick else 32)
    if args.pairs < SMALL_PAIRS:
        p.error(f"--pairs must be at least {SMALL_PAIRS} (a reward round refuses fewer), got {args.pairs}")
    if args.prompts < 2:
        p.error(f"--prompts must be at least 2 (PPO runs 2 iterations), got {args.prompts}")
    return args


# --- the model's shape and the FLOPs of a pass ----------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a Llama-style decoder and its LoRA."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    lora_r: int
    lora_targets: tuple[str, ...]

    @classmethod
    def of(cls, model, lora_r: int, lora_targets) -> ModelShape:
        c = model.config
        heads = c.num_attention_heads
        return cls(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   intermediate=c.intermediate_size, vocab=model.get_input_embeddings().num_embeddings,
                   lora_r=lora_r, lora_targets=tuple(lora_targets))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    @property
    def base_params(self) -> int:  # P
        return self.layers * sum(i * o for i, o in self.linears().values())

    @property
    def lora_params(self) -> int:  # P_lora
        wrapped = [(i, o) for name, (i, o) in self.linears().items() if name in self.lora_targets]
        return self.layers * sum(self.lora_r * (i + o) for i, o in wrapped)

    @property
    def first_qkv_params(self) -> int:  # P_qkv,0
        return sum(i * o for n, (i, o) in self.linears().items() if n in ("q_proj", "k_proj", "v_proj"))

    @property
    def first_qkv_lora_inputs(self) -> int:  # d_q + d_k + d_v of the LoRA-wrapped ones
        return sum(i for n, (i, _) in self.linears().items() if n in ("q_proj", "k_proj", "v_proj")
                   and n in self.lora_targets)

    def decode_bytes(self, base_bytes: int) -> int:
        """Weight bytes a decode step reads: the frozen products, the LoRA weights, the LM head (float32)."""
        return self.base_params * base_bytes + self.lora_params * 4 + self.vocab * self.hidden * 4

    @property
    def kv_bytes_per_token(self) -> int:  # float32 keys and values of every layer
        return 2 * self.layers * self.kv_heads * self.head_dim * 4


@dataclass
class Tokens:
    """What a pass pushes through the model: decoder tokens, (query, key) pairs, LM-head rows."""

    tokens: int = 0
    keys: int = 0
    head_rows: int = 0

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.tokens + other.tokens, self.keys + other.keys, self.head_rows + other.head_rows)


def causal(n: int) -> int:
    return n * (n + 1) // 2


def causal_row(n: int, head_rows: int = 0) -> Tokens:
    return Tokens(n, causal(n), head_rows)


def dpo_row(p: int, c: int, r: int) -> Tokens:
    """A packed DPO row: prompt, chosen, a copy of the prompt's last token, rejected. The copy sees the
    prompt less its last token and itself (p keys); rejected token j sees those and rejected 0..j."""
    return Tokens(p + c + 1 + r, causal(p + c) + p + r * p + causal(r), c + r)


def generation(p: int, t: int) -> Tokens:
    """Sampling t tokens after a prompt of p: the prompt, then t - 1 one-token steps, each with a head row."""
    return Tokens(p + t - 1, causal(p + t - 1), t)


def pass_flops(shape: ModelShape, work: Tokens, lora: bool, backward: bool) -> dict[str, int]:
    """FLOPs of a pass by kind ('base', 'lora', 'attention', 'head'); with backward, forward + backward."""
    n = work.tokens
    attention = 4 * shape.layers * shape.heads * shape.head_dim * work.keys
    flops = {"base": 2 * shape.base_params * n, "lora": 2 * shape.lora_params * n if lora else 0,
             "attention": attention, "head": 2 * shape.hidden * shape.vocab * work.head_rows}
    if backward:
        flops["base"] += 2 * (shape.base_params - shape.first_qkv_params) * n
        flops["lora"] += 4 * shape.lora_params * n - 2 * shape.lora_r * shape.first_qkv_lora_inputs * n
        flops["attention"] += 2 * attention
        flops["head"] += 2 * shape.hidden * shape.vocab * work.head_rows
    return flops


@dataclass
class Cost:
    """The FLOPs a pass needs, by kind and by the dtype of their products, and the tokens behind them."""

    by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("base", "lora", "attention", "head"), 0))
    by_dtype: dict[str, int] = field(default_factory=dict)
    tokens: Tokens = field(default_factory=Tokens)

    def add(self, shape: ModelShape, work: Tokens, lora: bool, backward: bool, base_dtype: str, times: int = 1):
        flops = pass_flops(shape, work, lora, backward)
        for kind, value in flops.items():
            self.by_kind[kind] += value * times
            dtype = base_dtype if kind == "base" else FLOAT32
            self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + value * times
        for _ in range(times):
            self.tokens = self.tokens + work

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def limit_seconds(self, rates: dict[str, float]) -> float:
        return sum(flops / rates[dtype] for dtype, flops in self.by_dtype.items())


# --- the passes each round needs --------------------------------------------------------------------------


def reward_costs(shape, pairs, epochs: int, base_dtype: str) -> dict[str, Cost]:
    """Training steps on prompt + chosen and prompt + rejected rows; then one float32 scoring pass of them."""
    steps, scoring = Cost(), Cost()
    for pair in pairs:
        for reply in (pair.chosen_ids, pair.rejected_ids):
            row = causal_row(len(pair.prompt_ids) + len(reply))
            steps.add(shape, row, lora=True, backward=True, base_dtype=base_dtype, times=epochs)
            scoring.add(shape, row, lora=True, backward=False, base_dtype=FLOAT32)
    return {"steps": steps, "scoring": scoring}


def dpo_costs(shape, pairs, epochs: int, base_dtype: str) -> dict[str, Cost]:
    """The reference pass (adapter off) once, then every epoch's training steps, on packed pair rows."""
    reference, steps = Cost(), Cost()
    for pair in pairs:
        row = dpo_row(len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids))
        reference.add(shape, row, lora=False, backward=False, base_dtype=base_dtype)
        steps.add(shape, row, lora=True, backward=True, base_dtype=base_dtype, times=epochs)
    return {"reference": reference, "steps": steps}


def trained_tokens(reply: list[int], max_new_tokens: int) -> int:
    """PPO trains on the reply plus its stop token; a reply cut at max_new_tokens has none."""
    return len(reply) + (len(reply) < max_new_tokens)


def ppo_costs(shape, iterations: list[tuple[list, list]], config, base_dtype: str, reward_suffix: int | None
              ) -> dict[str, Cost]:
    """From each iteration's (prompts, replies): generation, the reward model (None: a scripted reward),
    the scoring pass (reference and policy) and ppo_epochs training passes."""
    costs = {name: Cost() for name in ("generate", "reward", "scoring", "steps")}
    for prompts, replies in iterations:
        for prompt, reply in zip(prompts, replies):
            p, t = len(prompt), trained_tokens(reply, config.max_new_tokens)
            costs["generate"].add(shape, generation(p, t), lora=True, backward=False, base_dtype=base_dtype)
            if reward_suffix is not None:
                costs["reward"].add(shape, causal_row(p + len(reply) + reward_suffix), lora=True, backward=False,
                                    base_dtype=FLOAT32)
            row = causal_row(p + t, t)
            costs["scoring"].add(shape, row, lora=False, backward=False, base_dtype=base_dtype)
            costs["scoring"].add(shape, row, lora=True, backward=False, base_dtype=base_dtype)
            costs["steps"].add(shape, row, lora=True, backward=True, base_dtype=base_dtype, times=config.ppo_epochs)
    return costs


def generation_limits(shape, iterations, config, base_dtype: str, base_bytes: int, rates, bandwidth: float,
                      batch_rows: int) -> dict[str, float]:
    """Seconds the rollouts' generation needs at the compute limit, at the bandwidth limit, and at the
    roofline (per forward, the larger of the two), for batches of batch_rows rollouts as generate runs them.
    Only the rows still running count at a step; finished ones are waste."""
    weights = shape.decode_bytes(base_bytes)
    compute = memory = roofline = 0.0

    def seconds(cost: Cost, nbytes: int) -> None:
        nonlocal compute, memory, roofline
        c, m = cost.limit_seconds(rates), nbytes / bandwidth
        compute, memory, roofline = compute + c, memory + m, roofline + max(c, m)

    for prompts, replies in iterations:
        for start in range(0, len(prompts), batch_rows):
            batch = [(len(p), trained_tokens(r, config.max_new_tokens))
                     for p, r in zip(prompts[start:start + batch_rows], replies[start:start + batch_rows])]
            prefill = Cost()
            for p, _ in batch:
                prefill.add(shape, causal_row(p, 1), lora=True, backward=False, base_dtype=base_dtype)
            seconds(prefill, weights)
            for step in range(1, max(t for _, t in batch)):  # step s feeds generated token s
                cost, nbytes = Cost(), weights
                for p, t in batch:
                    if step < t:
                        # One token at position p + s - 1, attending to p + s keys (its cache and itself).
                        cost.add(shape, Tokens(1, p + step, 1), lora=True, backward=False, base_dtype=base_dtype)
                        nbytes += shape.kv_bytes_per_token * (p + step - 1)
                seconds(cost, nbytes)
    return {"compute_s": compute, "bandwidth_s": memory, "roofline_s": roofline}


# --- measuring: the matmul rate, the forwards that ran, the profile --------------------------------------


def matmul_rates(shape: ModelShape, dtypes, rows: int = RATE_ROWS, repeats: int = RATE_REPEATS) -> dict:
    """FLOP/s of one decoder layer's seven products on [rows x in] inputs, per dtype (best of repeats), and
    of each shape; plus the LM head's float32 chunk (trainers/logprobs.py HEAD_CHUNK_ROWS rows)."""
    import torch
    import torch.nn.functional as F

    from trainers.logprobs import HEAD_CHUNK_ROWS

    def best(calls, flops) -> float:
        for _ in range(2):
            for call in calls:
                call()
        fastest = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for call in calls:
                call()
            fastest = min(fastest, time.perf_counter() - started)
        return flops / fastest

    generator = torch.Generator().manual_seed(0)
    out = {"layer": {}, "by_shape": {}}
    for name in dtypes:
        dtype = getattr(torch, name)
        inputs = {i: torch.randn(rows, i, generator=generator).to(dtype) for i, _ in shape.linears().values()}
        calls, total = [], 0
        for proj, (i, o) in shape.linears().items():
            weight = torch.randn(o, i, generator=generator).to(dtype)
            calls.append(lambda x=inputs[i], w=weight: F.linear(x, w))
            out["by_shape"][f"{name} {rows}x{i}x{o}"] = best(calls[-1:], 2 * rows * i * o)
            total += 2 * rows * i * o
        out["layer"][name] = best(calls, total)
    hidden = torch.randn(HEAD_CHUNK_ROWS, shape.hidden, generator=generator)
    head = torch.randn(shape.vocab, shape.hidden, generator=generator)
    out["lm_head_chunk_float32"] = best([lambda: hidden @ head.t()], 2 * HEAD_CHUNK_ROWS * shape.hidden * shape.vocab)
    return out


@dataclass
class Forward:
    label: str  # what the bench was running: 'reward', 'ppo', 'dpo', 'warmup', 'profile'
    kind: str  # 'steps' (with grad), 'no_grad', 'generate' (with a KV cache), 'reward' (inside PPO's reward_fn)
    rows: int
    width: int
    cached: int  # tokens already in the KV cache (generate's prefill: 0)
    start: float
    end: float = 0.0


class ForwardLog:
    """Every forward of the decoder stack: its rows, width and time.

    The hooks go on the loaded model's decoder before any round, and every trainer deep-copies that
    model: a module's deepcopy copies its hooks, and a plain function deep-copies as itself, so the
    copies' forwards land in this one log (the reward model's, inside PPO's reward_fn, too)."""

    def __init__(self):
        self.forwards: list[Forward] = []
        self.label = "setup"
        self.in_reward_fn = False

    def attach(self, decoder) -> list:
        import torch

        def before(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs["inputs_embeds"]
            past = kwargs.get("past_key_values")
            if self.in_reward_fn:
                kind = "reward"
            elif past is not None:
                kind = "generate"
            else:
                kind = "steps" if torch.is_grad_enabled() else "no_grad"
            cached = past.get_seq_length() if past is not None else 0
            self.forwards.append(Forward(self.label, kind, ids.shape[0], ids.shape[1], cached, time.perf_counter()))

        def after(module, args, output):
            self.forwards[-1].end = time.perf_counter()

        return [decoder.register_forward_pre_hook(before, with_kwargs=True), decoder.register_forward_hook(after)]

    def of(self, label: str) -> list[Forward]:
        return [f for f in self.forwards if f.label == label]


def processed(forwards: list[Forward], kind: str) -> dict:
    chosen = [f for f in forwards if f.kind == kind]
    return {"forwards": len(chosen), "tokens": sum(f.rows * f.width for f in chosen),
            "decoder_forward_s": round(sum(f.end - f.start for f in chosen), 3)}


def profile_summary(prof, wall: float, vocab: int) -> dict:
    """Seconds by category of a profiled run, from each op's self time (no double counting): products,
    the LM head (its products and every op on [rows, vocab] logits, the fused head's whole forward and
    backward), attention kernels, copies and dtype casts, the optimizer's step and zero_grad, other ops;
    'outside_ops' is the wall time no op accounts for (Python, module and autograd bookkeeping, and the
    profiler's own overhead)."""
    seconds = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    events = prof.events()
    for event in events:
        seconds[_category(event, vocab)] += event.self_cpu_time_total / 1e6
    in_ops = sum(seconds.values())
    seconds["outside_ops"] = max(0.0, wall - in_ops)
    return {"wall_s": round(wall, 2), "ops": len(events), "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "share": {k: round(v / wall, 3) for k, v in seconds.items()}}


def _category(event, vocab: int) -> str:
    ancestors = []
    parent = event.cpu_parent
    while parent is not None:
        ancestors.append(parent.name)
        parent = parent.cpu_parent
    if any(name.startswith("Optimizer.") for name in ancestors):
        return "optimizer"
    if any("_HeadLogprobs" in name for name in [event.name, *ancestors]):
        return "lm_head"
    if any(vocab in shape for shape in (event.input_shapes or []) if shape):
        return "lm_head"
    if event.name in PRODUCT_OPS:
        return "products"
    if any("scaled_dot_product" in name or "flash_attention" in name for name in [event.name, *ancestors]):
        return "attention"
    if event.name in COPY_OPS:
        return "copies_and_casts"
    return "other_ops"


# --- the data -------------------------------------------------------------------------------------------


def reply_suffix(tokenizer) -> list[int]:
    """The tokens the chat template puts after an assistant message (SmolLM2: <|im_end|> and a newline)."""
    from playground.serving.prompting import render

    messages = [{"role": "user", "content": "hi"}]
    prompt = render(tokenizer, messages)
    full = render(tokenizer, messages + [{"role": "assistant", "content": ""}], add_generation_prompt=False)
    if full[: len(prompt)] == prompt and len(full) > len(prompt):
        return full[len(prompt):]
    return [tokenizer.eos_token_id]


def make_data(tokenizer, vocab: int, n_pairs: int, n_prompts: int, reply_tokens: tuple[int, int], seed: int):
    """(pairs, PPO prompts): chat-template prompts from playground/sim/prompts.txt; replies of random
    non-special tokens ending with the template's end of turn, reply_tokens long (inclusive range)."""
    from playground.serving.prompting import render
    from playground.sim.prompt_file import load_prompts
    from trainers.pairs import PreferencePair

    texts = load_prompts()
    rendered = [render(tokenizer, [{"role": "user", "content": text}]) for text in texts]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ordinary = [i for i in range(vocab) if i not in special]
    suffix = reply_suffix(tokenizer)
    rng = random.Random(seed)

    def reply() -> tuple[int, ...]:
        n = max(rng.randint(*reply_tokens) - len(suffix), 1)
        return tuple(rng.choice(ordinary) for _ in range(n)) + tuple(suffix)

    pairs = [PreferencePair(tuple(rendered[i % len(rendered)]), reply(), reply()) for i in range(n_pairs)]
    # PPO's prompts start where the pairs' end, so the two rounds do not share prompts while the file lasts.
    prompts = [rendered[(n_pairs + i) % len(rendered)] for i in range(n_prompts)]
    return pairs, prompts, suffix


# --- the rounds -----------------------------------------------------------------------------------------


def ppo_config_for(n_prompts: int, quick: bool, **overrides):
    """PPOConfig's defaults, with each prompt rolled out once over its iterations (32 prompts: 2 x 16)."""
    from trainers.ppo import PPOConfig

    default = PPOConfig()
    rollouts = max(1, n_prompts // default.iterations)
    settings = {"rollouts_per_iteration": rollouts, "minibatch_size": min(default.minibatch_size, rollouts)}
    if quick:
        settings["max_new_tokens"] = QUICK_MAX_NEW_TOKENS
    return PPOConfig(**(settings | overrides))


def reward_fn_for(kind: str, scorer, suffix: list[int], forward_log: ForwardLog, seen: list):
    """PPO's reward: the reward model's normalised score of prompt + reply + end of turn (the rows it was
    trained on), or a scripted score of the reply's length. Every call's rollouts are kept in `seen`."""

    def reward_fn(prompts, replies):
        seen.append((prompts, replies))
        if kind == "scripted":
            return [-abs(len(r) - SCRIPTED_TARGET_TOKENS) / SCRIPTED_TARGET_TOKENS for r in replies]
        forward_log.in_reward_fn = True
        try:
            raw = scorer.score([(p, list(r) + suffix) for p, r in zip(prompts, replies)])
        finally:
            forward_log.in_reward_fn = False
        return scorer.normalise(raw)

    return reward_fn



@dataclass
class Timed:
    """One round: wall seconds, when it started, the wall clock of each on_step, and what the trainer
    reported that the bench keeps (the result itself is dropped: it holds a full copy of the model)."""

    seconds: float
    start: float
    step_ends: list[float]
    extra: dict = field(default_factory=dict)


def timed(call, keep=lambda result: {}) -> tuple[Timed, object]:
    """call(on_step), timed; (Timed, the trainer's result)."""
    step_ends: list[float] = []
    start = time.perf_counter()
    result = call(lambda metrics: step_ends.append(time.perf_counter()))
    seconds = time.perf_counter() - start
    return Timed(seconds, start, step_ends, keep(result)), result


def ppo_timings(result) -> dict:
    return {"seconds": result.seconds, "generate": result.generate_seconds, "reward": result.reward_seconds,
            "train": result.train_seconds, "steps": result.steps}


def small_rounds(loaded, pairs, prompts, suffix, args, forward_log: ForwardLog, profile: bool,
                 max_new_tokens: int) -> dict:
    """One small round of each trainer (SMALL_PAIRS pairs; one PPO iteration of SMALL_ROLLOUTS rollouts
    of max_new_tokens): the warm-up, or the profile. Returns {round: profile summary} when profiling."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from trainers.dpo import train_dpo
    from trainers.ppo import PPOConfig, train_ppo
    from trainers.reward import train_reward

    model, tokenizer = loaded.model, loaded.tokenizer
    vocab = model.get_input_embeddings().num_embeddings
    rollouts = min(SMALL_ROLLOUTS, len(prompts))
    ppo_config = PPOConfig(iterations=1, rollouts_per_iteration=rollouts, minibatch_size=min(4, rollouts),
                           ppo_epochs=1, max_new_tokens=max_new_tokens)
    small = pairs[:SMALL_PAIRS]
    summaries = {}

    def run(name, call):
        if not profile:
            return call()
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            started = time.perf_counter()
            out = call()
            wall = time.perf_counter() - started
        summaries[name] = profile_summary(prof, wall, vocab)
        return out

    reward = run("reward", lambda: train_reward(model, small, []))
    reward_fn = reward_fn_for(args.ppo_reward, reward.scorer(), suffix, forward_log, [])
    run("ppo", lambda: train_ppo(model, tokenizer, prompts[:rollouts], reward_fn, ppo_config))
    del reward, reward_fn
    gc.collect()
    run("dpo", lambda: train_dpo(model, small, []))
    gc.collect()
    if profile:
        summaries["settings"] = {"pairs": len(small), "ppo": f"1 iteration of {rollouts} rollouts, "
                                 f"max_new_tokens {max_new_tokens}, 1 epoch"}
    return summaries


def run_rounds(loaded, pairs, prompts, suffix, args, forward_log: ForwardLog, bandwidth_samples: list) -> dict:
    """The three timed rounds; {name: (Timed, config)} and PPO's rollouts under 'ppo_rollouts'."""
    from bench.decode import Bandwidth
    from trainers.dpo import DPOConfig, train_dpo
    from trainers.ppo import train_ppo
    from trainers.reward import RewardConfig, train_reward

    model, tokenizer = loaded.model, loaded.tokenizer
    reward_config, dpo_config = RewardConfig(), DPOConfig()
    ppo_config = ppo_config_for(len(prompts), args.quick)

    forward_log.label = "reward"
    log(f"reward round: {len(pairs)} pairs")
    reward, reward_result = timed(lambda on_step: train_reward(model, pairs, [], reward_config, on_step=on_step))
    scorer = reward_result.scorer()

    log(f"ppo round: {len(prompts)} prompts, {ppo_config.iterations} x {ppo_config.rollouts_per_iteration} "
        f"rollouts of up to {ppo_config.max_new_tokens} tokens")
    bandwidth = Bandwidth("cpu")  # measured on both sides of the round, as bench/decode.py brackets its runs
    bandwidth_samples.append(bandwidth.measure())
    forward_log.label = "ppo"
    rollouts: list = []
    reward_fn = reward_fn_for(args.ppo_reward, scorer, suffix, forward_log, rollouts)
    ppo, _ = timed(lambda on_step: train_ppo(model, tokenizer, prompts, reward_fn, ppo_config, on_step=on_step),
                   keep=ppo_timings)
    bandwidth_samples.append(bandwidth.measure())
    del bandwidth, scorer, reward_fn, reward_result
    gc.collect()

    forward_log.label = "dpo"
    log(f"dpo round: {len(pairs)} pairs")
    dpo, _ = timed(lambda on_step: train_dpo(model, pairs, [], dpo_config, on_step=on_step))
    gc.collect()
    return {"reward": (reward, reward_config), "ppo": (ppo, ppo_config), "dpo": (dpo, dpo_config),
            "ppo_rollouts": rollouts}


# --- the report -----------------------------------------------------------------------------------------


def spans(forwards: list[Forward], end: float) -> dict[str, float]:
    """Seconds per kind of pass: each run of consecutive forwards of one kind lasts from its first forward
    to the next run's first forward (the last run: to `end`), so a pass's packing, LM head, backward and
    optimizer steps count with its forwards."""
    out: dict[str, float] = {}
    runs = [i for i, f in enumerate(forwards) if i == 0 or forwards[i - 1].kind != f.kind]
    for k, i in enumerate(runs):
        stop = forwards[runs[k + 1]].start if k + 1 < len(runs) else end
        out[forwards[i].kind] = out.get(forwards[i].kind, 0.0) + stop - forwards[i].start
    return out


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def ratio(num: float, den: float) -> float | None:
    """num / den to 3 significant digits (a tiny model's ratios are small, not zero); None for den 0."""
    return float(f"{num / den:.3g}") if den > 0 else None


def pass_entry(cost: Cost, seconds: float | None, rates: dict[str, float], measured: dict | None) -> dict:
    limit = cost.limit_seconds(rates)
    entry = {
        "seconds": None if seconds is None else round(seconds, 3),
        "gflop": sig(cost.total / 1e9),
        "gflop_by_dtype": {k: sig(v / 1e9) for k, v in cost.by_dtype.items() if v},
        "gflop_by_kind": {k: sig(v / 1e9) for k, v in cost.by_kind.items()},
        "needed_tokens": cost.tokens.tokens, "attention_pairs": cost.tokens.keys,
        "lm_head_rows": cost.tokens.head_rows,
        "limit_s": sig(limit),
        "vs_limit": ratio(limit, seconds or 0.0),
        "achieved_gflops": None if not seconds else sig(cost.total / seconds / 1e9, 3),
    }
    if measured is not None:
        entry["processed"] = measured
        entry["padding_share"] = ratio(measured["tokens"] - cost.tokens.tokens, measured["tokens"])
    return entry


def round_entry(timed_round: Timed, costs: dict[str, Cost], forwards: list[Forward], names: dict[str, str],
                rates, seconds_of: dict[str, float] | None = None) -> dict:
    """A round's seconds, its parts (setup: before the first forward) and each pass against the limit."""
    end = timed_round.start + timed_round.seconds
    parts = {"setup": forwards[0].start - timed_round.start if forwards else timed_round.seconds}
    by_kind = spans(forwards, end)
    parts |= {names.get(k, k): v for k, v in by_kind.items()}
    seconds_of = parts | (seconds_of or {})
    kinds = {names.get(k, k): k for k in ("steps", "no_grad", "generate", "reward")}
    passes = {name: pass_entry(cost, seconds_of.get(name), rates,
                               processed(forwards, kinds[name]) if name in kinds else None)
              for name, cost in costs.items()}
    total = Cost()
    for cost in costs.values():
        for k, v in cost.by_kind.items():
            total.by_kind[k] += v
        for k, v in cost.by_dtype.items():
            total.by_dtype[k] = total.by_dtype.get(k, 0) + v
    limit = total.limit_seconds(rates)
    return {"seconds": round(timed_round.seconds, 2), "parts_s": {k: round(v, 3) for k, v in parts.items()},
            "gflop": sig(total.total / 1e9), "limit_s": sig(limit),
            "vs_limit": ratio(limit, timed_round.seconds), "passes": passes}


def generation_entry(shape, rollouts, config, forwards, generate_seconds, base_dtype, base_bytes, rates,
                     bandwidth, batch_rows) -> dict:
    limits = generation_limits(shape, rollouts, config, base_dtype, base_bytes, rates, bandwidth, batch_rows)
    decode = [f for f in forwards if f.kind == "generate" and f.cached > 0]
    prefill = [f for f in forwards if f.kind == "generate" and f.cached == 0]
    needed_steps = needed_row_steps = 0
    for prompts, replies in rollouts:
        for start in range(0, len(replies), batch_rows):
            ts = [trained_tokens(r, config.max_new_tokens) for r in replies[start:start + batch_rows]]
            needed_steps += max(ts) - 1
            needed_row_steps += sum(t - 1 for t in ts)
    row_steps = sum(f.rows for f in decode)
    return {
        "decode_steps": len(decode), "decode_steps_needed": needed_steps, "prefills": len(prefill),
        "decode_row_steps": row_steps, "decode_row_steps_needed": needed_row_steps,
        "finished_row_share": ratio(row_steps - needed_row_steps, row_steps),
        "s_per_decode_step": ratio(generate_seconds, len(decode)),
        "decoder_forward_s_per_decode_step": ratio(sum(f.end - f.start for f in decode), len(decode)),
        "bandwidth_limit_s_per_decode_step": ratio(limits["bandwidth_s"], len(decode)),
        "weight_bytes_per_step": shape.decode_bytes(base_bytes),
        **{k: sig(v) for k, v in limits.items()},
    }


def token_stats(lengths: list[int]) -> dict:
    return {"mean": round(sum(lengths) / len(lengths), 1), "min": min(lengths), "max": max(lengths)}


def facts(report: dict) -> list[str]:
    """where_the_rest_goes: measured facts, from the numbers in the report."""
    phases, out = report["phases"], []
    rates = report["matmul_gflops"]
    rate_text = ", ".join(f"{v:.0f} GFLOP/s {k}" for k, v in rates.items())
    for name in ("reward", "dpo"):
        entry = phases[name]
        steps = entry["passes"]["steps"]
        out.append(f"{name}: setup (model copy, LoRA wrap, bf16 weight copies) {entry['parts_s']['setup']:.2f} s of "
                   f"the {entry['seconds']:.1f} s round; its {steps['seconds']:.1f} s of steps ran at "
                   f"{steps['achieved_gflops']} GFLOP/s needed work ({rate_text} measured), {steps['vs_limit']} "
                   f"of the limit; decoder forwards were {steps['processed']['decoder_forward_s']:.1f} s of them, "
                   "the rest LM head, backward, optimizer and packing")
        out.append(f"{name}: steps processed {steps['processed']['tokens']} decoder tokens for "
                   f"{steps['needed_tokens']} real ones ({steps['padding_share']:.0%} padding)")
    for name in ("reward", "dpo", "ppo"):
        entry = phases[name]["passes"]["steps"]
        by_dtype = entry["gflop_by_dtype"]
        fp32 = by_dtype.get(FLOAT32, 0.0)
        if len(by_dtype) > 1 and fp32 and entry["limit_s"]:
            out.append(f"{name} steps: the float32 products (LoRA, attention, LM head) are "
                       f"{fp32 / entry['gflop']:.0%} of the FLOPs and "
                       f"{fp32 / rates[FLOAT32] / entry['limit_s']:.0%} of the limit's seconds")
    scoring = phases["reward"]["passes"]["scoring"]
    out.append(f"reward: the float32 scoring pass after training (PEFT's forward, for the reward statistics) took "
               f"{scoring['seconds']:.1f} s ({scoring['seconds'] / phases['reward']['seconds']:.0%} of the round), "
               f"{scoring['vs_limit']} of its float32 limit")
    ref = phases["dpo"]["passes"]["reference"]
    out.append(f"dpo: the reference pass took {ref['seconds']:.1f} s "
               f"({ref['seconds'] / phases['dpo']['seconds']:.0%} of the round), {ref['vs_limit']} of its limit")
    ppo = phases["ppo"]
    parts = ppo["parts_s"]
    out.append(f"ppo: of the {ppo['seconds']:.1f} s round, generating {report['ppo_generate_share']:.0%}, the reward "
               f"model {report['ppo_reward_share']:.0%}, scoring + training {report['ppo_train_share']:.0%} "
               f"(scoring pass {parts.get('scoring', 0):.1f} s, PPO epochs {parts.get('steps', 0):.1f} s)")
    gen = ppo["generation"]
    if gen["decode_steps"]:
        out.append(f"ppo generate: {gen['decode_steps']} decode steps ({gen['decode_row_steps']} row-steps, "
                   f"{gen['finished_row_share']:.0%} of them rows that had already stopped), "
                   f"{gen['s_per_decode_step'] * 1000:.0f} ms a step of which the decoder forward "
                   f"{gen['decoder_forward_s_per_decode_step'] * 1000:.0f} ms, against "
                   f"{gen['bandwidth_limit_s_per_decode_step'] * 1000:.1f} ms at the bandwidth limit "
                   f"({report['read_bandwidth_gbs']} GB/s)")
    for name, summary in (report.get("profile") or {}).items():
        if name == "settings":
            continue
        share = summary["share"]
        out.append(f"{name} profile ({summary['wall_s']:.1f} s under torch.profiler, {summary['ops']} ops): "
                   + ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in share.items()))
    return out


def build_report(shape, loaded, rounds, rates_runs, base_dtype, bandwidth_samples, forward_log, profile, data,
                 started, warmup_s) -> dict:
    from trainers import dpo as dpo_mod
    from trainers import ppo as ppo_mod
    from trainers import reward as reward_mod

    import torch

    # FLOP/s per dtype: the higher of the two measurements (the rate this machine showed it can reach).
    rates = {k: max(run["layer"][k] for run in rates_runs) for k in rates_runs[0]["layer"]}
    base_bytes = 2 if base_dtype in ("bfloat16", "float16") else 4
    pairs, prompts, suffix = data["pairs"], data["prompts"], data["suffix"]
    bandwidth = sum(bandwidth_samples) / len(bandwidth_samples) * 1e9

    reward, reward_config = rounds["reward"]
    dpo, dpo_config = rounds["dpo"]
    ppo, ppo_config = rounds["ppo"]
    rollouts = rounds["ppo_rollouts"]
    reward_suffix = len(suffix) if data["ppo_reward"] == "model" else None

    phases = {
        "reward": round_entry(reward, reward_costs(shape, pairs, reward_config.epochs, base_dtype),
                              forward_log.of("reward"), {"no_grad": "scoring"}, rates),
        "dpo": round_entry(dpo, dpo_costs(shape, pairs, dpo_config.epochs, base_dtype), forward_log.of("dpo"),
                           {"no_grad": "reference"}, rates),
    }
    timings = ppo.extra
    ppo_entry = round_entry(ppo, ppo_costs(shape, rollouts, ppo_config, base_dtype, reward_suffix),
                            forward_log.of("ppo"), {"no_grad": "scoring"}, rates,
                            seconds_of={"generate": timings["generate"], "reward": timings["reward"]})
    ppo_entry["trainer_s"] = {k: round(timings[k], 3) for k in ("seconds", "generate", "reward", "train")}
    ppo_entry["generation"] = generation_entry(shape, rollouts, ppo_config, forward_log.of("ppo"),
                                               timings["generate"], base_dtype, base_bytes, rates, bandwidth,
                                               ppo_mod.MAX_GENERATE_ROWS)
    ppo_entry["iterations"] = [{k: step[k] for k in ("step", "reply_length", "truncated_share", "kl", "score/mean")}
                               for step in timings["steps"]]
    phases["ppo"] = ppo_entry

    passes = ppo_entry["passes"]
    train_limit = passes["scoring"]["limit_s"] + passes["steps"]["limit_s"]
    gen = ppo_entry["generation"]
    round_s = ppo.seconds
    report = {
        "reward_round_seconds": phases["reward"]["seconds"],
        "reward_round_vs_limit": phases["reward"]["vs_limit"],
        "reward_steps_vs_limit": phases["reward"]["passes"]["steps"]["vs_limit"],
        "ppo_round_seconds": round(round_s, 2),
        "ppo_generate_share": ratio(timings["generate"], round_s),
        "ppo_reward_share": ratio(timings["reward"], round_s),
        "ppo_train_share": ratio(timings["train"], round_s),
        "ppo_train_vs_limit": ratio(train_limit, timings["train"]),
        "ppo_generate_vs_limit": ratio(gen["compute_s"], timings["generate"]),
        "ppo_generate_vs_bandwidth_limit": ratio(gen["bandwidth_s"], timings["generate"]),
        "ppo_generate_vs_roofline": ratio(gen["roofline_s"], timings["generate"]),
        "ppo_round_vs_limit": ppo_entry["vs_limit"],
        "dpo_round_seconds": phases["dpo"]["seconds"],
        "dpo_round_vs_limit": phases["dpo"]["vs_limit"],
        "dpo_steps_vs_limit": phases["dpo"]["passes"]["steps"]["vs_limit"],
        "goal_vs_limit": GOAL_VS_LIMIT,
    }
    training = {"reward_steps": report["reward_steps_vs_limit"], "ppo_train": report["ppo_train_vs_limit"],
                "dpo_steps": report["dpo_steps_vs_limit"]}
    report["goal_met"] = {k: v is not None and v >= GOAL_VS_LIMIT for k, v in training.items()}
    report |= {
        "matmul_gflops": {k: round(v / 1e9, 1) for k, v in rates.items()},
        "matmul_gflops_runs": {k: [round(run["layer"][k] / 1e9, 1) for run in rates_runs] for k in rates},
        "matmul_gflops_by_shape": {k: round(v / 1e9, 1) for k, v in rates_runs[-1]["by_shape"].items()},
        "lm_head_chunk_float32_gflops": round(max(run["lm_head_chunk_float32"] for run in rates_runs) / 1e9, 1),
        "base_matmul_dtype": base_dtype,
        "read_bandwidth_gbs": round(bandwidth / 1e9, 2),
        "bandwidth_samples_gbs": [round(b, 2) for b in bandwidth_samples],
        "phases": phases,
        "profile": profile,
    }
    replies = [len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    report["data"] = {
        "pairs": len(pairs), "prompt_tokens": token_stats([len(p.prompt_ids) for p in pairs]),
        "reply_tokens": token_stats(replies), "replies": "random non-special vocabulary tokens + the template's "
        f"end of turn ({len(suffix)} tokens)", "ppo_prompts": len(prompts),
        "ppo_prompt_tokens": token_stats([len(p) for p in prompts]), "ppo_reward": data["ppo_reward"],
        "ppo_rollout_reply_tokens": token_stats([len(r) for _, replies_ in rollouts for r in replies_]),
    }
    report["configs"] = {"reward": reward_mod.config_dict(reward_config), "ppo": ppo_mod.config_dict(ppo_config),
                         "dpo": dpo_mod.config_dict(dpo_config)}
    report["model"] = {"id": loaded.model_id, "frozen_product_params": shape.base_params,
                       "lora_params": shape.lora_params, "hidden": shape.hidden, "layers": shape.layers,
                       "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
                       "intermediate": shape.intermediate, "vocab": shape.vocab, "weight_bytes": loaded.weight_bytes}
    report["machine"] = {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                         "load_average_1_5_15_at_start": data["load_average"],
                         "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
                         "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    report["where_the_rest_goes"] = facts(report)
    report["warmup_seconds"] = round(warmup_s, 1)
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    load_average = [round(x, 2) for x in os.getloadavg()]  # other jobs on the machine slow every number down
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from playground.serving.models import load_model
    from trainers.dpo import DPOConfig
    from trainers.runtime import matmul_dtype

    loaded = load_model(args.model, "cpu", args.model_cache)
    model, tokenizer = loaded.model, loaded.tokenizer
    weights = next(model.parameters())
    # The trainers' own choice of product dtype (all three default to 'auto'), so the rate is of what runs.
    base_dtype = str(matmul_dtype(DPOConfig(), weights.device, weights.dtype) or weights.dtype).removeprefix("torch.")
    config = DPOConfig()
    shape = ModelShape.of(model, config.lora_r, config.target_modules)
    pairs, prompts, suffix = make_data(tokenizer, shape.vocab, args.pairs, args.prompts,
                                       QUICK_REPLY_TOKENS if args.quick else REPLY_TOKENS, args.seed)
    dtypes = sorted({FLOAT32, base_dtype})
    log(f"{loaded.model_id}: base products in {base_dtype}; measuring the matmul rate ({', '.join(dtypes)})")
    rates_runs = [matmul_rates(shape, dtypes)]

    forward_log = ForwardLog()
    handles = forward_log.attach(model.get_decoder())
    try:
        forward_log.label = "warmup"
        log("warm-up: one small round of each trainer")
        warm = time.perf_counter()
        small_rounds(loaded, pairs, prompts, suffix, args, forward_log, profile=False,
                     max_new_tokens=QUICK_MAX_NEW_TOKENS)
        warmup_s = time.perf_counter() - warm
        bandwidth_samples: list[float] = []
        rounds = run_rounds(loaded, pairs, prompts, suffix, args, forward_log, bandwidth_samples)
        profile = None
        if not args.no_profile:
            forward_log.label = "profile"
            log("profile: one small round of each trainer under torch.profiler")
            profile = small_rounds(loaded, pairs, prompts, suffix, args, forward_log, profile=True,
                                   max_new_tokens=ppo_config_for(len(prompts), args.quick).max_new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    rates_runs.append(matmul_rates(shape, dtypes))
    data = {"pairs": pairs, "prompts": prompts, "suffix": suffix, "ppo_reward": args.ppo_reward,
            "load_average": load_average}
    report = build_report(shape, loaded, rounds, rates_runs, base_dtype, bandwidth_samples, forward_log, profile,
                          data, started, warmup_s)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    from trainers.procenv import reexec_for_training

    # A scheduled round's malloc settings; OpenMP left spinning, since a benchmark has the CPU to itself
    # (unless --passive-openmp says it does not).
    reexec_for_training(passive_openmp="--passive-openmp" in sys.argv)
    main()
