"""A snapshot of what produced a run: versions, device, git commit, command line."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

PACKAGES = (
    "metacl",
    "torch",
    "numpy",
    "h5py",
    "pandas",
    "pyarrow",
    "matplotlib",
    "pillow",
    "pyyaml",
    "submitit",
    "tensorboard",
    "wandb",
)


def git_commit(directory: Path | None = None) -> str | None:
    directory = directory or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    """The CPU's model name (float results can differ between CPU models in the last bits)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_summary(device: torch.device | str | None = None) -> str:
    """One line naming what a benchmark ran on: CPU, cores, torch threads, torch version, device."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    line = (
        f"hardware: {cpu_model()}, {cores} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {device}"
    )
    if device.type == "cuda":
        line += f" ({torch.cuda.get_device_name(device)})"
    return line


def environment(device: torch.device | str | None = None) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    device = torch.device(device) if device is not None else None
    gpu = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "command": sys.argv,
        "packages": versions,
        "device": str(device) if device is not None else None,
        "gpu": gpu,
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }
