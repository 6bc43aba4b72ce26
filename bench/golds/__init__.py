"""Gold functions written for the benchmarks only, never shipped as a built-in taste (bench/golds/unseen.py:
the taste the label-efficiency sweep was not tuned on)."""
