"""The contract every runnable experiment follows, and the one function that executes it.

An experiment is a module that defines

    Config   a dataclass subclassing `ExperimentConfig` (its own sections and fields)
    run(config, run) -> dict
             does the work inside `run` (a `Run`), resuming from `run.load_checkpoint()`
             when that returns a state, polling `run.stop_requested` at safe points (then
             checkpointing and raising `RunInterrupted`), and returning final metrics.

`EXPERIMENTS` maps names to such modules. The CLI, the sweep launchers and the Slurm jobs all
go through `load_experiment_config` and `execute`, so a new experiment touches one module and
one line here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import torch

from ..tracking import TrackingConfig
from .config import ConfigError, from_dict, apply_overrides, read_yaml, to_dict
from .device import resolve_device
from .errors import RunInterrupted
from .run import Mode, Run, read_status
from .seeding import seed_everything

EXPERIMENTS: dict[str, str] = {
    "mastery": "metacl.mastery.experiment",
    "meta-train": "metacl.meta.train.experiment",
    "meta-eval": "metacl.meta.eval.experiment",
}


@dataclass
class ExperimentConfig:
    """Fields shared by every experiment: identity, seed, device, output and tracking."""

    experiment: str = ""
    """Which experiment this config runs; one of the keys of metacl.core.experiment.EXPERIMENTS."""
    seed: int = 0
    """The one seed behind every random choice of the run."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    threads: int | None = None
    """torch CPU threads for this run; None keeps torch's default (launchers set it per worker)."""
    out_dir: str = "runs"
    """Parent folder of run directories."""
    name: str | None = None
    """Run directory name; None derives `<experiment>-<config hash>`, stable for a given config."""
    data_dir: str | None = None
    """Data and cache folder; None uses $METACL_DATA_DIR or ~/.cache/metacl."""
    quiet: bool = False
    """Hide progress bars (for log files and batch jobs)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment trackers (console, tensorboard, wandb)."""


def experiment_module(name: str) -> ModuleType:
    """The module for a registered name, or for a dotted module path (a plugin experiment)."""
    if name in EXPERIMENTS:
        return importlib.import_module(EXPERIMENTS[name])
    if "." in name:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"experiment module {name!r} cannot be imported: {error}") from None
        if hasattr(module, "Config") and hasattr(module, "run"):
            return module
        raise ConfigError(f"experiment module {name!r} defines no Config and run()")
    raise ConfigError(f"unknown experiment {name!r}; valid choices: {', '.join(EXPERIMENTS)}, "
                      f"or a dotted module path defining Config and run()")


def load_experiment_config(path: str | Path | None, overrides: Iterable[str] = (),
                           experiment: str | None = None) -> ExperimentConfig:
    """Read a YAML config plus overrides into its experiment's typed, validated Config."""
    data = apply_overrides(read_yaml(path) if path else {}, overrides)
    name = experiment or data.get("experiment")
    if not name:
        raise ConfigError(f"{path or 'config'}: missing key 'experiment'; valid choices: "
                          f"{', '.join(EXPERIMENTS)}")
    if data.get("experiment", name) != name:
        raise ConfigError(f"{path}: is a {data['experiment']!r} config, not {name!r}")
    data["experiment"] = name
    config = from_dict(experiment_module(name).Config, data)
    if config.name is None:
        config = dataclasses.replace(config, name=default_run_name(config))
    return config


IDENTITY_FREE_KEYS = ("name", "out_dir", "quiet", "tracking", "threads", "data_dir")


def default_run_name(config: ExperimentConfig) -> str:
    """`<experiment>-<hash>`: the hash covers everything that can change results."""
    identity = {k: v for k, v in to_dict(config).items() if k not in IDENTITY_FREE_KEYS}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{config.experiment}-{digest}"


def execute(config: ExperimentConfig, mode: Mode = "new") -> tuple[Path, dict[str, Any]]:
    """Run `config` in its run directory; return (path, final metrics).

    With mode="resume", a complete run returns its recorded metrics at once and an unfinished
    one continues from its last checkpoint: re-launching a sweep is therefore always safe.
    """
    path = Path(config.out_dir) / config.name
    if mode == "resume":
        status = read_status(path)
        if status["status"] == "complete":
            return path, status.get("final", {})
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    run = Run.open(config, device, mode)
    run.install_signal_handlers()
    run.set_status("running")
    module = experiment_module(config.experiment)
    try:
        final = module.run(config, run) or {}
    except RunInterrupted as error:
        run.set_status("interrupted", error=str(error))
        run.log.warning("interrupted: %s", error)
        raise
    except BaseException as error:
        run.set_status("failed", error=f"{type(error).__name__}: {error}",
                       traceback=traceback.format_exc())
        run.log.error("failed: %s: %s", type(error).__name__, error)
        raise
    finally:
        run.close()
    run.set_status("complete", final=final)
    return path, final
