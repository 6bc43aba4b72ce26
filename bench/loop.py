"""The loop benchmark: does the loop move a policy toward a known taste, how fast, at what cost?

    python -m bench.loop --arm onpolicy --gold concise --rounds 4 --labels-per-round 64 --seed 0 --workdir /tmp/on
    python -m bench.loop --arm offline --gold concise --rounds 4 --labels-per-round 64 --seed 0 --workdir /tmp/off
    python -m bench.loop --head-to-head /tmp/on /tmp/off      # the two final versions, scored against each other

Runs the product's loop without the web server - the same store, pair builder, round runner
(`trainers.run.run_round`, DPO), adapter publishing, and versions served as adapters on the base model's
decode engine - with a simulated annotator whose taste is a gold function (playground/sim/gold.py) with
label noise. Arms:

- `onpolicy`: each round samples its pairs from the live version (the product's loop);
- `offline`: the same number of labels, all sampled from v0 up front (a static dataset);
- `goodhart`: the annotator votes by gold + lambda x scale x (words / 100) while the report scores plain
  gold, to show over-optimisation of a proxy. The default lambda (-40) makes the proxy "shorter is
  better": it agrees with `concise` above the target length and keeps pushing below it, where gold falls.

The evaluation is paired, so that a change can be told from chance. Every version answers the same
held-out prompts (the first --eval-prompts of --eval-file, none of them a training prompt) from the same
seed per prompt, sampled in batches on the decode engine by the app's evaluation sampler
(playground/evaluation/sampling.py). That sampler draws each token from one uniform number of the row's
own generator, so where vN and v0 still agree they write the same words: the per-prompt difference
gold(vN) - gold(v0) is mostly the policy's change, not sampling noise. Its mean over prompts,
`gold_mean_diff`, comes with a paired bootstrap 95% interval (prompts resampled; `gold_mean_diff_ci`)
next to the win rate and its Wilson interval. With --eval-draws K every version answers each prompt K
times, from the same K seeds for every version, and a prompt's score is the mean of its K: a version that
has moved away from v0 is then compared with v0's mean over K draws, not with the luck of one.

Prints one JSON object per round (round 0 is v0 against itself from other seeds: what chance looks like
on this eval set): labels so far, gold win rate of vN against v0 [95% Wilson], gold mean, gold_mean_diff
[95% paired bootstrap], eval_prompts, exact KL to v0 summed over the reply, reply length, distinct-2,
the round's ties and how often its votes agreed with the annotator's gold, and wall time per phase. Then
one summary object ({"summary": true, ...}) with the headline number, `labels_to_significance`: the
labels after which the gold_mean_diff interval first lies above zero, with the KL to v0 there (null if
never), and `labels_to_held_significance`: the same for a crossing every later round stays above zero
for (null when the last round is not above zero). The runs' settings and lines are kept in
WORKDIR/bench-loop.json, which --head-to-head reads.

Which pair the annotator judges: `--pair-rule random` (two samples, the plain loop), `least_separated`,
`most_different` or `least_tie` (each training prompt gets --candidates samples and the rule picks two: the
pair the live version's implicit reward separates least, the two sharing the fewest words, or the two a
tie model fit on the annotator's votes so far rates least likely to tie; playground/metrics/
pair_choice.py). Every line names its rule; under `least_tie` each round also names the features the
tie model found most telling (`round_tie_model_top`).

With `--edit-rate R` the annotator also does what the chat's "better reply" box does: after a vote,
with chance R, it writes the gold's improvement of the better reply (concise: cut at a sentence end near
the target; keyword: the word up front; format: a list), stored as the app stores an edit, which gives
the round (edit, A) and (edit, B). Each edit is one label, so a round's labels are its votes and edits
together; its line names the edits (`round_edits`). The clicks keep --flip-rate's noise; an edit is
written to the gold.

A gold that gives every one of v0's held-out replies the same score is refused before any label is
given: its annotator would tie every pair (playground/sim/annotator.py), leaving nothing to learn.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playground.metrics.pair_choice import PAIR_RULES  # noqa: E402 - after the path set-up above

ARMS = ("onpolicy", "offline", "goodhart")
# The held-out prompts: bench.loop's own file, apart from the training prompts (the autopilot's).
DEFAULT_EVAL_FILE = Path(__file__).resolve().parent / "loop_eval_prompts.txt"
# 32 prompts gave intervals of +-0.16 on the win rate, wider than any effect the loop makes in 4 rounds;
# 128 paired prompts halve that, and pairing narrows the gold-mean difference's interval further.
DEFAULT_EVAL_PROMPTS = 128
BOOTSTRAP_SAMPLES = 2000  # resamples of the eval prompts for each gold_mean_diff interval
# Replies per held-out prompt and version (--eval-draws). One draw pairs vN with v0 exactly where they
# still agree, but once vN has moved, its reply and v0's are two independent draws, and every version of
# a run is compared with the same single v0 draw: its luck is shared by all of them (on `format` a second
# v0 draw scored -0.045 against the first, docs/BENCHMARKS.md). K draws from the same K seeds per prompt
# keep the pairing and shrink that shared luck by sqrt(K), at K times the evaluation's cost.
DEFAULT_EVAL_DRAWS = 1
MAX_EVAL_DRAWS = 8
# Proxy bonus per 100 words, in units of the gold's own scale. With `concise` (scale 0.25) -40 costs 0.1
# per word: above the target the proxy ranks pairs as gold does, below it it still wants fewer words
# while gold wants more - the over-optimisation to watch. (+0.5, the old default, was so small next to
# gold that the proxy ranked almost every pair as gold did: nothing to over-optimise.)
DEFAULT_GOODHART_LAMBDA = -40.0
# A pair rule other than random picks among this many replies per prompt: enough choice to matter, at twice
# a plain pair's sampling cost.
DEFAULT_CANDIDATES = 4
MAX_CANDIDATES = 16
# --edit-rate: by default the annotator only clicks (every kept result ran so). An edit is the chat's
# "better reply" (playground/chat.py ChatService.edit): a person's own text, stored as the app stores it,
# which the pair rules turn into (edit, A) and (edit, B) (store/pairs.py). It costs a label like a vote:
# a round of --labels-per-round labels stops when its votes and edits have spent them, so a run with edits
# is charged for every action the person took.
DEFAULT_EDIT_RATE = 0.0
RUN_FILE = "bench-loop.json"  # in the workdir: the run's settings and every line printed


class BenchInputError(ValueError):
    """Settings or files the benchmark cannot run with; the message says what to change."""


def parse_args(argv=None) -> argparse.Namespace:
    from playground.serving.models import DEFAULT_CACHE_DIR
    from playground.sim.gold import known_golds
    from playground.sim.prompt_file import PromptFileError, load_prompts

    p = argparse.ArgumentParser(prog="python -m bench.loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=ARMS, default="onpolicy")
    p.add_argument("--gold", default="concise", help=f"the annotator's taste: {known_golds()}")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--labels-per-round", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="bundled", help="as for app.py (default: %(default)s)")
    p.add_argument("--model-cache", default=DEFAULT_CACHE_DIR)
    p.add_argument("--eval-prompts", type=int, default=DEFAULT_EVAL_PROMPTS,
                   help="held-out prompts every version answers, the first of --eval-file (default: %(default)s)")
    p.add_argument("--eval-file", default=str(DEFAULT_EVAL_FILE),
                   help="the held-out prompts, one a line (default: bench/loop_eval_prompts.txt); any that is also "
                        "a training prompt is taken out of training")
    p.add_argument("--eval-draws", type=int, default=DEFAULT_EVAL_DRAWS,
                   help="replies per held-out prompt and version, each from its own seed (the same seeds for every "
                        "version); a prompt's score is their mean. More draws narrow the interval and shrink the "
                        "luck of v0's one draw, at that many times the evaluation's cost (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1: the policy itself)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling of the pairs and the evaluation (1: off; the chat samples at 0.95)")
    p.add_argument("--flip-rate", type=float, default=0.25, help="label noise of the annotator")
    p.add_argument("--tau", type=float, default=None,
                   help="the annotator's Bradley-Terry temperature (default: the gold's own scale; 1 for your own "
                        "function, which is too flat for a score in [0, 1] whose pairs differ by 0.1)")
    p.add_argument("--goodhart-lambda", type=float, default=DEFAULT_GOODHART_LAMBDA)
    p.add_argument("--config", default="{}", help="JSON DPO settings for every round (see trainers/dpo.py)")
    p.add_argument("--replay-ratio", type=float, default=None,
                   help="older pairs replayed per new pair in each round (default: the app's, trainers/defaults.py)")
    p.add_argument("--pair-rule", choices=PAIR_RULES, default="random",
                   help="which two of --candidates sampled replies the annotator judges (playground/metrics/"
                        "pair_choice.py): random, least_separated (closest implicit rewards under the live "
                        "version), most_different (fewest shared words) or least_tie (least likely to tie, "
                        "by a tie model fit on the votes so far) (default: %(default)s)")
    p.add_argument("--edit-rate", type=float, default=DEFAULT_EDIT_RATE,
                   help="chance that after a vote the annotator also writes a better reply (an edit: the gold's "
                        "own improvement of the better one); each edit costs one label (default: %(default)s)")
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                   help="replies sampled per training prompt when --pair-rule is not random (default: %(default)s)")
    p.add_argument("--workdir", default=None, help="keep the store and adapters here (default: a temp folder)")
    p.add_argument("--v0-cache", default=None, metavar="DIR",
                   help="keep v0's held-out replies here and reuse them in later runs of the same model, prompts, "
                        "seeds and sampling (bench.sweep passes one: two of a 2-round run's four evaluations)")
    p.add_argument("--head-to-head", nargs=2, metavar=("WORKDIR_A", "WORKDIR_B"), default=None,
                   help="score the final version of run A against run B's (each a --workdir of a finished run, "
                        "e.g. the onpolicy and offline arms, Guo et al. 2024) on the eval prompts, and exit")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.labels_per_round < 2 or args.eval_prompts < 2:
        p.error("--rounds >= 1, --labels-per-round >= 2 and --eval-prompts >= 2 are needed")
    if args.replay_ratio is not None and not args.replay_ratio >= 0:
        p.error(f"--replay-ratio must be 0 or more, got {args.replay_ratio}")
    if not 1 <= args.eval_draws <= MAX_EVAL_DRAWS:
        p.error(f"--eval-draws must be between 1 and {MAX_EVAL_DRAWS}, got {args.eval_draws}")
    if not 2 <= args.candidates <= MAX_CANDIDATES:
        p.error(f"--candidates must be between 2 and {MAX_CANDIDATES}, got {args.candidates}")
    if not 0 <= args.edit_rate <= 1:
        p.error(f"--edit-rate must be between 0 and 1, got {args.edit_rate}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.tau is not None and not args.tau > 0:
        p.error(f"--tau must be > 0 (a score gap of tau is a 73%% preference), got {args.tau}")
    try:
        available = len(load_prompts(args.eval_file))
    except PromptFileError as exc:
        p.error(f"--eval-file: {exc}")
    if args.eval_prompts > available:
        p.error(f"--eval-prompts {args.eval_prompts} is more than the {available} prompts in {args.eval_file}: "
                f"lower --eval-prompts to at most {available}, or pass a longer --eval-file")
    return args


def proxy_gold(gold, lam: float):
    """gold + lam * scale * words/100: the goodhart arm's annotator also has a taste in length."""
    from playground.sim.gold import Gold, count_words

    return Gold(name=f"{gold.name}{lam:+g}xlength", fn=lambda c, r: gold.score(c, r) + lam * gold.scale * count_words(r) / 100,
                scale=gold.scale)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Bench:
    """What a run and a head-to-head share: the base model, its engine, the sampler, the gold."""

    def __init__(self, args: argparse.Namespace, gold_spec: str, model: str):
        import torch

        from playground.evaluation.targets import Target
        from playground.serving.generation import stop_token_ids
        from playground.serving.models import load_model
        from playground.serving.policy import PolicyHolder
        from playground.serving.prompting import render
        from playground.sim.annotator import Annotator, AnnotatorConfig
        from playground.sim.gold import resolve_gold

        torch.manual_seed(args.seed)
        self.args = args
        self.gold = resolve_gold(gold_spec)  # errors before anything starts
        vote_gold = proxy_gold(self.gold, args.goodhart_lambda) if args.arm == "goodhart" else self.gold
        self.annotator = Annotator(AnnotatorConfig(gold=gold_spec, flip_rate=args.flip_rate, tau=args.tau,
                                                   seed=args.seed), gold=vote_gold)
        self.loaded = load_model(model, "cpu", args.model_cache)
        self.tokenizer = self.loaded.tokenizer
        # Versions are served as the app serves them: adapters applied per row on the base model's engine
        # (one copy of the weights), or a merged copy where the engine cannot apply one.
        self.policy = PolicyHolder(self.loaded, per_row_adapters=True)
        self.base = Target.of(self.policy.base)
        self.stop_ids = stop_token_ids(self.tokenizer, self.loaded.model)
        self.render = lambda text: render(self.tokenizer, user(text))

    def settings(self):
        from playground.serving.generation import SamplingSettings

        return SamplingSettings(temperature=self.args.temperature, top_p=self.args.top_p,
                                max_new_tokens=self.args.max_new_tokens)

    def sample(self, target, prompt_ids: list[list[int]], seeds: list[list[int]], keep=None) -> list[list]:
        """Each prompt's replies (`ProbeReply`, in the order of its seeds), sampled in batches on the engine.
        `keep(index, replies)` runs once a prompt's replies are all in, while their logits are still there
        (the KL needs them); they are dropped after it, so memory holds a batch's logits, not the run's."""
        from playground.evaluation.defaults import EVAL_BATCH_ROWS
        from playground.evaluation.sampling import Job, sample_probes

        jobs = [Job(i, ids, list(s)) for i, (ids, s) in enumerate(zip(prompt_ids, seeds))]
        done: dict[int, list] = {}

        def on_reply(reply) -> None:
            group = done.setdefault(reply.probe_idx, [None] * len(jobs[reply.probe_idx].seeds))
            group[reply.sample] = reply
            if all(r is not None for r in group):
                if keep is not None:
                    keep(reply.probe_idx, group)
                for r in group:
                    r.logits = None

        sample_probes(target, jobs, self.settings(), self.stop_ids, EVAL_BATCH_ROWS, on_reply)
        return [done[i] for i in range(len(jobs))]

    def version_target(self, version: str, folder: Path):
        from playground.evaluation.targets import Target
        from playground.serving.adapters import version_snapshot

        snapshot = version_snapshot(self.policy, version, folder)
        self.policy.set_live(snapshot)
        return Target.of(snapshot)


