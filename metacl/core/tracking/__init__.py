"""Experiment trackers: where scalar metrics go besides the run's tidy tables.

A tracker only sees metric names and numbers, never models or data. `console` is always on;
`tensorboard` and `wandb` are opt-in through `tracking.backends`. Metric names are stable
`section/name` strings (for example `mastery/test_acc/mean_seen`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from ..config import Positive
from ..errors import ConfigError

BACKENDS = ("console", "tensorboard", "wandb")


@dataclass
class TrackingConfig:
    backends: list[str] = field(default_factory=lambda: ["console"])
    """Where scalars go: any of console, tensorboard, wandb. The tidy tables are always written."""
    console_every: Positive = 1
    """Print every n-th logged step to the console (1 prints all)."""
    wandb_project: str = "metacl"
    """Weights & Biases project name."""
    wandb_entity: str | None = None
    """Weights & Biases entity (team or user); None uses the logged-in default."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline writes to the run directory (upload later with `wandb sync`); online needs a login."""

    def __post_init__(self):
        for backend in self.backends:
            if backend not in BACKENDS:
                raise ConfigError(
                    f"tracking.backends: unknown tracker {backend!r}; valid choices: {', '.join(BACKENDS)}"
                )


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class ConsoleTracker:
    def __init__(self, logger: logging.Logger, every: int = 1):
        self.logger, self.every, self._calls = logger, max(1, every), 0

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._calls += 1
        if (self._calls - 1) % self.every:
            return
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        self.logger.info("step %d  %s", step, text)

    def close(self) -> None:
        pass


class MultiTracker:
    """Fans one `log` call out to every configured backend."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def check_backends(config: TrackingConfig) -> None:
    """Refuse (ConfigError) trackers that cannot work on this machine, such as W&B in online mode
    without an API key or network; cheap enough to call before a run directory is created.
    Building the tracker checks the same."""
    if "wandb" in config.backends:
        from .wandb import check_online

        check_online(config.wandb_mode)


def build_tracker(
    config: TrackingConfig, run_dir: Path, run_name: str, run_config: dict, logger: logging.Logger
) -> MultiTracker:
    trackers: list[Tracker] = []
    for backend in dict.fromkeys(["console", *config.backends]):
        if backend == "console":
            trackers.append(ConsoleTracker(logger, config.console_every))
        elif backend == "tensorboard":
            from .tensorboard import TensorBoardTracker

            trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
        elif backend == "wandb":
            from .wandb import WandbTracker

            trackers.append(WandbTracker(config, run_dir, run_name, run_config))
    return MultiTracker(trackers)
