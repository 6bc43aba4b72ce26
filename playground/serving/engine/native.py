"""The native backend's C library (native.c next to this file): compiled on first use, loaded with ctypes.

native.c is compiled once per source, CPU and platform with `cc -O3 -march=native -fopenmp` into
~/.cache/rlhf-playground/native/ (or $PLAYGROUND_NATIVE_CACHE) and reused; ~1 s. It needs x86-64
Linux with AVX-512 and a C compiler; anywhere else `native_library()` returns None and the engine
runs its torch backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NATIVE_SOURCE_PATH = Path(__file__).with_name("native.c")
NATIVE_ENV = "PLAYGROUND_NATIVE"  # '0' turns the native backend off
NATIVE_CACHE_ENV = "PLAYGROUND_NATIVE_CACHE"  # where the compiled library goes (default ~/.cache/...)
# -march=native: the library is built on the machine that runs it (the cache key holds the CPU flags).
# -fno-math-errno: sqrtf compiles to one instruction, with no errno to set on a negative input.
NATIVE_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")
NATIVE_ABI = 8  # what engine_abi() in native.c returns; bump both when a signature or struct changes
COMPILE_TIMEOUT_S = 120
# The sampling distributions take ~0.1 ms a row on one thread: not worth an OpenMP barrier, which
# stalls for a scheduler tick when another process holds the second core.
SAMPLING_THREADS = 1


class _Desc(ctypes.Structure):
    """The `Desc` struct of native.c, field for field."""

    _fields_ = [
        ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64), ("inter", ctypes.c_int64), ("vocab", ctypes.c_int64),
        ("n_layers", ctypes.c_int64), ("eps", ctypes.c_float), ("embed_packed", ctypes.c_int64),
        ("embed", ctypes.c_void_p), ("lm_head", ctypes.c_void_p), ("norm_final", ctypes.c_void_p),
        ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p), ("layers", ctypes.c_void_p),
    ]


class _Lora(ctypes.Structure):
    """The `Lora` struct of native.c: one adapter's rank, its table of A/B pointers, their type and scales."""

    _fields_ = [("rank", ctypes.c_int64), ("mats", ctypes.c_void_p), ("bf16", ctypes.c_int64),
                ("scale", ctypes.c_float), ("q_scale", ctypes.c_float)]


_native_lock = threading.Lock()
_native_lib: ctypes.CDLL | None = None
_native_tried = False
_native_error: str | None = None


def native_source() -> str:
    """The C source of the native kernels (native.c)."""
    return NATIVE_SOURCE_PATH.read_text()


def unavailable_reason() -> str | None:
    """Why `native_library()` gave None (None before its first call, or when the library loaded)."""
    return _native_error


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _native_cache_dir() -> Path:
    if os.environ.get(NATIVE_CACHE_ENV):
        return Path(os.environ[NATIVE_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlhf-playground" / "native"


def c_compiler() -> str | None:
    """The compiler the engine builds native.c with: $CC, else cc or gcc on PATH (None if none)."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def compile_command(compiler: str, src: Path, out: Path, extra_flags: tuple[str, ...] = ()) -> list[str]:
    """The command that builds the shared library `out` from `src` (tests add warning flags)."""
    return [compiler, *NATIVE_CFLAGS, *extra_flags, "-o", str(out), str(src), "-lm"]


def _compile_native(target: Path, source: str) -> None:
    compiler = c_compiler()
    if not compiler:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        # Compile the text that was hashed into the cache key, not native.c itself: an edit landing
        # between the two reads would otherwise be cached under the old source's key.
        src, out = Path(tmp) / "engine.c", Path(tmp) / target.name
        src.write_text(source)
        cmd = compile_command(compiler, src, out)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent process sees no library or a whole one


def native_library() -> ctypes.CDLL | None:
    """The compiled native kernels, or None where they cannot run here (the reason is logged once)."""
    global _native_lib, _native_tried, _native_error
    with _native_lock:
        if _native_tried:
            return _native_lib
        _native_tried = True
        try:
            if os.environ.get(NATIVE_ENV, "1") == "0":
                raise RuntimeError(f"{NATIVE_ENV}=0")
            if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
                raise RuntimeError(f"{platform.system()}/{platform.machine()} is not x86-64 Linux")
            flags = _cpu_flags().split()
            if "avx512f" not in flags:
                raise RuntimeError("the CPU has no AVX-512")
            source = native_source()
            key = hashlib.sha256(
                "\0".join([source, " ".join(sorted(flags)), platform.platform()]).encode()
            ).hexdigest()[:16]
            target = _native_cache_dir() / f"engine-{key}.so"
            if not target.is_file():
                _compile_native(target, source)
            lib = ctypes.CDLL(str(target))
            if lib.engine_abi() != NATIVE_ABI:
                raise RuntimeError("stale native library")
            lib.engine_step.restype = ctypes.c_int
            lib.engine_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                        ctypes.c_int]
            lib.engine_step_rows.restype = ctypes.c_int
            lib.engine_step_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            lib.engine_gemv.restype = ctypes.c_int
            lib.engine_gemv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            lib.engine_sampling_probs.restype = ctypes.c_int
            lib.engine_sampling_probs.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                                  ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            _native_lib = lib
        except Exception as exc:  # noqa: BLE001 - any failure means: use the torch backend
            _native_error = str(exc)
            log.info("native decode kernels unavailable (%s); using the torch backend", exc)
        return _native_lib


def native_sampling_probs(logits: torch.Tensor, temperature: float,
                          top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(probs, lse) for CPU float32 logits [rows, V], or None where the native kernels are unavailable.

    probs: softmax(logits / temperature) with the top-p tail zeroed, what
    `filter_top_p(logits / temperature, top_p).softmax(-1)` gives (to float rounding) in a tenth of
    the time; lse: logsumexp of each row of logits, so log-prob(token) = logits[token] - lse.
    """
    lib = native_library()
    if lib is None or logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2:
        return None
    logits = logits.contiguous()
    rows, vocab = logits.shape
    probs = torch.empty_like(logits)
    lse = torch.empty(rows, dtype=torch.float32)
    rc = lib.engine_sampling_probs(logits.data_ptr(), rows, vocab, float(temperature), float(top_p),
                                   probs.data_ptr(), lse.data_ptr(), SAMPLING_THREADS)
    if rc != 0:
        raise MemoryError("engine_sampling_probs ran out of memory")
    return probs, lse
