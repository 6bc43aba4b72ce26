"""Over-optimisation, reproduced: best-of-n and PPO against a learnt reward model, scored by the gold.

    python -m bench.overopt --gold concise --labels 128

Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization") in miniature, on the product's own
parts (`playground.metrics.overopt` has the formulas):

1. Labels: K pairs of v0 replies to training prompts (playground/sim/prompts.txt less the held-out
   ones), voted by a simulated annotator of the gold (playground/sim/annotator.py: Bradley-Terry at the
   gold's own tau, then 25% of votes flipped), tokenised as a round tokenises stored pairs.
2. The proxy: a reward model (trainers/reward.py) on the pairs of 3/4 of the label prompts; its accuracy
   on the pairs of the other quarter is reported with a 95% Wilson interval.
3. Best-of-n, n = 1, 2, 4, ... --max-n: MAX-N samples of v0 per held-out prompt, scored by the proxy and
   the gold; for each n the unbiased estimator over all C(MAX-N, n) subsets of those samples (not
   disjoint groups) of the gold and proxy of the proxy's pick. KL: the analytic log n - (n - 1) / n
   (`kl_source: "analytic"`; an upper bound where proxy scores tie).
4. PPO (trainers/ppo.py), --ppo-rounds rounds on the training prompts against the same reward model
   (normalised), each round warm-starting from the previous adapter; after each, --ppo-eval-samples
   replies per held-out prompt, with the exact KL to v0 summed over each reply (the evaluation's
   scoring: the logits the tokens were drawn from against v0's on the same tokens), proxy and gold.
   Round 0 is v0: the best-of-n samples themselves.
5. Gao's forms fitted by least squares through the origin to the gold gain over v0 (each prompt's mean
   gold minus its v0 mean, so the curves start at 0) in d = sqrt(KL): d (alpha - beta d) for best-of-n,
   d (alpha - beta log d) for PPO. The gold peak is "visible" when the point at the largest KL is below
   the best point by more than its own 95% interval (of the gain, paired over prompts).

Every mean is over held-out prompts (never used for labels or PPO rollouts) with a 95% Student t
interval over prompts (each prompt's mean first). One JSON object on stdout (and in --out); the points
go to the store's `overopt_points` (--db) for the dashboard. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Points go to the app's own store by default (--db): its Dashboard tab draws them; only `overopt_points` is
# written.
from store import DEFAULT_DB  # noqa: E402

# Sized for one gold on the bundled SmolLM2-135M on the 2-core CPU in about 20 minutes. Smoke runs on
# 2026-12-01 (--labels 32 --eval-prompts 4, the machine shared with other jobs, so these are slow ends):
# v0 sampled at 80-208 tokens/s, the reward model scored 6-9 replies/s, a PPO round of 2 x 16 rollouts
# took 64-204 s and its evaluation 8-26 s for 16 replies. The full run's costs: 24 x 64 best-of-n replies
# to sample (~72k tokens: 6-15 min) and score (3-4 min), 256 label replies (2-3 min), the reward model
# (1-3 min), 4 PPO rounds with their evaluations (6-15 min). --eval-prompts 16 takes a third off the
# best-of-n part.
DEFAULT_LABELS = 128
DEFAULT_EVAL_PROMPTS = 24
DEFAULT_MAX_N = 64
DEFAULT_PPO_ROUNDS = 4
# Each reply's length limit, for the labels, the best-of-n samples, PPO's rollouts and its evaluation
# alike. 48: sampling MAX-N replies per held-out prompt is the bench's main cost, and SmolLM2 writes
# 100-200 words unprompted, so at 48 tokens (~36 words) most replies are cut off; the ones that end
# sooner are what a length-shaped gold such as `concise` (25 words) tells apart.
DEFAULT_MAX_NEW_TOKENS = 48
# Replies per held-out prompt after each PPO round: the KL, proxy and gold means are over these.
DEFAULT_PPO_EVAL_SAMPLES = 4
# The share of label prompts whose pairs are held out to measure the reward model.
REWARD_HELD_OUT_SHARE = 0.25
# Rows decoded together, and seeds per job: the evaluation's measured sweet spot (past ~16 a CPU decode
# step is compute-bound; playground/evaluation/defaults.py).
BATCH_ROWS = 16
# What the bench changes in PPOConfig unless --ppo-config says otherwise. No truncation penalty: at 48
# tokens most replies are cut off, and Gao's question is what optimising the proxy alone does to the gold.
PPO_DEFAULTS = {"truncation_penalty": 0.0}
# A seed per (phase, prompt, sample), so each phase's draws are its own and repeat run to run.
PHASE_LABELS, PHASE_BEST_OF_N, PHASE_PPO_EVAL = 1, 2, 3
MAX_SAMPLES_PER_PROMPT = 1024
MAX_PROMPTS = 100_003


class BenchInputError(ValueError):
    """An input the bench cannot learn anything from; the message says what to change."""


def log(message: str) -> None:
    print(f"[overopt {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    from playground.serving.models import BUNDLED, DEFAULT_CACHE_DIR
    from playground.sim.gold import known_golds

    p = argparse.ArgumentParser(prog="python -m bench.overopt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gold", default="concise", help=f"the annotator's taste and the judge: {known_golds()}")
    p.add_argument("--labels", type=int, default=DEFAULT_LABELS, help="labelled pairs the reward model learns from")
    p.add_argument("--model", default=BUNDLED, help="as for app.py (default: %(default)s)")
    p.add_argument("--model-cache", default=DEFAULT_CACHE_DIR)
    p.add_argument("--eval-prompts", type=int, default=DEFAULT_EVAL_PROMPTS,
                   help="held-out prompts every point is measured on")
    p.add_argument("--max-n", type=int, default=DEFAULT_MAX_N,
                   help="best-of-n up to this n (samples per held-out prompt)")
    p.add_argument("--ppo-rounds", type=int, default=DEFAULT_PPO_ROUNDS,
                   help="PPO rounds, each from the last one's adapter")
    p.add_argument("--ppo-eval-samples", type=int, default=DEFAULT_PPO_EVAL_SAMPLES,
                   help="replies per held-out prompt after each PPO round")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--ppo-config", default="{}", help="JSON PPOConfig settings for every round (trainers/ppo.py); "
                   f"the bench's own defaults: {json.dumps(PPO_DEFAULTS)}, max_new_tokens = --max-new-tokens")
    p.add_argument("--reward-config", default="{}", help="JSON RewardConfig settings (trainers/reward.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--db", default=DEFAULT_DB,
                   help="SQLite store the points are added to; the app's, so its dashboard draws them (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--workdir", default=None, help="keep the PPO adapters here (default: a temp folder, removed)")
    args = p.parse_args(argv)
    if args.labels < 4:
        p.error(f"--labels must be at least 4 (some are held out to measure the reward model), got {args.labels}")
    if args.eval_prompts < 2:
        p.error(f"--eval-prompts must be at least 2 (intervals are over prompts), got {args.eval_prompts}")
    if not 1 <= args.max_n <= MAX_SAMPLES_PER_PROMPT:
        p.error(f"--max-n must be in [1, {MAX_SAMPLES_PER_PROMPT}], got {args.max_n}")
    if args.ppo_rounds < 0:
        p.error(f"--ppo-rounds must be >= 0, got {args.ppo_rounds}")
    if args.ppo_eval_samples < 1:
        p.error(f"--ppo-eval-samples must be >= 1, got {args.ppo_eval_samples}")
    return args


def best_of_n_sizes(max_n: int) -> list[int]:
    """1, 2, 4, ... up to max_n, and max_n itself when it is not a power of two."""
    sizes = [1 << k for k in range(max_n.bit_length()) if 1 << k <= max_n]
    return sizes if sizes[-1] == max_n else sizes + [max_n]


def sample_seed(base: int, phase: int, prompt: int, sample: int) -> int:
    return ((base * 8 + phase) * MAX_PROMPTS + prompt) * MAX_SAMPLES_PER_PROMPT + sample


def interval(values) -> tuple[float, list[float]]:
    """(mean, [low, high]): the 95% Student t interval over the values (one per prompt)."""
    from playground.metrics.intervals import mean_interval

    stats = mean_interval(values)
    return stats["mean"], [stats["lo"], stats["hi"]]


def _r(x, digits: int = 4):
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [_r(v, digits) for v in x]
    return round(float(x), digits) + 0.0  # + 0.0: no "-0.0" in the JSON


class OverOptBench:
    def __init__(self, args: argparse.Namespace):
        from playground.serving.models import load_model
        from playground.serving.policy import BASE_VERSION, PolicySnapshot
        from playground.serving.prompting import render
        from playground.sim.annotator import Annotator, AnnotatorConfig
        from playground.sim.gold import resolve_gold
        from playground.sim.prompt_file import load_prompts
        from trainers.ppo import PPOConfig
        from trainers.reward import RewardConfig
        from trainers.run import parse_config

        self.args = args
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        # Everything that can be wrong with the input is found before the model loads.
        self.gold = resolve_gold(args.gold)
        self.reward_config = parse_config(RewardConfig, args.reward_config, flag="--reward-config")
        parse_config(PPOConfig, args.ppo_config, flag="--ppo-config")  # names a bad setting as the user wrote it
        # The bench's defaults under the user's settings (parse_config's `extra` would override them).
        ppo_settings = {**PPO_DEFAULTS, "max_new_tokens": args.max_new_tokens, **json.loads(args.ppo_config)}
        self.ppo_config = parse_config(PPOConfig, json.dumps(ppo_settings), flag="--ppo-config")
        prompts = load_prompts()
        random.Random(args.seed).shuffle(prompts)
        if args.eval_prompts > len(prompts) - 2:
            raise BenchInputError(f"--eval-prompts {args.eval_prompts} leaves fewer than 2 of the {len(prompts)} "
                                  "prompts for labels and PPO: lower it")
        self.eval_texts = prompts[: args.eval_prompts]
        self.train_texts = prompts[args.eval_prompts:]
        self.annotator = Annotator(AnnotatorConfig(gold=args.gold, seed=args.seed), gold=self.gold)

        clock = time.perf_counter()
        self.loaded = load_model(args.model, "cpu", args.model_cache)
        self.tokenizer = self.loaded.tokenizer
        self.base = PolicySnapshot(BASE_VERSION, self.loaded.model, self.tokenizer, self.loaded.model_id)
        self.seconds["load"] = time.perf_counter() - clock
        self.render = lambda text: render(self.tokenizer, [{"role": "user", "content": text}])
        self.eval_ids = [self.render(t) for t in self.eval_texts]
        self.train_ids = [self.render(t) for t in self.train_texts]
        # PPO hands back prompt ids; the proxy scores the conversation they came from.
        self.context_of = {tuple(ids): [{"role": "user", "content": text}]
                           for ids, text in zip(self.train_ids + self.eval_ids, self.train_texts + self.eval_texts)}
        self.bench_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{self.gold.name.replace(':', '.')}-s{args.seed}"
        self.work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="overopt-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.scorer = None

    # -- sampling and scoring ---------------------------------------------------------------------------

    def settings(self):
        from playground.serving.generation import SamplingSettings

        # Temperature 1 and no top-p: the policy's own distribution, which the KL and best-of-n are of.
        return SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=self.args.max_new_tokens)

    def sample(self, snapshot, prompts: list[list[int]], per_prompt: int, phase: int, kl_to_v0: bool = False):
        """per_prompt replies to each prompt as [[SampledReply, ...], ...]; with kl_to_v0, also each
        reply's exact KL to v0 summed over its tokens, [[float, ...], ...] (else None); and the seconds
        spent {"sampling", "kl"}."""
        from playground.evaluation.sampling import Job, sample_probes
        from playground.evaluation.scoring import OwnDistribution, Workspace
        from playground.evaluation.targets import Target
        from playground.serving.generation import stop_token_ids

        target = Target.of(snapshot)
        base = Target.of(self.base) if kl_to_v0 else None
        jobs, owner = [], []
        for i, prompt in enumerate(prompts):
            seeds = [sample_seed(self.args.seed, phase, i, s) for s in range(per_prompt)]
            for first in range(0, per_prompt, BATCH_ROWS):  # a job's rows join the batch together
                owner.append((i, first))
                jobs.append(Job(len(jobs), prompt, seeds[first:first + BATCH_ROWS]))
        replies = [[None] * per_prompt for _ in prompts]
        kls = [[None] * per_prompt for _ in prompts] if kl_to_v0 else None
        waiting: dict[int, list] = {}
        workspace = Workspace()
        kl_s = 0.0

        def on_reply(reply) -> None:
            nonlocal kl_s
            i, first = owner[reply.probe_idx]
            replies[i][first + reply.sample] = reply.reply
            if not kl_to_v0:
                reply.logits = None
                return
            group = waiting.setdefault(reply.probe_idx, [])
            group.append(reply)
            if len(group) < len(jobs[reply.probe_idx].seeds):
                return
            del waiting[reply.probe_idx]
            clock = time.perf_counter()
            tokens = [r.reply.token_ids for r in group]
            mine = [r.logits for r in group]
            if any(m is None for m in mine):  # the HF path keeps no logits
                mine = target.branch_logits(prompts[i], tokens)
            for r, own, ref in zip(group, mine, base.branch_logits(prompts[i], tokens)):
                kls[i][first + r.sample] = OwnDistribution(own, workspace).kl_to(ref)
                r.logits = None
            kl_s += time.perf_counter() - clock

        stop_ids = stop_token_ids(self.tokenizer, snapshot.model)
        clock = time.perf_counter()
        sample_probes(target, jobs, self.settings(), stop_ids, BATCH_ROWS, on_reply)
        return replies, kls, {"sampling": time.perf_counter() - clock - kl_s, "kl": kl_s}

    def gold_scores(self, texts: list[str], replies) -> list[list[float]]:
        return [[self.gold.score([{"role": "user", "content": text}], r.text) for r in group]
                for text, group in zip(texts, replies)]

    def proxy_raw(self, items: list[tuple[str, str]]) -> list[float]:
        """The reward model's raw score of each (user message, reply text), in one batched pass, rendered as
        its training rows were (`RewardScorer.score_chats`)."""
        return self.scorer.score_chats(self.tokenizer, [([{"role": "user", "content": text}], reply)
                                                        for text, reply in items])

    def proxy_scores(self, texts: list[str], replies) -> list[list[float]]:
        flat = self.proxy_raw([(text, r.text) for text, group in zip(texts, replies) for r in group])
        out, at = [], 0
        for group in replies:
            out.append(flat[at:at + len(group)])
            at += len(group)
        return out

    # -- 1. labels -------------------------------------------------------------------------------------

    def label_pairs(self):
        from trainers.data import BoundaryError, PairSpec, tokenize
        from trainers.reward import MIN_REWARD_PAIRS

        k = self.args.labels
        # Each training prompt in turn (a fresh shuffle each pass), so labels spread over every prompt.
        rng = random.Random(self.args.seed + 1)
        picks: list[int] = []
        while len(picks) < k:
            order = list(range(len(self.train_texts)))
            rng.shuffle(order)
            picks += order
        picks = picks[:k]
        replies, _, _ = self.sample(self.base, [self.train_ids[i] for i in picks], 2, PHASE_LABELS)
        pairs, informative, boundary, ties = [], 0, 0, 0
        for index, (prompt, (a, b)) in enumerate(zip(picks, replies)):
            context = [{"role": "user", "content": self.train_texts[prompt]}]
            judgement = self.annotator.judge(context, a.text, b.text)
            informative += judgement.score_a != judgement.score_b
            if judgement.choice not in ("a", "b"):  # a tie (the gold scores both the same) makes no pair,
                ties += 1                            # as in the app's store
                continue
            chosen, rejected = (a.text, b.text) if judgement.choice == "a" else (b.text, a.text)
            spec = PairSpec(context=(("user", self.train_texts[prompt]),), chosen=chosen, rejected=rejected,
                            source="choice", conversation_id=prompt, turn_id=index, chosen_reply_id=None,
                            rejected_reply_id=None, policy_version="v0", feedback_ids=(index,))
            try:
                pairs.append((prompt, tokenize(self.tokenizer, spec)))
            except BoundaryError:
                boundary += 1
        if informative < MIN_REWARD_PAIRS:
            raise BenchInputError(
                f"gold {self.gold.spec!r} scored both replies of {k - informative} of the {k} labelled pairs the "
                f"same: only {informative} carry a preference (a reward model needs {MIN_REWARD_PAIRS}); every other "
                "vote is a tie that makes no pair. Pick a gold that tells this model's replies apart, or raise "
                "--labels")
        return pairs, {"pairs": k, "informative": informative, "ties": ties, "skipped_boundary": boundary}

    # -- 2. the reward model ---------------------------------------------------------------------------

    def fit_reward_model(self, pairs) -> dict:
        from trainers.reward import MIN_REWARD_PAIRS, train_reward

        # Held out by prompt, so the accuracy is on prompts the reward model never saw.
        prompts = sorted({p for p, _ in pairs})
        random.Random(self.args.seed + 2).shuffle(prompts)
        held = set(prompts[: max(1, round(REWARD_HELD_OUT_SHARE * len(prompts)))])
        train = [pair for p, pair in pairs if p not in held]
        held_out = [pair for p, pair in pairs if p in held]
        if len(train) < MIN_REWARD_PAIRS:
            raise BenchInputError(f"{len(train)} training pairs after holding out {len(held_out)}: a reward model "
                                  f"needs {MIN_REWARD_PAIRS}; raise --labels")
        result = train_reward(self.loaded.model, train, held_out, self.reward_config,
                              on_step=lambda m: log(f"reward model step {m['step']}/{m['total_steps']}: "
                                                    f"loss {m['loss']:.3f}"))
        self.scorer = result.scorer()
        held_stats = result.held_out
        return {"train_n": result.trained, "train_accuracy": _r(result.train.get("accuracy")),
                "held_out_n": held_stats["n"], "held_out_accuracy": _r(held_stats["accuracy"]),
                "ci": _r([held_stats["accuracy_lo"], held_stats["accuracy_hi"]]), "usable": result.usable,
                "score_mean": _r(result.mean), "score_std": _r(result.std), "seconds": _r(result.seconds, 1)}

    # -- 3. best-of-n ----------------------------------------------------------------------------------

    def best_of_n(self) -> tuple[list[dict], dict]:
        from playground.metrics.overopt import best_of_n, best_of_n_kl

        max_n = self.args.max_n
        replies, _, timing = self.sample(self.base, self.eval_ids, max_n, PHASE_BEST_OF_N)
        sample_s = timing["sampling"]
        clock = time.perf_counter()
        gold = self.gold_scores(self.eval_texts, replies)
        proxy = self.proxy_scores(self.eval_texts, replies)
        score_s = time.perf_counter() - clock
        baseline = [sum(g) / len(g) for g in gold]  # v0's gold per prompt: what every gain is measured from
        points = []
        for n in best_of_n_sizes(max_n):
            picks = [best_of_n(p, g, n) for p, g in zip(proxy, gold)]
            point = self._point(kl=best_of_n_kl(n), proxy=[p for p, _ in picks], gold=[g for _, g in picks],
                                baseline=baseline)
            points.append({"n": n, **point, "kl_source": "analytic"})
        tokens = sum(r.n_tokens for group in replies for r in group)
        self.v0 = {"replies": replies, "gold": gold, "proxy": proxy, "baseline": baseline}
        return points, {"sample": sample_s, "score": score_s, "tokens": tokens,
                        "tokens_per_s": tokens / sample_s if sample_s > 0 else None}

    def _point(self, kl, proxy, gold, baseline, kl_per_prompt=None) -> dict:
        kl_mean, kl_ci = (kl, [kl, kl]) if kl_per_prompt is None else interval(kl_per_prompt)
        proxy_mean, proxy_ci = interval(proxy)
        gold_mean, gold_ci = interval(gold)
        gain_mean, gain_ci = interval([g - b for g, b in zip(gold, baseline)])
        return {"kl": _r(kl_mean), "kl_ci": _r(kl_ci), "proxy": _r(proxy_mean), "proxy_ci": _r(proxy_ci),
                "gold": _r(gold_mean), "gold_ci": _r(gold_ci), "gold_gain": _r(gain_mean),
                "gold_gain_ci": _r(gain_ci), "n_prompts": len(gold)}

    # -- 4. PPO ----------------------------------------------------------------------------------------

    def ppo(self) -> tuple[list[dict], dict | None]:
        """The PPO points (round 0 is v0), and why the rounds stopped early (None when they all ran): an
        aborted round (trainers.ppo.PPOAborted) ends the curve where it is, with the points so far."""
        from trainers.ppo import PPOAborted, save_adapter, train_ppo

        v0 = self.v0
        per_prompt = lambda rows: [sum(r) / len(r) for r in rows]  # noqa: E731
        points = [{"round": 0, **self._point(0.0, per_prompt(v0["proxy"]), v0["baseline"], v0["baseline"],
                                             kl_per_prompt=[0.0] * len(v0["baseline"])),
                   "kl_source": "exact", "seconds": 0.0}]
        config, previous = self.ppo_config, None
        reward_fn = self.scorer.ppo_reward(self.tokenizer, self.context_of)
        for round_index in range(1, self.args.ppo_rounds + 1):
            clock = time.perf_counter()
            # A seed per round: a warm-started round should not redraw the last round's prompts and samples.
            config = dataclasses.replace(config, seed=self.ppo_config.seed + round_index - 1)
            try:
                result = train_ppo(self.loaded.model, self.tokenizer, self.train_ids, reward_fn, config,
                                   init_adapter_dir=previous,
                                   on_step=lambda m, r=round_index: log(
                                       f"ppo round {r} iteration {m['step']}/{m['total_steps']}: score "
                                       f"{m['score/raw_mean']:.3f}, kl {m['kl']:.3f}"))
            except PPOAborted as exc:
                log(f"ppo round {round_index} aborted: {exc}")
                return points, {"round": round_index, "reason": str(exc)}
            folder = save_adapter(result, self.work / f"ppo{round_index}")
            if config.adaptive_kl:  # the controller's beta carries over, as the next round of the loop would
                config = dataclasses.replace(config, kl_coef=result.kl_coef)
            timing = {"ppo": time.perf_counter() - clock, "ppo_generate": result.generate_seconds,
                      "ppo_reward": result.reward_seconds, "ppo_train": result.train_seconds}
            del result  # it holds a full copy of the base weights
            previous = folder
            clock = time.perf_counter()
            snapshot, cleanup = self._version(folder, f"ppo{round_index}")
            try:
                replies, kls, sampled = self.sample(snapshot, self.eval_ids, self.args.ppo_eval_samples,
                                                    PHASE_PPO_EVAL, kl_to_v0=True)
            finally:
                cleanup()
            timing |= {"eval_sampling": sampled["sampling"], "eval_kl": sampled["kl"]}
            scored = time.perf_counter()
            gold = per_prompt(self.gold_scores(self.eval_texts, replies))
            proxy = per_prompt(self.proxy_scores(self.eval_texts, replies))
            timing["eval_scoring"] = time.perf_counter() - scored
            timing["eval"] = time.perf_counter() - clock
            point = self._point(None, proxy, gold, v0["baseline"], kl_per_prompt=per_prompt(kls))
            tokens = [r.n_tokens for group in replies for r in group]
            points.append({"round": round_index, **point, "kl_source": "exact",
                           "mean_tokens": _r(sum(tokens) / len(tokens), 2),
                           "seconds": _r(timing["ppo"] + timing["eval"], 1),
                           "timing": {k: _r(v, 1) for k, v in timing.items()}})
            log(f"ppo round {round_index}: kl {point['kl']}, proxy {point['proxy']}, gold {point['gold']} "
                f"({timing['ppo']:.0f} s training, {timing['eval']:.0f} s evaluating)")
        return points, None

    def _version(self, folder: Path, version: str):
        """(snapshot, cleanup) of a PPO adapter: resident on the base model's decode engine (no copy of the
        weights), else a merged copy."""
        from playground.serving.adapters import merged_model
        from playground.serving.engine import AdapterUnsupported, read_adapter
        from playground.serving.generation import engine_for
        from playground.serving.policy import PolicySnapshot

        engine = engine_for(self.loaded.model)
        if engine is not None:
            name = f"{self.bench_id}:{version}"
            try:
                engine.add_adapter(name, *read_adapter(folder))
            except AdapterUnsupported:
                pass
            else:
                return (PolicySnapshot(version, self.loaded.model, self.tokenizer, self.loaded.model_id, adapter=name),
                        lambda: engine.remove_adapter(name))
        model = merged_model(self.loaded.model, folder)
        return PolicySnapshot(version, model, self.tokenizer, self.loaded.model_id), lambda: None

    # -- 5. the verdicts, the store ----------------------------------------------------------------------

    @staticmethod
    def verdicts(best: list[dict], ppo: list[dict]) -> dict:
        from playground.metrics.overopt import fit_gao, monotone, peak_visible

        def fit(points, form):
            params = fit_gao([math.sqrt(p["kl"]) for p in points], [p["gold_gain"] for p in points], form)
            if params is None:
                return None
            peak = params.pop("peak_sqrt_kl")
            return ({k: v if isinstance(v, int) else _r(v) for k, v in params.items()}
                    | {"peak_kl": _r(peak * peak if peak is not None else None)})

        def peak(points):
            return peak_visible([p["kl"] for p in points], [p["gold_gain"] for p in points],
                                [p["gold_gain_ci"][1] for p in points])

        def rising(points):
            return monotone([p["kl"] for p in points], [p["proxy"] for p in points])

        out = {"fit": {"best_of_n": fit(best, "best_of_n"), "ppo": fit(ppo, "rl")},
               "gold_peak_visible": {"best_of_n": peak(best), "ppo": peak(ppo)},
               "proxy_monotone": {"best_of_n": rising(best), "ppo": rising(ppo)}}
        return out

    def store_points(self, best: list[dict], ppo: list[dict]) -> None:
        from store import Store

        def row(method, x, p):
            return {"bench_id": self.bench_id, "model_id": self.loaded.model_id, "gold": self.gold.spec,
                    "reward_model": f"{self.bench_id}/rm", "method": method, "x": float(x), "kl": p["kl"],
                    "kl_low": p["kl_ci"][0], "kl_high": p["kl_ci"][1], "proxy": p["proxy"],
                    "proxy_low": p["proxy_ci"][0], "proxy_high": p["proxy_ci"][1], "gold_score": p["gold"],
                    "gold_low": p["gold_ci"][0], "gold_high": p["gold_ci"][1], "n_prompts": p["n_prompts"]}

        Path(self.args.db).parent.mkdir(parents=True, exist_ok=True)
        store = Store(self.args.db)
        try:
            store.add_overopt_points([row("best_of_n", p["n"], p) for p in best]
                                     + [row("ppo", p["round"], p) for p in ppo])
        finally:
            store.close()

    def run(self) -> dict:
        from trainers.ppo import config_dict as ppo_config_dict
        from trainers.reward import config_dict as reward_config_dict

        try:
            clock = time.perf_counter()
            log(f"labels: {self.args.labels} pairs of v0 replies, voted by {self.annotator.name}")
            pairs, label_counts = self.label_pairs()
            self.seconds["labels"] = time.perf_counter() - clock

            clock = time.perf_counter()
            log(f"reward model on {len(pairs)} pairs")
            reward_model = self.fit_reward_model(pairs)
            self.seconds["reward_model"] = time.perf_counter() - clock
            log(f"reward model: held-out accuracy {reward_model['held_out_accuracy']} {reward_model['ci']} "
                f"on {reward_model['held_out_n']} pairs")

            clock = time.perf_counter()
            log(f"best-of-n: {self.args.max_n} samples for each of {len(self.eval_ids)} held-out prompts")
            best, best_timing = self.best_of_n()
            self.seconds["best_of_n"] = time.perf_counter() - clock
            self.seconds["best_of_n_sampling"] = best_timing["sample"]
            self.seconds["best_of_n_scoring"] = best_timing["score"]

            clock = time.perf_counter()
            ppo, ppo_stopped = self.ppo()
            self.seconds["ppo"] = time.perf_counter() - clock
        finally:
            if not self.args.workdir:
                shutil.rmtree(self.work, ignore_errors=True)

        result = {
            "bench": "overopt", "bench_id": self.bench_id, "gold": self.gold.spec, "labels": self.args.labels,
            "model": self.loaded.model_id, "seed": self.args.seed,
            "settings": {"eval_prompts": len(self.eval_ids), "max_n": self.args.max_n,
                         "ppo_rounds": self.args.ppo_rounds, "ppo_eval_samples": self.args.ppo_eval_samples,
                         "max_new_tokens": self.args.max_new_tokens, "flip_rate": self.annotator.config.flip_rate,
                         "tau": self.annotator.tau, "best_of_n_estimator": "unbiased over all subsets of the samples",
                         "interval": "95% Student t over held-out prompts", "proxy_units": "raw reward-model score",
                         "gold_gain": "each prompt's mean gold minus its mean over v0's best-of-n samples",
                         "reward_config": reward_config_dict(self.reward_config),
                         "ppo_config": ppo_config_dict(self.ppo_config)},
            "label_data": label_counts, "reward_model": reward_model, "best_of_n": best, "ppo": ppo,
            "ppo_stopped": ppo_stopped,
            **self.verdicts(best, ppo),
            "throughput": {"best_of_n_tokens": best_timing["tokens"],
                           "best_of_n_tokens_per_s": _r(best_timing["tokens_per_s"], 1),
                           "v0_mean_tokens": _r(best_timing["tokens"] / (len(self.eval_ids) * self.args.max_n), 2)},
            "db": self.args.db,
        }
        self.store_points(best, ppo)
        self.seconds["total"] = time.perf_counter() - self.started
        result["seconds"] = {k: _r(v, 1) for k, v in self.seconds.items()}
        return result


def main(argv=None) -> int:
    import os

    from trainers.procenv import reexec_for_training

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if argv is None:  # run as a program: a training process's malloc settings (trainers/procenv.py)
        reexec_for_training(passive_openmp=False)  # one process, nothing else runs: let OpenMP spin
    from playground.sim.gold import GoldError

    try:
        result = OverOptBench(args).run()
    except (GoldError, BenchInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result)
    print(text, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
