"""How often each pair rule shows a pair the annotator ties on: v0's candidates, no training.

    python -m bench.pair_ties --golds concise keyword:word=here format --candidates 4 8

Samples --candidates replies (the most asked for) from v0 for --prompts training prompts, as bench.loop
does for its pair rules, then for each gold and candidate count K counts the prompts whose shown pair
the annotator (playground/sim/annotator.py, the gold's own ties) would tie on:

- `random`: the first two candidates, the plain loop;
- `most_different`: the two sharing the fewest words;
- `least_tie`: the two a tie model rates least likely to tie, the model fit on the annotator's votes on
  the first half's random pairs (one round's worth), counted on the second half only;
- `oracle`: a prompt all of whose K candidates tie with each other: no rule could show a judged pair.

A tie is a label that makes no training pair (store/pairs.py), so these counts bound how much a pair rule
can do for a taste that most pairs tie on. Prints one JSON line per gold and K, keys `ties_random`,
`ties_most_different`, `ties_oracle` (of --prompts), `ties_random_second_half`, `ties_least_tie` (of
the second half) and `tie_model_top` (the features the model weighs most toward "judged").
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_GOLDS = ("concise", "keyword:word=here", "format")
DEFAULT_PROMPTS = 96


def parse_args(argv=None) -> argparse.Namespace:
    from bench.loop import MAX_CANDIDATES

    p = argparse.ArgumentParser(prog="python -m bench.pair_ties", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--golds", nargs="+", default=list(DEFAULT_GOLDS))
    p.add_argument("--candidates", nargs="+", type=int, default=[4, 8], help="the K to count for (default 4 8)")
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("loop_args", nargs=argparse.REMAINDER,
                   help="after --: bench.loop flags for the sampling (e.g. -- --max-new-tokens 256 --model PATH)")
    args = p.parse_args(argv)
    if args.loop_args[:1] == ["--"]:
        args.loop_args = args.loop_args[1:]
    if args.prompts < 4:
        p.error("--prompts must be at least 4 (half of them fit the tie model, half count)")
    if any(not 2 <= k <= MAX_CANDIDATES for k in args.candidates):
        p.error(f"--candidates must each be between 2 and {MAX_CANDIDATES}")
    return args


def sample_candidates(args: argparse.Namespace, k: int) -> list[tuple[str, list[str]]]:
    """(prompt, k replies of v0) for --prompts training prompts drawn with --seed."""
    from bench.loop import Bench, split_prompts
    from bench.loop import parse_args as loop_args
    from playground.evaluation.evaluator import sample_seed

    largs = loop_args(["--gold", args.golds[0], *args.loop_args])
    bench = Bench(largs, args.golds[0], largs.model)
    _, train = split_prompts(largs)
    rng = random.Random(args.seed)
    texts = [rng.choice(train) for _ in range(args.prompts)]
    seeds = [[sample_seed(args.seed, i, j) for j in range(k)] for i in range(len(texts))]
    groups = bench.sample(bench.base, [bench.render(t) for t in texts], seeds)
    return [(t, [g.reply.text for g in group]) for t, group in zip(texts, groups)]


def count_ties(gold_spec: str, prompts: list[tuple[str, list[str]]], k: int) -> dict:
    from bench.loop import user
    from playground.metrics.pair_choice import TieModel, least_tie, most_different
    from playground.sim.annotator import CHOICE_TIE, Annotator, AnnotatorConfig

    annotator = Annotator(AnnotatorConfig(gold=gold_spec))

    def ties(prompt: str, a: str, b: str) -> bool:
        return annotator.judge(user(prompt), a, b).choice == CHOICE_TIE

    rows = [(prompt, replies[:k]) for prompt, replies in prompts]
    half = len(rows) // 2
    model = TieModel.fit([(r[0], r[1], ties(p, r[0], r[1])) for p, r in rows[:half]])
    second = rows[half:]
    return {"gold": gold_spec, "candidates": k, "prompts": len(rows),
            "ties_random": sum(ties(p, r[0], r[1]) for p, r in rows),
            "ties_most_different": sum(ties(p, *(r[i] for i in most_different(r))) for p, r in rows),
            "ties_oracle": sum(all(ties(p, r[i], r[j]) for i, j in combinations(range(k), 2)) for p, r in rows),
            "second_half": len(second),
            "ties_random_second_half": sum(ties(p, r[0], r[1]) for p, r in second),
            "ties_least_tie": sum(ties(p, *(r[i] for i in least_tie(r, model))) for p, r in second),
            "tie_model_top": model.top() if model else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = sample_candidates(args, max(args.candidates))
    for gold in args.golds:
        for k in args.candidates:
            print(json.dumps(count_ties(gold, prompts, k)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
