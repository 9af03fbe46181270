"""TensorBoard tracker: scalars as event files in `<run>/tensorboard/`.

A resumed run logs again from the step after its checkpoint. The writer is therefore opened
at the first logged step, with `purge_step` set to it when earlier event files exist, so that
TensorBoard hides the events a killed run wrote after its last checkpoint: every step shows once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError


class TensorBoardTracker:
    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "tracking.backends includes tensorboard, but the tensorboard "
                "package is not installed: pip install 'metacl[tensorboard]'"
            ) from None
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer: Any = None  # created at the first log, which knows the step to purge from

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            resumed = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
            self.writer = self._writer_class(str(self.log_dir), purge_step=step if resumed else None)
        for name, value in metrics.items():
            try:
                value = float(value)  # Python, numpy and one-element torch numbers
            except (TypeError, ValueError):
                continue  # not a scalar: the tidy tables hold it
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