class Evaluation:
    """Samples and scores versions on the held-out prompts, each prompt from the same seed for every version."""

    def __init__(self, bench: Bench, texts: list[str]):
        self.bench = bench
        self.texts = texts
        self.prompt_ids = [bench.render(t) for t in texts]
        self.draws = bench.args.eval_draws  # replies per prompt and version (--eval-draws)
        self._weights: str | None = None  # the base weights' fingerprint, for --v0-cache

    def run(self, target, seed_base: int) -> dict:
        """--eval-draws replies per prompt from `target`: each prompt's gold and proxy score (the mean over its
        draws), KL to v0 (exact, along the reply), length. Draw k of prompt i has the seed
        sample_seed(seed_base, i, k) for every version, so draw 0 is the one a single-draw run samples."""
        from playground.evaluation.evaluator import sample_seed
        from playground.evaluation.scoring import OwnDistribution, Workspace
        from trainers.metrics import distinct_n

        bench = self.bench
        kls = [0.0] * len(self.texts)
        workspace = Workspace()

        def kl(index: int, replies: list) -> None:
            if target is bench.base:
                return
            prompt, total = self.prompt_ids[index], 0.0
            for probe in replies:
                tokens = probe.reply.token_ids
                own = probe.logits  # the distributions its tokens were drawn from; None on the HF path
                if own is None:
                    own = target.branch_logits(prompt, [tokens])[0]
                total += OwnDistribution(own, workspace).kl_to(bench.base.branch_logits(prompt, [tokens])[0])
            kls[index] = total / len(replies)

        cache = self.v0_cache_path(seed_base) if target is bench.base else None
        cached = self.read_v0_cache(cache) if cache is not None else None
        if cached is not None:
            texts, n_tokens = cached
        else:
            seeds = [[sample_seed(seed_base, i, k) for k in range(self.draws)] for i in range(len(self.texts))]
            # Prompt-major: prompt i's draws are texts[i * draws : (i + 1) * draws].
            replies = [probe.reply for group in bench.sample(target, self.prompt_ids, seeds, kl) for probe in group]
            texts, n_tokens = [r.text for r in replies], [r.n_tokens for r in replies]
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                write_whole(cache, json.dumps({"texts": texts, "n_tokens": n_tokens}))
        prompts = [p for p in self.texts for _ in range(self.draws)]
        return {"scores": self.per_prompt([bench.gold.score(user(p), t) for p, t in zip(prompts, texts)]),
                "proxy": self.per_prompt([bench.annotator.score(user(p), t) for p, t in zip(prompts, texts)]),
                "texts": texts, "kl": sum(kls) / len(kls),
                "mean_tokens": sum(n_tokens) / len(n_tokens),
                "distinct_2": distinct_n(texts, 2)}

    def per_prompt(self, scores: list[float]) -> list[float]:
        """Each prompt's mean over its draws (prompt-major scores): the paired items of the bootstrap."""
        k = self.draws
        return [sum(scores[i : i + k]) / k for i in range(0, len(scores), k)]

    def read_v0_cache(self, path: Path) -> tuple[list, list] | None:
        """(texts, token counts) from a --v0-cache file; None when there is none, or it is unreadable or not
        one reply per prompt (a copy cut off, edited by hand): those replies are sampled again."""
        if not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
            texts, n_tokens = saved["texts"], saved["n_tokens"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"warning: {path} is unreadable ({exc}); sampling v0's replies again", file=sys.stderr)
            return None
        expected = len(self.texts) * self.draws
        if not (len(texts) == len(n_tokens) == expected):
            print(f"warning: {path} has {len(texts)} replies for {len(self.texts)} prompts x {self.draws} draws; "
                  "sampling them again", file=sys.stderr)
            return None
        return texts, n_tokens

    def v0_cache_path(self, seed_base: int) -> Path | None:
        """Where --v0-cache keeps v0's replies for these prompts and seeds: named by everything they depend
        on (the model, the prompts, the seeds, the sampling), so a changed one never reads stale replies."""
        folder = getattr(self.bench.args, "v0_cache", None)
        if not folder:
            return None
        settings = self.bench.settings()
        if self._weights is None:  # a sample of every tensor: a model changed in place under one path
            digest = hashlib.sha256()
            for name, param in self.bench.loaded.model.named_parameters():
                digest.update(name.encode())
                digest.update(param.detach().flatten()[:1024].float().cpu().numpy().tobytes())
            self._weights = digest.hexdigest()
        key = {"model": self.bench.args.model, "model_id": self.bench.loaded.model_id, "weights": self._weights,
               "prompts": self.prompt_ids,
               "seed_base": seed_base, "temperature": settings.temperature, "top_p": settings.top_p,
               "max_new_tokens": settings.max_new_tokens}
        if self.draws != 1:  # only then: the files of single-draw runs keep their names
            key["draws"] = self.draws
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return Path(folder) / f"v0-{digest}.json"


