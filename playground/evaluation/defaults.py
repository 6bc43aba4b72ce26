"""The evaluation's defaults, each defined once (app.py's flags, the evaluator and the benchmark import
them from here; importing this module loads nothing)."""

from pathlib import Path

# The shipped probe set (app.py --probes).
DEFAULT_PROBES = Path(__file__).resolve().parent / "probes.txt"
# Replies sampled per probe (app.py --eval-samples): more than one, so mode collapse shows (self-similarity
# and distinct-n across a probe's samples). Two: the evaluation is compute-bound (each reply is scored
# under v0 and the parent, ~137 GFLOP/s on 2 cores), and four samples took 159 s for a version whose
# parent is v0 (bench/eval_cost.py, loaded machine), past the two minutes a version should take; 64 probes
# x 2 samples still give 128 replies for every interval and 64 pairs for the self-similarity.
DEFAULT_SAMPLES_PER_PROMPT = 2
# The seeds of one probe's samples are numbered below this.
MAX_SAMPLES_PER_PROMPT = 64
# Each reply's length limit: long enough for a reply's shape, short enough for a version to take about
# two minutes on a 2-core CPU (bench/eval_cost.py).
EVAL_MAX_NEW_TOKENS = 96
# Rows sampled together: past ~16 a CPU decode step is compute-bound (bench/decode.py).
EVAL_BATCH_ROWS = 16
# Held-out pairs scored per evaluation at most (a seeded sample past that): each costs up to four scored replies.
MAX_HELD_OUT_PAIRS = 64
# Added to the worker thread's niceness, as the trainer's: the chat keeps priority.
EVAL_NICENESS = 10
