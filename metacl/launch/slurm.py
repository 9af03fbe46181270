"""The Slurm launcher: each sweep launch is one job array, submitted through submitit.

Every array task runs `SlurmTask`, which executes its run in a child worker process
(`python -m metacl.launch.worker`, mode "resume"). Slurm can stop a task in two ways, and both
end with the run continuing from where it stopped:

- The time limit approaches, or the cluster announces preemption, with the signal submitit
  asks for (USR2, `signal_delay_s` before the limit). submitit calls `SlurmTask.checkpoint`,
  which stops the run at its next safe point (the run writes a checkpoint and exits) and
  returns the same task for submitit to requeue.
- Preemption in requeue mode, or `scontrol requeue`: Slurm sends SIGTERM to every process of
  the job; the run checkpoints and exits, and Slurm starts the job again later.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit
import yaml
from submitit.helpers import Checkpointable, DelayedSubmission

from ..core import atomic
from ..core.errors import MetaclError, RunInterrupted
from ..core.rundir import read_status
from .worker import EXIT_INTERRUPTED

if TYPE_CHECKING:  # the job side stays light: it imports no torch, the worker does
    from .specs import PlannedRun, SlurmConfig

JOBS_FILE = "jobs.json"
DONE_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}


class SlurmTask(Checkpointable):
    """One array task: runs one sweep run in a child process and requeues it when signalled."""

    def __init__(self, threads: int, stop_timeout_s: float):
        self.threads = threads
        self.stop_timeout_s = stop_timeout_s
        self._child: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"threads": self.threads, "stop_timeout_s": self.stop_timeout_s, "_child": None}

    def __call__(self, config_file: str) -> dict[str, Any]:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        self._child = child = subprocess.Popen(
            [sys.executable, "-m", "metacl.launch.worker", config_file, f"threads={self.threads}"], env=env
        )
        # A thread reaps the child, so this (main) thread never holds a lock that submitit's
        # signal handler, which runs `checkpoint` here, would wait for.
        threading.Thread(target=child.wait, daemon=True).start()
        while child.returncode is None:
            time.sleep(0.2)
        status = _status(config_file)
        if child.returncode == 0:
            return status.get("final", {})
        if child.returncode == EXIT_INTERRUPTED:
            raise RunInterrupted(
                "stopped by Slurm (preemption, requeue or scancel) after a "
                "checkpoint; it resumes when the job starts again"
            )
        raise MetaclError(f"run failed (worker exit code {child.returncode}): {status.get('error', 'see the job log')}")

    def checkpoint(self, config_file: str) -> DelayedSubmission:
        """Called by submitit on USR2: stop the run at a checkpoint, then requeue the task."""
        child = self._child
        if child is not None and child.returncode is None:
            os.kill(child.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            while child.returncode is None and time.monotonic() < deadline:
                time.sleep(0.1)
        return DelayedSubmission(SlurmTask(self.threads, self.stop_timeout_s), config_file)


def _status(config_file: str | Path) -> dict[str, Any]:
    """The status of the run a resolved config file describes."""
    config = yaml.safe_load(Path(config_file).read_text())
    return read_status(Path(config["out_dir"]) / config["name"])


class SlurmLauncher:
    def __init__(self, config: SlurmConfig, folder: Path):
        self.config = config
        self.folder = Path(folder)

    def executor(self, job_name: str) -> submitit.SlurmExecutor:
        config = self.config
        executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=config.max_timeouts)
        params: dict[str, Any] = dict(
            job_name=job_name,
            time=config.time_min,
            cpus_per_task=config.cpus_per_task,
            array_parallelism=config.array_parallelism,
            signal_delay_s=config.signal_delay_s,
            setup=list(config.setup),
            # A requeued job appends to its logs, which then tell the whole story.
            additional_parameters={"open-mode": "append", **config.additional},
        )
        optional = {
            "partition": config.partition,
            "account": config.account,
            "qos": config.qos,
            "constraint": config.constraint,
        }
        params.update({k: v for k, v in optional.items() if v})
        if config.gpus_per_task:
            params["gpus_per_node"] = config.gpus_per_task
        if config.mem_gb:
            params["mem"] = f"{math.ceil(config.mem_gb * 1024)}M"
        executor.update_parameters(**params)
        return executor

    def submit(self, runs: list[PlannedRun], job_name: str) -> list[str]:
        """Submit `runs` as one job array and return the job ids of all of `runs`: runs whose
        earlier job is still queued or running keep that job rather than getting a second one."""
        recorded = self._recorded()
        active = active_jobs()
        busy = [r for r in runs if recorded.get(r.name) in active]
        for run in busy:
            print(f"{run.name}: still queued or running as job {recorded[run.name]}", flush=True)
        busy_ids = [recorded[r.name] for r in busy]
        runs = [r for r in runs if r not in busy]
        if not runs:
            return busy_ids
        task = SlurmTask(self.config.cpus_per_task, max(5, self.config.signal_delay_s - 10))
        jobs = self.executor(job_name).map_array(task, [str(r.config_file) for r in runs])
        recorded.update({run.name: job.job_id for run, job in zip(runs, jobs)})
        atomic.write_text(self.folder / JOBS_FILE, json.dumps(recorded, indent=2))
        array = jobs[0].job_id.split("_")[0]
        print(f"submitted {len(jobs)} runs as Slurm job array {array} (logs in {self.folder})", flush=True)
        return busy_ids + [job.job_id for job in jobs]

    def wait(self, job_ids: list[str], poll_s: float = 2.0) -> None:
        """Block until none of `job_ids` is queued, running or waiting to be requeued."""
        absent = 0 if job_ids else 2
        while absent < 2:  # twice in a row: a job being requeued is never missed
            absent = absent + 1 if not set(job_ids) & active_jobs() else 0
            time.sleep(poll_s)

    def _recorded(self) -> dict[str, str]:
        try:
            return json.loads((self.folder / JOBS_FILE).read_text())
        except FileNotFoundError:
            return {}


def active_jobs() -> set[str]:
    """Ids (array tasks as JOB_TASK) of all jobs Slurm still holds as pending or running."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %T"], check=True, capture_output=True, text=True, timeout=60
        ).stdout
    except FileNotFoundError:
        raise MetaclError("squeue not found: the Slurm launcher needs Slurm's commands") from None
    except subprocess.CalledProcessError as error:
        raise MetaclError(f"squeue failed: {error.stderr.strip()}") from None
    jobs = (line.split() for line in out.splitlines() if line.strip())
    return {job for job, state in jobs if state not in DONE_STATES}