def write_whole(path: Path, text: str) -> None:
    """Write text to path through a temporary file and a rename: a reader (or a run cut off) sees the old
    file or the new one, never half of one. The temporary name holds the process id, so two runs writing
    the same shared file (--v0-cache) do not write into each other's."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def compare(new: dict, old: dict, seed: int) -> dict:
    """vN against v0 (or A against B) on the same prompts: the gold win rate [Wilson] and the mean gold
    difference [paired bootstrap]."""
    from playground.metrics import paired_bootstrap
    from trainers.metrics import win_rate

    rate, interval = win_rate(new["scores"], old["scores"])
    diff = paired_bootstrap(new["scores"], old["scores"], n_boot=BOOTSTRAP_SAMPLES, seed=seed)
    return {"gold_win_rate": round(rate, 4), "gold_win_rate_ci": [round(interval[0], 4), round(interval[1], 4)],
            "gold_mean_diff": round(diff["diff"], 4), "gold_mean_diff_ci": [round(diff["lo"], 4), round(diff["hi"], 4)],
            "eval_prompts": diff["n"]}


def split_prompts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(the held-out prompts: the first --eval-prompts of --eval-file, the training prompts: the shipped
    ones that are not held out)."""
    from playground.sim.prompt_file import load_prompts

    eval_texts = load_prompts(args.eval_file)[: args.eval_prompts]
    held_out = set(eval_texts)
    train = [p for p in load_prompts() if p not in held_out]
    if not train:
        raise BenchInputError(f"every training prompt is also in {args.eval_file}: nothing left to train on; "
                              "pass another --eval-file")
    return eval_texts, train


