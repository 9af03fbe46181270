"""The local launcher: N worker processes on this machine, GPU-aware.

Each run is a `python -m metacl.launch.worker` process with its own thread count
(OMP/MKL/torch), so parallel runs do not oversubscribe the CPU. On a GPU machine each GPU
offers `runs_per_gpu` slots (or as many as fit `gpu_memory_gb` each); a run that may use a GPU
waits for a free slot and sees only its GPU (CUDA_VISIBLE_DEVICES), with its CUDA memory capped
to its budget. Runs configured with device=cpu need no slot.

Ctrl-C or SIGTERM stops launching and asks every running run to checkpoint (one SIGTERM each);
a second one makes them stop at once. Re-launching the sweep resumes them.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

from ..core.errors import RunInterrupted
from .specs import LocalConfig, PlannedRun
from .worker import EXIT_BUSY, EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, GPU_MEMORY_FRACTION_ENV

GPU_MEMORY_USABLE = 0.9
"""Share of a GPU's memory handed out to runs (the rest is left to the CUDA context)."""


@dataclass
class Slot:
    gpu: int
    memory_fraction: float | None = None


def gpu_slots(config: LocalConfig) -> list[Slot]:
    """The GPU slots of this machine under `config` (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = config.gpus if config.gpus is not None else list(range(torch.cuda.device_count()))
    slots: list[Slot] = []
    for gpu in gpus:
        total_gb = torch.cuda.get_device_properties(gpu).total_memory / 2**30
        fraction = None
        if config.gpu_memory_gb:
            fraction = min(1.0, config.gpu_memory_gb / total_gb)
        per_gpu = config.runs_per_gpu or (
            max(1, math.floor(GPU_MEMORY_USABLE * total_gb / config.gpu_memory_gb)) if config.gpu_memory_gb else 1
        )
        slots.extend(Slot(gpu, fraction) for _ in range(per_gpu))
    return slots


def wants_gpu(run: PlannedRun) -> bool:
    return run.config.device in ("auto", "cuda")


class LocalLauncher:
    def __init__(self, config: LocalConfig):
        self.config = config

    def plan(self, runs: list[PlannedRun]) -> tuple[int, int, list[Slot]]:
        """(workers, threads per run, GPU slots) for these runs on this machine."""
        slots = gpu_slots(self.config) if any(wants_gpu(r) for r in runs) else []
        cores = os.cpu_count() or 1
        threads = self.config.threads or next((r.config.threads for r in runs if r.config.threads), None)
        workers = self.config.workers or (len(slots) if slots else max(1, cores // (threads or 1)))
        threads = threads or max(1, cores // workers)
        return workers, threads, slots

    def run(self, runs: list[PlannedRun]) -> dict[str, int]:
        """Execute `runs` (at most `workers` at once); return each run's worker exit code."""
        if not runs:
            return {}
        workers, threads, slots = self.plan(runs)
        free = list(slots)
        queue = deque(runs)
        active: dict[subprocess.Popen, tuple[PlannedRun, Slot | None, float]] = {}
        codes: dict[str, int] = {}
        stops = 0

        def request_stop(signum, _frame):
            nonlocal stops
            stops += 1
            for process in active:
                process.send_signal(signal.SIGTERM)

        previous = _install({signal.SIGINT: request_stop, signal.SIGTERM: request_stop})
        print(
            f"launching {len(runs)} runs: {workers} workers x {threads} threads"
            + (f", {len(slots)} GPU slots" if slots else ""),
            flush=True,
        )
        done = 0
        try:
            while queue or active:
                while queue and not stops and len(active) < workers:
                    slot = None
                    if wants_gpu(queue[0]) and slots:
                        if not free:
                            break
                        slot = free.pop(0)
                    run = queue.popleft()
                    active[self._start(run, threads, slot)] = (run, slot, time.monotonic())
                for process in [p for p in active if p.poll() is not None]:
                    run, slot, started = active.pop(process)
                    codes[run.name] = process.returncode
                    if slot is not None:
                        free.append(slot)
                    done += 1
                    where = f"GPU {slot.gpu}, " if slot is not None else ""
                    print(
                        f"[{done}/{len(runs)}] {run.name}: {_describe(process.returncode)} "
                        f"({where}{time.monotonic() - started:.1f}s)",
                        flush=True,
                    )
                if stops and not active:
                    break
                time.sleep(0.05)
        finally:
            _install(previous)
        if stops:
            raise RunInterrupted(f"sweep stopped with {len(queue)} runs not started; launch it again to resume")
        return codes

    def _start(self, run: PlannedRun, threads: int, slot: Slot | None) -> subprocess.Popen:
        env = worker_env(run, threads, slot)
        log = open(run.config_file.with_suffix(".log"), "a")
        command = [sys.executable, "-m", "metacl.launch.worker", str(run.config_file), f"threads={threads}"]
        # Own session: a Ctrl-C in the terminal reaches only this launcher, which forwards one
        # SIGTERM; the run gets SIGTERM too if the launcher dies.
        with log:
            return subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )


def worker_env(run: PlannedRun, threads: int, slot: Slot | None) -> dict[str, str]:
    """The environment of a run's worker: its thread count, and its GPU and memory cap."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop(GPU_MEMORY_FRACTION_ENV, None)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(slot.gpu)
        if slot.memory_fraction:
            env[GPU_MEMORY_FRACTION_ENV] = f"{slot.memory_fraction:.4f}"
    elif wants_gpu(run):
        env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU slot in this plan: keep the run on the CPU
    return env


def _describe(code: int) -> str:
    return {
        0: "complete",
        EXIT_FAILED: "failed",
        EXIT_CONFIG: "bad config",
        EXIT_BUSY: "already running elsewhere",
        EXIT_INTERRUPTED: "interrupted",
    }.get(code, f"died (exit code {code})")


def _install(handlers: dict) -> dict:
    """Install signal handlers (main thread only); return the previous ones."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}


def _die_with_parent() -> None:
    """In the child: get SIGTERM (checkpoint and stop) when the launcher process dies."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
