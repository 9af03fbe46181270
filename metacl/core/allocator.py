"""Keep glibc malloc from handing big CPU tensors back to the kernel after every step.

A CPU training step allocates and frees large activations: a mastery batch gigabytes of them,
an ANML meta-batch 58 MB per first-layer tensor. glibc serves every block over its mmap
threshold (at most 32 MiB by default) with a fresh mmap and munmaps it on free, and trims the
heap top back to the kernel, so each step page-faults all of them in again. Measured: a mastery
batch's kernel time about equalled its wall time (tuned, ~2.7x faster); an ANML episode took
~120,000 page faults and 0.25 s of kernel time, a quarter of its wall clock (tuned: none, the
episode ~20% faster). Setting the environment MALLOC_MMAP_THRESHOLD_=4294967296
MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824 has that effect; `tune_malloc`
gets the same behaviour from inside the process with mallopt(3):

    M_TRIM_THRESHOLD  -1 (SIZE_MAX): never trim the heap top (mallopt(3) documents -1 as off)
    M_TOP_PAD         1 GiB: grow the heap in large steps
    M_MMAP_THRESHOLD  -1 (SIZE_MAX): serve every size from the heap, so a freed block is reused
                      by the next step instead of being unmapped. mallopt takes an int, so the
                      environment's 4 GiB cannot be passed; SIZE_MAX covers every size. glibc
                      builds that cap the threshold at HEAP_MAX_SIZE / 2 (32 MiB) refuse it; then
                      M_MMAP_MAX = 0 (no mmap from the main arena) does the same job.

For a meta-training (`tune_malloc(huge_pages=True)`), where the kernel gives transparent huge
pages only on request (THP "madvise", Debian's and many distributions' default), the heap is also
asked for them: its first gigabytes are reserved up front (address space only; untouched pages
cost nothing) and marked with madvise(MADV_HUGEPAGE), so a 58 MB activation sits on 29 pages of
2 MiB instead of 14,000 of 4 KiB. Measured on ANML episodes: 2.7% and 2.9% faster with two
processes taking turns (12 and 10 rounds), 0.7% over a 120-episode meta-training each way (its
first episodes slower while huge pages are first touched). glibc's own
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` does the same but can only be set before the process
starts. Mastery runs keep ordinary pages: they were not compared (three timings of a mastery batch with
huge pages spread from 4.8 to 7.9 s), and a first touch of huge pages can stall on compaction.

Results do not change, only where the bytes live. What took effect is checked, not assumed: a
64 MiB probe block (over glibc's 32 MiB cap) must come from the heap, as `mallinfo2`'s count of
mmapped blocks shows. The cost is memory: the process keeps its peak heap (freed blocks stay
mapped for reuse) instead of returning it.

Set METACL_MALLOC_TUNING=0 (or false, no, off) to keep glibc's defaults. The setting is
process-wide and cannot be undone cleanly (memory already in the heap stays there), so it is
applied once, when a mastery run or a meta-training on the CPU has loaded its data and before it
builds its model (and by the benchmarks that time them); later runs in the same process find it
in place. A run on a GPU leaves the allocator alone: its activations live in the device's caching
allocator. On other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "METACL_MALLOC_TUNING"
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
TOP_PAD_BYTES = 1 << 30
PROBE_BYTES = 64 << 20  # over glibc's documented 32 MiB mmap-threshold cap
MADV_HUGEPAGE = 14
HUGE_PAGE_RESERVE_BYTES = 8 << 30
"""Heap reserved and marked for huge pages: an ANML meta-training peaks at about 2.4 GB. A heap
that grows past it gets ordinary pages there (the kernel does not extend the mark)."""
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass(frozen=True)
class MallocTuning:
    """What `tune_malloc` did: `status` is tuned, disabled, unsupported or failed."""

    status: str
    detail: str

    @property
    def tuned(self) -> bool:
        return self.status == "tuned"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_result: MallocTuning | None = None


def disabled_by_environment() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("0", "false", "no", "off")


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("mallopt", "malloc", "free")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free.restype = None
    if hasattr(libc, "madvise"):
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.argtypes = []
        libc.mallinfo2.restype = _Mallinfo2
    return libc


def mmapped_blocks(libc: ctypes.CDLL | None = None) -> int | None:
    """glibc's count of blocks currently served by mmap (mallinfo2().hblks), or None."""
    libc = libc or _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    return int(libc.mallinfo2().hblks)