class LoopBench(Bench):
    def __init__(self, args: argparse.Namespace):
        from store import Store

        super().__init__(args, args.gold, args.model)
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix=f"loop-{args.arm}-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.work / "loop.db")
        self.store.ensure_base_version(self.loaded.model_id)
        self.store.record_live(self.loaded.model_id, "v0", "start")
        eval_texts, self.train_prompts = split_prompts(args)
        self.evaluation = Evaluation(self, eval_texts)
        self.rng = random.Random(args.seed + 1)
        # Whether the annotator edits: its own generator, so a run without edits draws exactly what it drew
        # before the flag existed (the same prompts, replies and votes).
        self.edit_rng = random.Random(args.seed + 2)
        self.labels = 0
        self.judged: list[tuple[str, str, bool]] = []  # (reply a, reply b, tied) of every vote so far
        self.tie_model = None  # least_tie's model when the last pairs were chosen
        self.version = "v0"
        self.lines: list[dict] = []

    # -- data ---------------------------------------------------------------------------------------

    def sample_pairs(self, target, count: int, seed: int) -> list[tuple[str, str, str]]:
        """`count` training prompts, each with the pair --pair-rule picks among its sampled replies."""
        from playground.evaluation.evaluator import sample_seed
        from playground.metrics.pair_choice import TieModel, choose_pair

        rule = self.args.pair_rule
        tie_model = self.tie_model = TieModel.fit(self.judged) if rule == "least_tie" else None
        # Without a tie model least_tie shows the first two candidates, so only those two are sampled: the
        # same replies (the same seeds) at a fraction of the time.
        first_two = rule == "random" or (rule == "least_tie" and tie_model is None)
        k = 2 if first_two else self.args.candidates
        texts = [self.rng.choice(self.train_prompts) for _ in range(count)]
        prompt_ids = [self.render(t) for t in texts]
        seeds = [[sample_seed(seed, i, j) for j in range(k)] for i in range(count)]
        groups = self.sample(target, prompt_ids, seeds)
        pairs = []
        for text, ids, group in zip(texts, prompt_ids, groups):
            replies = [g.reply for g in group]
            rewards = None
            if rule == "least_separated":
                rewards = self.implicit_rewards(target, ids, [r.token_ids for r in replies])
            i, j = choose_pair(rule, [r.text for r in replies], rewards, tie_model)
            pairs.append((text, replies[i].text, replies[j].text))
        return pairs

    def tie_model_top(self, count: int = 5) -> list[str] | None:
        """The features the tie model that chose this round's pairs weighs most toward "judged" (None:
        no model yet, the first two candidates were shown)."""
        return None if self.tie_model is None else self.tie_model.top(count)

    def implicit_rewards(self, target, prompt_ids, replies) -> list[float]:
        """log pi(reply) - log pi_v0(reply) of each reply: DPO's implicit reward, up to its beta."""
        if target is self.base:
            return [0.0] * len(replies)
        own = target.reply_logprobs(prompt_ids, replies)
        ref = self.base.reply_logprobs(prompt_ids, replies)
        return [a - b for a, b in zip(own, ref)]

    def label_and_store(self, pairs: list[tuple[str, str, str]], version: str, budget: int) -> dict:
        """The annotator votes on pairs until `budget` labels are spent; after a vote, with --edit-rate, it
        also writes a better reply (one more label). Everything is stored as the app would store it.
        Returns the labels spent, the votes and edits, the ties among the votes (no training pair from the
        vote), and how often the rest agreed with the annotator's gold (25% label noise caps it at 0.75;
        pairs a few words apart under `concise` are near 0.5). Edits are written to the gold, without
        the clicks' noise: a person who types a reply means it."""
        from playground.sim.annotator import CHOICE_A, CHOICE_TIE

        ties = agreed = votes = edits = 0
        for prompt, a, b in pairs:
            if votes + edits >= budget:
                break
            context = user(prompt)
            judgement = self.annotator.judge(context, a, b)
            self.judged.append((a, b, judgement.choice == CHOICE_TIE))  # what least_tie learns from
            if judgement.choice == CHOICE_TIE:
                ties += 1
            else:
                agreed += (judgement.choice == CHOICE_A) == (judgement.score_a > judgement.score_b)
            conversation = self.store.start_conversation("bench", self.annotator.name, self.loaded.model_id, "",
                                                         simulated=True)
            rows = [{"slot": slot, "text": text, "policy_version": version, "model_id": self.loaded.model_id,
                     "temperature": self.args.temperature, "top_p": self.args.top_p,
                     "max_new_tokens": self.args.max_new_tokens}
                    for slot, text in (("a", a), ("b", b))]
            turn_id, _ = self.store.record_turn(conversation, 0, context, prompt, rows)
            self.store.record_choice(turn_id, 0, judgement.choice, self.annotator.name, "bench")
            votes += 1
            if votes + edits < budget and self.args.edit_rate > 0 and self.edit_rng.random() < self.args.edit_rate:
                better = self.annotator.edit(context, a, b)
                if better is not None:  # the gold has no better reply than the better one: nothing to write
                    # Its length as the chat counts an edit's (end of turn included): its pairs' limit reads it.
                    n_tokens = len(self.tokenizer(better, add_special_tokens=False)["input_ids"]) + 1
                    self.store.record_edit(turn_id, 0, better, self.annotator.name, "bench", n_tokens=n_tokens)
                    edits += 1
        voted = votes - ties
        return {"labels": votes + edits, "votes": votes, "edits": edits, "ties": ties,
                "agreement": round(agreed / voted, 4) if voted else None}

    def train_round(self, round_index: int) -> dict:
        from trainers.run import parse_args as runner_args
        from trainers.run import run_round

        args = runner_args(["--db", str(self.work / "loop.db"), "--adapters-dir", str(self.work / "adapters"),
                            "--model", self.args.model, "--model-cache", self.args.model_cache,
                            "--min-new-pairs", "1", "--config", self.args.config,
                            "--trigger", f"bench-{self.args.arm}-{round_index}", "--no-progress",
                            *(["--replay-ratio", str(self.args.replay_ratio)] if self.args.replay_ratio is not None
                              else [])])
        _, summary = run_round(args)
        return summary

    # -- report -------------------------------------------------------------------------------------

    def check_gold(self, results: list[dict]) -> None:
        """Refuse, before any label, a gold (or the goodhart arm's proxy) that scores all v0's replies the same."""
        from playground.sim.gold import check_tells_apart

        check_tells_apart(self.gold, [s for r in results for s in r["scores"]], "of v0's held-out replies")
        if self.annotator.gold is not self.gold:
            check_tells_apart(self.annotator.gold, [s for r in results for s in r["proxy"]],
                              "of v0's held-out replies (the proxy the annotator votes by)")

    def report(self, round_index: int, result: dict, baseline: dict, seconds: dict, extra: dict) -> dict:
        line = {
            "arm": self.args.arm, "gold": self.gold.spec, "pair_rule": self.args.pair_rule,
            "round": round_index, "version": self.version,
            "labels": self.labels, **compare(result, baseline, self.args.seed), "eval_draws": self.evaluation.draws,
            "gold_mean": round(sum(result["scores"]) / len(result["scores"]), 4),
            "kl_to_v0": round(result["kl"], 4), "mean_tokens": round(result["mean_tokens"], 2),
            "distinct_2": round(result["distinct_2"], 4), "seconds": {k: round(v, 2) for k, v in seconds.items()},
            **extra,
        }
        if self.args.arm == "goodhart":
            line["proxy_mean"] = round(sum(result["proxy"]) / len(result["proxy"]), 4)
        print(json.dumps(line), flush=True)
        self.lines.append(line)
        self.save()
        return line

    def summary(self) -> dict:
        from playground.metrics import labels_to_held_significance, labels_to_significance

        last = self.lines[-1]
        line = {"summary": True, "arm": self.args.arm, "gold": self.gold.spec, "pair_rule": self.args.pair_rule,
                "rounds": self.args.rounds, "edit_rate": self.args.edit_rate, "top_p": self.args.top_p,
                "labels": self.labels, "eval_prompts": last["eval_prompts"], "eval_draws": self.evaluation.draws,
                "labels_to_significance": labels_to_significance(self.lines),
                "labels_to_held_significance": labels_to_held_significance(self.lines),
                "final": {k: last[k] for k in ("version", "gold_win_rate", "gold_win_rate_ci", "gold_mean_diff",
                                               "gold_mean_diff_ci", "kl_to_v0")},
                "workdir": str(self.work)}
        print(json.dumps(line), flush=True)
        self.save(line)
        return line

    def save(self, summary: dict | None = None) -> None:
        """WORKDIR/bench-loop.json: the settings and the lines so far (written whole each time, then renamed)."""
        write_whole(self.work / RUN_FILE, json.dumps({"args": vars(self.args), "model_id": self.loaded.model_id,
                                                     "lines": self.lines, "summary": summary}, indent=1))

    def run(self) -> list[dict]:
        eval_seed = self.args.seed + 1000  # the same seed per prompt every round: differences are the policy's
        started = time.perf_counter()
        baseline = self.evaluation.run(self.base, eval_seed)
        reference = self.evaluation.run(self.base, eval_seed + 1)  # v0 against itself: what chance looks like
        self.check_gold([baseline, reference])
        self.report(0, reference, baseline, {"eval": time.perf_counter() - started}, {})
        target, last = self.base, reference
        offline_pool = []
        if self.args.arm == "offline":
            t = time.perf_counter()
            offline_pool = self.sample_pairs(target, self.args.rounds * self.args.labels_per_round, self.args.seed)
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
                pairs = self.sample_pairs(target, self.args.labels_per_round, self.args.seed + round_index)
                seconds["sample"] = time.perf_counter() - t
                source = self.version
            t = time.perf_counter()
            votes = self.label_and_store(pairs, source, self.args.labels_per_round)
            self.labels += votes["labels"]
            seconds["label"] = time.perf_counter() - t
            t = time.perf_counter()
            summary = self.train_round(round_index)
            seconds["train"] = time.perf_counter() - t
            labelled = {"round_ties": votes["ties"], "round_label_agreement": votes["agreement"]}
            if self.args.edit_rate > 0:  # only then: the lines of runs without edits stay as they were
                labelled["round_edits"] = votes["edits"]
            if self.args.pair_rule == "least_tie":
                labelled["round_tie_model_top"] = self.tie_model_top()
            if summary["status"] != "succeeded":
                # The live version did not change: report it again, with why the round gave nothing.
                self.report(round_index, last, baseline, seconds,
                            {**labelled, "round_status": summary["status"], "reason": summary["reason"]})
                continue
            t = time.perf_counter()
            self.version = summary["version"]
            target = self.version_target(self.version, self.work / "adapters" / self.version)
            self.store.record_live(self.loaded.model_id, self.version, "promote", "bench")
            seconds["load"] = time.perf_counter() - t
            t = time.perf_counter()
            result = last = self.evaluation.run(target, eval_seed)
            seconds["eval"] = time.perf_counter() - t
            held_out = (summary.get("metrics") or {}).get("held_out_after") or {}
            self.report(round_index, result, baseline, seconds, {
                **labelled, "round_pairs": summary.get("n_pairs"), "held_out_accuracy": held_out.get("accuracy")})
        self.summary()
        return self.lines


