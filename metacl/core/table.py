"""Tidy metrics tables: rows appended in memory, written to parquet atomically on `flush`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .atomic import atomic_path


class MetricsTable:
    """One tidy table (`<name>.parquet` in a run directory), one row per step, epoch or task."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._rows: list[dict[str, Any]] = []
        if self.path.exists():
            self._rows = pd.read_parquet(self.path).to_dict("records")
        self._dirty = False

    def __len__(self) -> int:
        return len(self._rows)

    def append(self, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        if isinstance(rows, Mapping):
            rows = [rows]
        self._rows.extend(dict(r) for r in rows)
        self._dirty = True

    def truncate(self, length: int) -> None:
        """Drop rows logged after a checkpoint, so a resumed run re-logs them exactly once."""
        if length < len(self._rows):
            del self._rows[length:]
            self._dirty = True

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self._rows)

    def flush(self) -> None:
        if not self._dirty and self.path.exists():
            return
        with atomic_path(self.path) as tmp:
            self.frame().to_parquet(tmp, index=False)
        self._dirty = False
