"""The loop benchmark: does the loop move a policy toward a known taste, how fast, at what cost?

    python -m bench.loop --arm onpolicy --gold concise --rounds 4 --labels-per-round 64 --seed 0

Runs the product's loop without the web server - the same store, pair builder, round runner
(`trainers.run.run_round`, DPO), adapter publishing and merging - with a simulated annotator whose
taste is a gold function (playground/sim/gold.py) with label noise. Arms:

- `onpolicy`: each round samples its pairs from the live version (the product's loop);
- `offline`: the same number of labels, all sampled from v0 up front (a static dataset);
- `goodhart`: the annotator votes by gold + lambda x scale x (words / 100) while the report scores plain
  gold, to show over-optimisation of a proxy. The default lambda (-40) makes the proxy "shorter is
  better": it agrees with `concise` above the target length and keeps pushing below it, where gold falls.

Prints one JSON object per round (round 0 is v0): labels so far, gold win rate of vN against v0 on
held-out prompts with a 95% Wilson interval, mean gold, exact KL to v0 summed over the reply, reply
length, distinct-2, and wall time per phase.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARMS = ("onpolicy", "offline", "goodhart")
DEFAULT_EVAL_PROMPTS = 32
# Proxy bonus per 100 words, in units of the gold's own scale. With `concise` (scale 0.25) -40 costs 0.1
# per word: above the target the proxy ranks pairs as gold does, below it it still wants fewer words
# while gold wants more - the over-optimisation to watch. (+0.5, the old default, was so small next to
# gold that the proxy ranked almost every pair as gold did: nothing to over-optimise.)
DEFAULT_GOODHART_LAMBDA = -40.0
KL_BATCH = 8


def parse_args(argv=None) -> argparse.Namespace:
    from playground.serving.models import DEFAULT_CACHE_DIR
    from playground.sim.gold import known_golds

    p = argparse.ArgumentParser(prog="python -m bench.loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=ARMS, default="onpolicy")
    p.add_argument("--gold", default="concise", help=f"the annotator's taste: {known_golds()}")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--labels-per-round", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="bundled", help="as for app.py (default: %(default)s)")
    p.add_argument("--model-cache", default=DEFAULT_CACHE_DIR)
    p.add_argument("--eval-prompts", type=int, default=DEFAULT_EVAL_PROMPTS, help="held-out prompts for the report")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1: the policy itself)")
    p.add_argument("--flip-rate", type=float, default=0.25, help="label noise of the annotator")
    p.add_argument("--goodhart-lambda", type=float, default=DEFAULT_GOODHART_LAMBDA)
    p.add_argument("--config", default="{}", help="JSON DPO settings for every round (see trainers/dpo.py)")
    p.add_argument("--workdir", default=None, help="keep the store and adapters here (default: a temp folder)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.labels_per_round < 2 or args.eval_prompts < 2:
        p.error("--rounds >= 1, --labels-per-round >= 2 and --eval-prompts >= 2 are needed")
    return args


def proxy_gold(gold, lam: float):
    """gold + lam * scale * words/100: the goodhart arm's annotator also has a taste in length."""
    from playground.sim.gold import Gold, count_words

    return Gold(name=f"{gold.name}{lam:+g}xlength", fn=lambda c, r: gold.score(c, r) + lam * gold.scale * count_words(r) / 100,
                scale=gold.scale)


