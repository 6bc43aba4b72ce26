"""How lucky is one v0 draw? Scores v0's held-out replies from a multi-draw --v0-cache under each gold.

    python -m bench.v0_luck bench/sweep_results_draws2.v0-cache --draws 2 --golds concise keyword:word=here format

bench.loop compares every version of a run with v0's replies to the held-out prompts. With one draw per
prompt (--eval-draws 1) that is one sample of v0, and its luck on a gold is shared by every version
compared with it: a version that has moved away from v0 answers from independent draws, so it regresses
to v0's mean and looks worse (or better) by that luck. A run with --eval-draws K keeps K draws per prompt
for the comparison seeds and K for the reference seeds (two files in its --v0-cache folder, prompt-major).
For each file and gold this prints each draw's gold mean, and each file's draw 0 (the one a single-draw
run compares with) minus the mean of every other draw in the folder, per prompt, with a paired bootstrap
95% interval: an interval away from zero is a lucky (or unlucky) single draw.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loop import BOOTSTRAP_SAMPLES, DEFAULT_EVAL_FILE, DEFAULT_EVAL_PROMPTS, user  # noqa: E402


def read_draws(folder: Path, draws: int, prompts: int) -> dict[str, list[list[str]]]:
    """{file name: its `draws` lists of one reply per prompt}; a file of another size is an error."""
    files = sorted(folder.glob("v0-*.json"))
    if not files:
        raise SystemExit(f"error: {folder} has no v0-*.json files (bench.loop --v0-cache writes them)")
    out = {}
    for path in files:
        texts = json.loads(path.read_text())["texts"]
        if len(texts) != draws * prompts:
            raise SystemExit(f"error: {path} holds {len(texts)} replies, not {prompts} prompts x {draws} draws: "
                             "pass the --eval-draws and --eval-prompts of the run that wrote it")
        out[path.name] = [texts[k::draws] for k in range(draws)]
    return out


def luck(scores: dict[str, list[list[float]]], seed: int = 0) -> dict[str, dict]:
    """Per file: each draw's mean, and draw 0 minus the mean of every other draw of every file, per prompt
    (a paired bootstrap over prompts: {"diff", "lo", "hi", "n"})."""
    from playground.metrics import paired_bootstrap

    out = {}
    for name, own in scores.items():
        others = [draw for other, draws in scores.items() for k, draw in enumerate(draws)
                  if not (other == name and k == 0)]
        if not others:
            raise ValueError("one draw in all: nothing to compare it with (run bench.loop with --eval-draws 2 or more)")
        rest = [sum(values) / len(values) for values in zip(*others)]
        diff = paired_bootstrap(own[0], rest, n_boot=BOOTSTRAP_SAMPLES, seed=seed)
        out[name] = {"draw_means": [round(sum(d) / len(d), 4) for d in own],
                     "draw0_minus_rest": round(diff["diff"], 4), "ci": [round(diff["lo"], 4), round(diff["hi"], 4)],
                     "prompts": diff["n"]}
    return out


def main(argv=None) -> int:
    from playground.sim.gold import GoldError, resolve_gold
    from playground.sim.prompt_file import load_prompts

    p = argparse.ArgumentParser(prog="python -m bench.v0_luck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a --v0-cache folder written by a bench.loop run with --eval-draws 2 or more")
    p.add_argument("--draws", type=int, required=True, help="that run's --eval-draws")
    p.add_argument("--eval-prompts", type=int, default=DEFAULT_EVAL_PROMPTS)
    p.add_argument("--eval-file", default=str(DEFAULT_EVAL_FILE))
    p.add_argument("--golds", nargs="+", default=["concise", "keyword:word=here", "format"])
    args = p.parse_args(argv)
    if args.draws < 2:
        p.error("--draws must be 2 or more: one draw has nothing to be compared with")
    prompts = load_prompts(args.eval_file)[: args.eval_prompts]
    draws = read_draws(Path(args.folder), args.draws, len(prompts))
    for spec in args.golds:
        try:
            gold = resolve_gold(spec)
        except GoldError as exc:
            p.error(str(exc))
        scores = {name: [[gold.score(user(q), t) for q, t in zip(prompts, draw)] for draw in file_draws]
                  for name, file_draws in draws.items()}
        print(json.dumps({"gold": gold.spec, "files": luck(scores)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
