"""The background evaluation of each version on a fixed probe set.

probes.py reads the probe file, evaluator.py is the service (`Evaluator`, `EvalSettings`), sampling.py
and targets.py decode and score one version; defaults.py holds the defaults. This package's import
loads no model and no torch: app.py reads its flags' defaults from here.
"""

from playground.evaluation.defaults import DEFAULT_PROBES, DEFAULT_SAMPLES_PER_PROMPT
from playground.evaluation.probes import MAX_PROBE_CHARS, MIN_PROBES, ProbeFileError, load_probes, probe_set_hash

__all__ = ["DEFAULT_PROBES", "DEFAULT_SAMPLES_PER_PROMPT", "MAX_PROBE_CHARS", "MIN_PROBES", "ProbeFileError",
           "load_probes", "probe_set_hash"]