class LoopBench:
    def __init__(self, args: argparse.Namespace):
        import torch

        from playground.sim.annotator import Annotator, AnnotatorConfig
        from playground.sim.gold import resolve_gold
        from playground.serving.models import load_model
        from playground.sim.prompt_file import load_prompts
        from playground.serving.prompting import render
        from store import Store

        torch.manual_seed(args.seed)
        self.args = args
        self.gold = resolve_gold(args.gold)  # errors before anything starts
        vote_gold = proxy_gold(self.gold, args.goodhart_lambda) if args.arm == "goodhart" else self.gold
        self.annotator = Annotator(AnnotatorConfig(gold=args.gold, flip_rate=args.flip_rate, seed=args.seed),
                                   gold=vote_gold)
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix=f"loop-{args.arm}-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.work / "loop.db")
        self.loaded = load_model(args.model, "cpu", args.model_cache)
        self.tokenizer = self.loaded.tokenizer
        self.store.ensure_base_version(self.loaded.model_id)
        self.store.record_live(self.loaded.model_id, "v0", "start")
        prompts = load_prompts()
        random.Random(args.seed).shuffle(prompts)
        self.eval_prompts = prompts[: args.eval_prompts]
        self.train_prompts = prompts[args.eval_prompts:]
        if not self.train_prompts:
            raise SystemExit("no prompts left for training after the held-out set: lower --eval-prompts")
        self.render = lambda text: render(self.tokenizer, [{"role": "user", "content": text}])
        self.rng = random.Random(args.seed + 1)
        self.labels = 0
        self.version = "v0"

    def settings(self):
        from playground.serving.generation import SamplingSettings

        return SamplingSettings(temperature=self.args.temperature, top_p=1.0,
                                max_new_tokens=self.args.max_new_tokens)

    # -- data ---------------------------------------------------------------------------------------

    def sample_pairs(self, model, count: int, seed: int) -> list[tuple[str, str, str]]:
        from playground.serving.batch_sampling import sample_many

        texts = [self.rng.choice(self.train_prompts) for _ in range(count)]
        samples = sample_many(model, self.tokenizer, [self.render(t) for t in texts], 2, self.settings(), seed)
        return [(texts[i], samples[2 * i].text, samples[2 * i + 1].text) for i in range(count)]

    def label_and_store(self, pairs: list[tuple[str, str, str]], version: str) -> int:
        """The annotator votes on each pair; every vote is stored as the app would store it."""
        votes = 0
        for prompt, a, b in pairs:
            context = [{"role": "user", "content": prompt}]
            choice = self.annotator.vote(context, a, b)
            conversation = self.store.start_conversation("bench", self.annotator.name, self.loaded.model_id, "",
                                                         simulated=True)
            rows = [{"slot": slot, "text": text, "policy_version": version, "model_id": self.loaded.model_id,
                     "temperature": self.args.temperature, "top_p": 1.0, "max_new_tokens": self.args.max_new_tokens}
                    for slot, text in (("a", a), ("b", b))]
            turn_id, _ = self.store.record_turn(conversation, 0, context, prompt, rows)
            self.store.record_choice(turn_id, 0, choice, self.annotator.name, "bench")
            votes += 1
        return votes

    def train_round(self, round_index: int) -> dict:
        from trainers.run import parse_args as runner_args
        from trainers.run import run_round

        args = runner_args(["--db", str(self.work / "loop.db"), "--adapters-dir", str(self.work / "adapters"),
                            "--model", self.args.model, "--model-cache", self.args.model_cache,
                            "--min-new-pairs", "1", "--config", self.args.config,
                            "--trigger", f"bench-{self.args.arm}-{round_index}", "--no-progress"])
        _, summary = run_round(args)
        return summary

    # -- report -------------------------------------------------------------------------------------

    def evaluate(self, model, seed: int) -> dict:
        import torch

        from playground.serving.batch_sampling import sample_many
        from trainers.metrics import distinct_n, kl_per_reply

        prompt_ids = [self.render(t) for t in self.eval_prompts]
        samples = sample_many(model, self.tokenizer, prompt_ids, 1, self.settings(), seed)
        scores = [self.gold.score([{"role": "user", "content": self.eval_prompts[s.prompt_index]}], s.text)
                  for s in samples]
        kls = []
        for start in range(0, len(samples), KL_BATCH):
            chunk = samples[start : start + KL_BATCH]
            rows = [prompt_ids[s.prompt_index] + s.token_ids for s in chunk]
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            target = torch.zeros(len(rows), width, dtype=torch.bool)
            for i, (row, s) in enumerate(zip(rows, chunk)):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
                target[i, len(prompt_ids[s.prompt_index]) : len(row)] = True
            kls += kl_per_reply(model, self.loaded.model, ids, target, mask).tolist() if model is not self.loaded.model \
                else [0.0] * len(rows)
        return {"scores": scores, "texts": [s.text for s in samples], "kl": sum(kls) / len(kls),
                "mean_tokens": sum(len(s.token_ids) for s in samples) / len(samples),
                "distinct_2": distinct_n([s.text for s in samples], 2),
                "proxy": [self.annotator.score([{"role": "user", "content": self.eval_prompts[s.prompt_index]}],
                                               s.text) for s in samples]}

    def report(self, round_index: int, result: dict, baseline: dict, seconds: dict, extra: dict) -> dict:
        from trainers.metrics import win_rate

        rate, interval = win_rate(result["scores"], baseline["scores"])
        line = {
            "arm": self.args.arm, "gold": self.gold.spec, "round": round_index, "version": self.version,
            "labels": self.labels, "gold_win_rate": round(rate, 4),
            "gold_win_rate_ci": [round(interval[0], 4), round(interval[1], 4)],
            "gold_mean": round(sum(result["scores"]) / len(result["scores"]), 4),
            "kl_to_v0": round(result["kl"], 4), "mean_tokens": round(result["mean_tokens"], 2),
            "distinct_2": round(result["distinct_2"], 4), "seconds": {k: round(v, 2) for k, v in seconds.items()},
            **extra,
        }
        if self.args.arm == "goodhart":
            line["proxy_mean"] = round(sum(result["proxy"]) / len(result["proxy"]), 4)
        print(json.dumps(line), flush=True)
        return line

    def run(self) -> list[dict]:
        from playground.serving.adapters import load_version

        eval_seed = self.args.seed + 1000  # the same eval draws every round: differences are the policy's
        started = time.perf_counter()
        baseline = self.evaluate(self.loaded.model, eval_seed)
        reference = self.evaluate(self.loaded.model, eval_seed + 1)  # v0 against itself: what chance looks like
        lines = [self.report(0, reference, baseline, {"eval": time.perf_counter() - started}, {})]
        model, last = self.loaded.model, reference
        offline_pool = []
        if self.args.arm == "offline":
            t = time.perf_counter()
            offline_pool = self.sample_pairs(model, self.args.rounds * self.args.labels_per_round, self.args.seed)
            offline_sample_s = time.perf_counter() - t
        for round_index in range(1, self.args.rounds + 1):
            seconds = {}
            t = time.perf_counter()
            if self.args.arm == "offline":
                k = self.args.labels_per_round
                pairs = offline_pool[(round_index - 1) * k : round_index * k]
                seconds["sample"] = offline_sample_s / self.args.rounds
                source = "v0"
            else:
                pairs = self.sample_pairs(model, self.args.labels_per_round, self.args.seed + round_index)
                seconds["sample"] = time.perf_counter() - t
                source = self.version
            t = time.perf_counter()
            self.labels += self.label_and_store(pairs, source)
            seconds["label"] = time.perf_counter() - t
            t = time.perf_counter()
            summary = self.train_round(round_index)
            seconds["train"] = time.perf_counter() - t
            if summary["status"] != "succeeded":
                # The live version did not change: report it again, with why the round gave nothing.
                lines.append(self.report(round_index, last, baseline, seconds,
                                         {"round_status": summary["status"], "reason": summary["reason"]}))
                continue
            t = time.perf_counter()
            self.version = summary["version"]
            _, model = load_version(self.loaded.model, self.work / "adapters" / self.version, self.loaded.model_id)
            self.store.record_live(self.loaded.model_id, self.version, "promote", "bench")
            seconds["load"] = time.perf_counter() - t
            t = time.perf_counter()
            result = last = self.evaluate(model, eval_seed)
            seconds["eval"] = time.perf_counter() - t
            held_out = (summary.get("metrics") or {}).get("held_out_after") or {}
            lines.append(self.report(round_index, result, baseline, seconds, {
                "round_pairs": summary.get("n_pairs"), "held_out_accuracy": held_out.get("accuracy")}))
        return lines


def main(argv=None) -> int:
    import os

    from trainers.procenv import reexec_for_training

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if argv is None:  # run as a program: a scheduled round's process settings (trainers/procenv.py)
        reexec_for_training(passive_openmp=False)  # one process, nothing else runs: let OpenMP spin
    from playground.sim.gold import GoldError

    try:
        LoopBench(args).run()
    except GoldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
