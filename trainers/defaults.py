"""The defaults of training rounds and of their schedule, each defined once.

app.py's flags, the training loop, `python -m trainers.run` and the benchmarks import them from here.
"""

# Where trained versions vN/ are published.
DEFAULT_ADAPTERS_DIR = "adapters"
# Minutes between the schedule's checks for enough new pairs (app.py --train-every).
DEFAULT_TRAIN_EVERY_MIN = 5.0
# New training pairs a *scheduled* round needs (app.py --min-new-pairs): a round costs tens of seconds
# of both cores, so the schedule waits for a batch of votes worth training on.
SCHEDULE_MIN_NEW_PAIRS = 16
# New training pairs a round started by a person needs (Train now, `python -m trainers.run` by hand):
# they asked for it, so any new pair is enough.
MANUAL_MIN_NEW_PAIRS = 1
# DPO's assumed share of flipped votes (cDPO label smoothing, trainers/dpo.py). Votes from a room are noisy:
# people misclick, skim, disagree. On the bundled model with 25% simulated label noise, 0.25 made
# `concise` significant after 128 labels (+0.057 [+0.002, +0.112], KL 0.89; replicated on another CPU at
# +0.062 [+0.004, +0.121], KL 1.14, and still +0.067 at 192), where trusting every click (0) needed 192;
# it also drifted less (docs/BENCHMARKS.md, the sweep's 2026-12-02 afternoon subsection). It is the
# simulator's own flip rate: a team whose votes are cleaner can lower it in the admin panel.
DEFAULT_LABEL_SMOOTHING = 0.25
# The weight of imitating a better reply someone typed (trainers/dpo.py edit_sft_weight: its mean NLL per
# token, next to its pairs' DPO loss). Off: on the bundled model, 25% label noise, 2 rounds of 64 labels of
# which one in four was an edit, trusting the edits' pairs (smooth_edits off) without it made `concise`
# significant after 64 labels and `format` after 128 (+0.091 [+0.050, +0.137], KL 3.60; the first format
# result significantly above zero in 26 settings; +0.051 on a second seed), and `keyword` after 128 when
# scored with four draws per prompt (+0.086, KL 2.91; +0.058, not significant, with two). At weight 1
# concise learned more in the first round (+0.135 against +0.071) and the same by 128 labels, but format
# ended at +0.036 with KL 5.25, over the sweep's 5-nat limit, and keyword at +0.026 (docs/BENCHMARKS.md,
# the sweep's 2026-12-04 subsection). The admin panel's "learn better replies as examples" turns it on.
DEFAULT_EDIT_SFT_WEIGHT = 0.0
# Older pairs replayed per new pair: keeps earlier lessons without drowning the new votes.
DEFAULT_REPLAY_RATIO = 1.0
# Where reward models rN/ are published.
DEFAULT_REWARD_MODELS_DIR = "reward_models"
# The schedule's algorithm (app.py --algo): 'dpo' learns from the pairs directly; 'ppo' fits a reward model
# to them and optimises the policy against it (README, "Two ways to learn from votes").
SCHEDULE_ALGOS = ("dpo", "ppo")
DEFAULT_ALGO = "dpo"
