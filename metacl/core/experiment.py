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
import errno
import hashlib
import importlib
import json
import shutil
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .config import ConfigError, Positive, apply_overrides, from_dict, read_yaml, to_dict
from .device import resolve_device
from .errors import DataError, MetaclError, RunDiverged, RunInterrupted
from .run import Mode, Run
from .rundir import IDENTITY_FREE_KEYS, check_resume, check_run_name, is_run_directory, read_status
from .seeding import seed_everything
from .tracking import TrackingConfig, check_backends

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
    threads: Positive | None = None
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

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Rewrite a config written by an older metacl into today's layout (old run directories
        keep loading and resuming); experiments whose layout changed override this."""
        return data

    def length_keys(self) -> tuple[str, ...]:
        """Dotted keys that only say how long the run goes on, which `--extend` may raise; ()
        when lengthening would change what the run already did (a schedule over its length)."""
        return ()

    def check_extension(self, stored: dict[str, Any]) -> None:
        """Refuse (ConfigError) to extend the run whose stored config is `stored` to this one
        unless the result equals an uninterrupted run of this config."""
        raise ConfigError(f"{self.experiment} runs cannot be extended; start a new run with another name=")


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
    raise ConfigError(
        f"unknown experiment {name!r}; valid choices: {', '.join(EXPERIMENTS)}, "
        f"or a dotted module path defining Config and run()"
    )


def load_experiment_config(
    path: str | Path | None, overrides: Iterable[str] = (), experiment: str | None = None
) -> ExperimentConfig:
    """Read a YAML config plus overrides into its experiment's typed, validated Config."""
    data = apply_overrides(read_yaml(path) if path else {}, overrides)
    name = experiment or data.get("experiment")
    if not name:
        raise ConfigError(f"{path or 'config'}: missing key 'experiment'; valid choices: {', '.join(EXPERIMENTS)}")
    if data.get("experiment", name) != name:
        raise ConfigError(f"{path}: is a {data['experiment']!r} config, not {name!r}")
    data["experiment"] = name
    cls = experiment_module(name).Config
    config = from_dict(cls, cls.upgrade(data))
    if config.name is None:
        config = dataclasses.replace(config, name=default_run_name(config))
    return config


def default_run_name(config: ExperimentConfig) -> str:
    """`<experiment>-<hash>`: the hash covers everything that can change results."""
    identity = {k: v for k, v in to_dict(config).items() if k not in IDENTITY_FREE_KEYS}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{config.experiment}-{digest}"


def execute(
    config: ExperimentConfig, mode: Mode = "new", accept_data_change: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Run `config` in its run directory; return (path, final metrics).

    With mode="resume", a complete run returns its recorded metrics at once and an unfinished
    one continues from its last checkpoint: re-launching a sweep is therefore always safe. Either
    way the stored config must match (`rundir.check_resume`). mode="extend" also accepts larger
    `length_keys()` (more episodes): the run goes on from where it ended to the new length.
    """
    name = check_run_name(config.name)
    path = Path(config.out_dir) / name
    if mode == "extend" and not is_run_directory(path):
        raise MetaclError(f"--extend: {path} is not a run directory; start the run without --extend")
    if mode in ("resume", "extend") and is_run_directory(path):
        lengthened = check_resume(path, config, extend=mode == "extend")
        status = read_status(path)
        if status["status"] == "complete" and not lengthened:
            return path, status.get("final", {})
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    check_backends(config.tracking)  # e.g. W&B online without a key: refused before any folder
    run = Run.open(config, device, mode, accept_data_change)
    try:
        run.install_signal_handlers()
        run.set_status("running")
        final = _run_module(config, run)
        run.set_status("complete", final=final)
    finally:
        run.release()
    return path, final


REFUSALS = (ConfigError, DataError)
"""Errors that refuse a run's inputs: a run directory created for such a run is removed again."""


def _run_module(config: ExperimentConfig, run: Run) -> dict[str, Any]:
    """The experiment's run(), with its outcome recorded in status.json."""
    module = experiment_module(config.experiment)
    refused = False
    try:
        final = module.run(config, run) or {}
    except RunInterrupted as error:
        run.set_status("interrupted", error=str(error))
        run.log.warning("interrupted: %s", error)
        raise
    except RunDiverged as error:
        run.set_status("diverged", error=str(error))
        run.log.error("diverged: %s", error)
        raise
    except REFUSALS as error:
        run.log.error("refused: %s", error)
        refused = run.created and not any(run.path.glob("checkpoints/*.pt"))
        if not refused:
            run.set_status("failed", error=f"{type(error).__name__}: {error}")
        raise
    except BaseException as error:
        reason = f"{type(error).__name__}: {error}"
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            reason = f"disk full while writing {error.filename or run.path}: {error.strerror}"
        try:
            run.set_status("failed", error=reason, traceback=traceback.format_exc())
        except OSError:  # the disk may be full: the lock's release makes the run read as stale
            pass
        run.log.error("failed: %s", reason)
        raise
    finally:
        run.close()
        if refused:  # refused before any result: leave nothing behind
            shutil.rmtree(run.path, ignore_errors=True)
    return final
