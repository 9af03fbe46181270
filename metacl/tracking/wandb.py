"""Weights & Biases tracker, offline by default.

Offline runs are written inside the run directory (`<run>/wandb/offline-run-*`) and need no
network, login or API key; upload them later with `wandb sync <run>/wandb/offline-run-*`.
Online mode uses whatever login the machine has: metacl never reads, stores or logs an API
key. The W&B run id is derived from the run directory, so a resumed run continues the same
W&B run, and the sweep folder becomes the W&B group.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

from ..core.errors import ConfigError


class WandbTracker:
    def __init__(self, config: Any, run_dir: str | Path, run_name: str, run_config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("tracking.backends includes wandb, but the wandb package is not "
                              "installed: pip install 'metacl[wandb]'") from None
        run_dir = Path(run_dir).resolve()
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=config.wandb_project, entity=config.wandb_entity, name=run_name,
            id=hashlib.sha256(str(run_dir).encode()).hexdigest()[:16],
            group=run_dir.parent.name, dir=str(run_dir), mode=config.wandb_mode,
            config=run_config, resume="allow", reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", save_code=False,
                                    disable_git=True, x_disable_stats=True))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()
