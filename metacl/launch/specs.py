"""What the sweep planner hands to the launchers: launcher settings and planned runs.

Kept apart from `sweep.py` so that the launchers (`local.py`, `slurm.py`) and the planner import
it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import NonNegative, Positive, PositiveFloat
from ..core.experiment import ExperimentConfig


@dataclass
class LocalConfig:
    """The local launcher: a pool of worker processes on this machine."""

    workers: Positive | None = None
    """Runs at once; None: one per GPU slot on a GPU machine, else CPU cores // threads."""
    threads: Positive | None = None
    """CPU threads per run; None: the config's `threads`, else CPU cores // workers."""
    gpus: list[int] | None = None
    """GPU indices to use; None: every visible GPU (none on a CPU-only machine)."""
    runs_per_gpu: Positive | None = None
    """Runs sharing one GPU; None: from gpu_memory_gb, else 1."""
    gpu_memory_gb: PositiveFloat | None = None
    """Memory budget of one run on a GPU: sets runs_per_gpu and caps each run's CUDA memory."""


@dataclass
class SlurmConfig:
    """The Slurm launcher: one job array through submitit; resources per array task."""

    partition: str | None = None
    """Partition (queue); None uses the cluster's default."""
    time_min: Positive = 60
    """Time limit per job in minutes; a run that hits it checkpoints and is requeued."""
    cpus_per_task: Positive = 1
    """CPU cores per run; also the run's torch thread count."""
    gpus_per_task: NonNegative = 0
    """GPUs per run."""
    mem_gb: PositiveFloat | None = None
    """Memory per run in GB; None uses the partition's default."""
    array_parallelism: Positive = 256
    """Most array tasks running at once."""
    account: str | None = None
    """Account to charge (sbatch --account)."""
    qos: str | None = None
    """Quality of service (sbatch --qos)."""
    constraint: str | None = None
    """Node features required (sbatch --constraint)."""
    max_timeouts: NonNegative = 3
    """How often a run that reaches its time limit is requeued (preemptions do not count)."""
    signal_delay_s: NonNegative = 90
    """Seconds before the time limit at which Slurm signals the job to checkpoint."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before each job (module load ..., source venv/bin/activate)."""
    additional: dict[str, Any] = field(default_factory=dict)
    """Further sbatch options by name, e.g. {exclude: node12, reservation: paper}."""


@dataclass
class PlannedRun:
    name: str
    config: ExperimentConfig
    path: Path
    """The run directory."""
    config_file: Path
    """The resolved config the worker executes."""
    values: dict[str, Any]
    """The grid values (and seed) that make this run."""