def read_run(workdir: str) -> dict:
    path = Path(workdir) / RUN_FILE
    try:
        run = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchInputError(f"{path} does not exist: --head-to-head takes the --workdir of a finished "
                              "bench.loop run") from None
    except (OSError, ValueError) as exc:
        raise BenchInputError(f"{path} cannot be read ({exc}); run that arm again") from None
    if not run.get("lines"):
        raise BenchInputError(f"{path} has no rounds yet: let that run finish first")
    run["workdir"] = Path(workdir)
    return run


def head_to_head(args: argparse.Namespace) -> dict:
    """Run A's final version against run B's on the eval prompts, each prompt from the same seed for both."""
    runs = [read_run(w) for w in args.head_to_head]
    for key in ("gold", "model"):
        values = {r["args"][key] for r in runs}
        if len(values) > 1:
            raise BenchInputError(f"the two runs differ in --{key} ({' vs '.join(sorted(values))}): "
                                  "a head-to-head compares versions of one model under one gold")
    gold, model = runs[0]["args"]["gold"], runs[0]["args"]["model"]
    bench = Bench(argparse.Namespace(**{**vars(args), "arm": "head-to-head"}), gold, model)
    from playground.sim.prompt_file import load_prompts

    evaluation = Evaluation(bench, load_prompts(args.eval_file)[: args.eval_prompts])
    eval_seed = args.seed + 1000
    results, sides = [], []
    for side, run in zip("ab", runs):
        version = run["lines"][-1]["version"]
        target = bench.base if version == "v0" else bench.version_target(version, run["workdir"] / "adapters" / version)
        result = evaluation.run(target, eval_seed)
        results.append(result)
        sides.append({"arm": run["args"]["arm"], "seed": run["args"]["seed"], "version": version,
                      "labels": run["lines"][-1]["labels"], "workdir": str(run["workdir"]),
                      "gold_mean": round(sum(result["scores"]) / len(result["scores"]), 4),
                      "kl_to_v0": round(result["kl"], 4)})
    line = {"head_to_head": True, "gold": bench.gold.spec, "a": sides[0], "b": sides[1],
            **compare(results[0], results[1], args.seed), "eval_draws": evaluation.draws}
    print(json.dumps(line), flush=True)
    return line


def main(argv=None) -> int:
    from trainers.procenv import reexec_for_training

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if argv is None:  # run as a program: a scheduled round's process settings (trainers/procenv.py)
        reexec_for_training(passive_openmp=False)  # one process, nothing else runs: let OpenMP spin
    from playground.serving.adapters import AdapterError
    from playground.sim.gold import GoldError

    try:
        if args.head_to_head:
            head_to_head(args)
        else:
            LoopBench(args).run()
    except (GoldError, BenchInputError, AdapterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
