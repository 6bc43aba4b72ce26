"""Process settings for the processes that train: glibc malloc and OpenMP waiting.

**OpenMP threads that sleep instead of spin.** A scheduled round shares the CPU with the app that
serves the chat. torch's OpenMP threads spin-wait at the end of every parallel region by default;
when another process holds one of the cores, each region waits for a descheduled thread, and a round
of many small operations slows down by 10-30x (measured: a tiny-model DPO pass took 14-42 s with
2 threads next to a busy process, 0.5 s with 1 thread, 0.8-1.1 s with 2 threads and
OMP_WAIT_POLICY=PASSIVE). On a quiet machine passive threads cost a little (a 32-pair round of the
bundled model: 96 s against 88 s spinning), a price worth paying for a process that by design runs
next to the app's decoding; the benchmarks, which have the CPU to themselves, leave OpenMP spinning.

**malloc.** A training step allocates and frees many activation tensors of megabytes each. glibc hands every
allocation above its mmap threshold (dynamic, at most 32 MB by default) to a fresh mmap and returns it on
free, so each step page-faults its working set in again: in a profiled DPO round on this project's
2-core CPU that was 2.2 million minor faults and a fifth of the wall time (the `sub`/`exp`/`fill` passes
over the LM head's logits ran at under 1 GB/s). With a threshold above any tensor and trimming off, freed
memory is reused from the heap instead: 0.86 million faults, sys time halved.

Both settings can only take effect at process start (GLIBC_TUNABLES is read by the dynamic loader,
OMP_WAIT_POLICY when the OpenMP runtime loads), so the scheduler passes them to the trainer subprocess
and the training benchmarks re-execute themselves once with them. The malloc settings' cost is that
the process keeps its peak memory until it exits: right for a round's subprocess, wrong for the
long-lived app, which uses neither setting.
"""

from __future__ import annotations

import os
import sys

TRAINING_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"
_REEXEC_MARK = "RLHF_PLAYGROUND_TRAINING_ENV"


def training_env(env: dict[str, str] | None = None, passive_openmp: bool = True) -> dict[str, str]:
    """A copy of env (default: os.environ) with the malloc tunables added and, unless passive_openmp is
    False, OpenMP threads passive. A process that has the CPU to itself (a benchmark) spins faster:
    a 32-pair round on the bundled model took 88 s with OMP_WAIT_POLICY=ACTIVE and 96 s with PASSIVE."""
    env = dict(os.environ if env is None else env)
    if passive_openmp:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    current = env.get("GLIBC_TUNABLES", "")
    if TRAINING_MALLOC_TUNABLES not in current:
        env["GLIBC_TUNABLES"] = f"{current}:{TRAINING_MALLOC_TUNABLES}" if current else TRAINING_MALLOC_TUNABLES
    return env


def reexec_for_training(passive_openmp: bool = True) -> None:
    """Restart this Python process once with training_env() (no-op on non-Linux or if already done)."""
    if not sys.platform.startswith("linux") or os.environ.get(_REEXEC_MARK):
        return
    env = training_env(passive_openmp=passive_openmp)
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
