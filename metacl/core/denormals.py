"""Flush denormal floats to zero on every CPU thread for the length of a `with` block.

Why: a meta-test at a high learning rate saturates its softmax, so most gradients of the output
layer are around 1e-20 and their squares (Adam's second moment) fall below float32's smallest
normal number, 1.2e-38. x86 cores compute on such denormals many times slower (measured here:
the frozen meta-test's fused Adam step 5-12x slower, the validation sweep 2x slower end to end).
Treating them as zero changes values only below 1e-38, far under the rounding of every weight
(a weight near 0.01 moves in steps of 1e-9), so the meta-test's results stay those of exact Adam.

`torch.set_flush_denormal` is only sure to set the flag of the calling thread; OpenMP's worker
threads (which run every parallel kernel, compiled ones included) each hold their own, so the flag
is also set inside one OpenMP parallel region of torch's team size, which reaches those threads.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

OPENMP_LIBRARIES = ("libgomp", "libiomp", "libomp")
"""OpenMP runtimes that export GOMP_parallel (libgomp natively, Intel's and LLVM's for compatibility)."""


def flushing() -> bool:
    """Whether the calling thread treats denormals as zero (a denormal times one gives zero)."""
    return torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0


def set_on_all_threads(enabled: bool) -> bool:
    """Set flush-to-zero on this thread and on every thread of torch's OpenMP team; False where
    the CPU cannot (then nothing changed). Without a loaded OpenMP runtime only this thread is set."""
    if not torch.set_flush_denormal(enabled):
        return False
    parallel = _gomp_parallel()
    threads = torch.get_num_threads()
    if parallel is not None and threads > 1:
        callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _data: torch.set_flush_denormal(enabled))
        parallel(callback, None, threads, 0)
    return True


@contextmanager
def denormals_flushed(device: torch.device | str = "cpu") -> Iterator[None]:
    """Flush denormals on every CPU thread inside the block, then restore the calling thread's
    previous setting everywhere. Other devices are left alone (GPUs flush in their own kernels)."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = flushing()
    changed = not before and set_on_all_threads(True)
    try:
        yield
    finally:
        if changed:
            set_on_all_threads(False)


@cache
def _gomp_parallel():
    """`GOMP_parallel(fn, data, num_threads, flags)` of the OpenMP runtime loaded in this process, or
    None; looked up once (torch loads its runtime at import, before this module runs)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:  # not Linux: no way to find the runtime; only the calling thread is set
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(OPENMP_LIBRARIES):
            try:
                library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
                parallel = library.GOMP_parallel
            except (OSError, AttributeError):
                continue
            parallel.restype = None
            parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            return parallel
    return None