def _probe_comes_from_heap(libc: ctypes.CDLL) -> bool | None:
    """Whether a 64 MiB malloc is served from the heap (None: mallinfo2 is missing)."""
    before = mmapped_blocks(libc)
    if before is None:
        return None
    block = libc.malloc(PROBE_BYTES)
    if not block:
        return None
    try:
        return mmapped_blocks(libc) == before
    finally:
        libc.free(block)


def transparent_huge_pages() -> str | None:
    """The kernel's THP mode (always, madvise or never), or None where it has none."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def heap_range() -> tuple[int, int] | None:
    """(start, end) of this process's [heap] mapping, from /proc/self/maps."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.endswith("[heap]"):
            start, end = line.split()[0].split("-")
            return int(start, 16), int(end, 16)
    return None


def _advise_huge_pages(libc: ctypes.CDLL) -> str:
    """Reserve the heap's first gigabytes and mark them for transparent huge pages (see above)."""
    mode = transparent_huge_pages()
    if mode != "madvise":
        return f"transparent huge pages {mode or 'unavailable'} (left as they are)"
    if not hasattr(libc, "madvise"):
        return "transparent huge pages not requested (no madvise)"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    block = libc.malloc(min(HUGE_PAGE_RESERVE_BYTES, memory // 2))  # grows the heap; never trimmed
    if block:
        libc.free(block)
    heap = heap_range()
    if heap is None or libc.madvise(heap[0], heap[1] - heap[0], MADV_HUGEPAGE) != 0:
        return "transparent huge pages not requested (madvise refused)"
    return f"transparent huge pages requested for the heap's first {(heap[1] - heap[0]) / 2**30:.1f} GiB"


def tune_malloc(huge_pages: bool = False) -> MallocTuning:
    """Apply the setting once per process (later calls return the first result); `huge_pages`
    also asks for transparent huge pages on the heap (see above)."""
    global _result
    if _result is not None:
        return _result
    if disabled_by_environment():
        _result = MallocTuning("disabled", f"{ENV_VAR}={os.environ[ENV_VAR]}: glibc defaults kept")
        return _result
    libc = _glibc()
    if libc is None:
        _result = MallocTuning("unsupported", "the C library is not glibc: allocator left as it is")
        return _result
    trim = libc.mallopt(M_TRIM_THRESHOLD, -1)
    pad = libc.mallopt(M_TOP_PAD, TOP_PAD_BYTES)
    how = "mmap threshold SIZE_MAX"
    threshold = libc.mallopt(M_MMAP_THRESHOLD, -1)
    from_heap = _probe_comes_from_heap(libc) if threshold else False
    if from_heap is False:
        how = "mmap off in the main arena (this glibc caps the mmap threshold)"
        threshold = libc.mallopt(M_MMAP_MAX, 0)
        from_heap = _probe_comes_from_heap(libc) if threshold else False
    if not (trim and pad and threshold) or from_heap is False:
        _result = MallocTuning(
            "failed",
            f"mallopt refused (trim {trim}, top pad {pad}, {how} {threshold}, 64 MiB probe from heap: {from_heap})",
        )
    else:
        checked = "checked" if from_heap else "unchecked: no mallinfo2"
        pages = _advise_huge_pages(libc) if huge_pages else "ordinary pages"
        _result = MallocTuning(
            "tuned",
            f"glibc malloc: no heap trimming, 1 GiB top pad, {how} ({checked}); {pages}; {ENV_VAR}=0 keeps the defaults",
        )
    return _result
