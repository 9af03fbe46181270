"""Runs on disk as one table: `metacl runs ls` and `metacl runs compare`.

A run is any folder with a config.yaml (and usually a status.json). Its row holds the run's
name, status and error, every config value as `config.<dotted key>`, and its final metrics as
`final.<name>`. A metric may also be read from a tidy table as `TABLE:COLUMN` (its last row).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ..core.errors import ConfigError, MetaclError
from ..core.rundir import read_status
from ..core.stats import mean_ci

NOT_COMPARED = ("name", "out_dir", "quiet", "threads", "data_dir", "device", "tracking")


def find_runs(directory: str | Path) -> list[Path]:
    """Run directories under `directory` (itself included), skipping hidden folders."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MetaclError(f"no such directory: {directory}")
    runs = []
    for root, folders, files in os.walk(directory):
        if "config.yaml" in files:
            runs.append(Path(root))
            folders.clear()  # a run's subfolders (checkpoints, tensorboard) hold no runs
        else:
            folders[:] = sorted(f for f in folders if not f.startswith("."))
    return sorted(runs, key=natural_key)


def natural_key(path: Path) -> list:
    """Sort `steps=5` before `steps=10`: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(path))]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = str(value) if isinstance(value, (list, dict)) else value
    return flat


def load_runs(directory: str | Path) -> pd.DataFrame:
    """One row per run under `directory`: name, status, error, config.*, final.*."""
    rows = []
    for path in find_runs(directory):
        status = read_status(path)
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        row = {"name": path.name, "path": str(path), "status": status["status"], "error": status.get("error")}
        row.update({f"config.{k}": v for k, v in flatten(config).items()})
        row.update(
            {
                f"final.{k}": v
                for k, v in (status.get("final") or {}).items()
                if isinstance(v, (int, float, bool)) or v is None
            }
        )
        rows.append(row)
    if not rows:
        raise MetaclError(f"no runs (folders with a config.yaml) under {directory}")
    frame = pd.DataFrame(rows)
    configs = [c for c in frame.columns if c.startswith("config.")]
    # Config values stay as written (an int stays an int next to a null), not as floats.
    frame[configs] = pd.DataFrame([{c: r.get(c) for c in configs} for r in rows], dtype=object)
    return frame


def varying_keys(frame: pd.DataFrame, first: Iterable[str] = ()) -> list[str]:
    """Config keys (without the `config.` prefix) whose values differ between runs; keys in
    `first` (a sweep's grid keys) lead, in their order."""
    keys = []
    for column in [*(f"config.{k}" for k in first if f"config.{k}" in frame), *frame.columns]:
        if column[7:] in keys:
            continue
        if column.startswith("config.") and column[7:].split(".")[0] not in NOT_COMPARED:
            if frame[column].map(str).nunique() > 1:
                keys.append(column[7:])
    return keys


def sweep_keys(directory: str | Path) -> list[str]:
    """The grid keys (and seed) of the sweep in `directory`, if it is one."""
    try:
        spec = yaml.safe_load((Path(directory) / "sweep.yaml").read_text()) or {}
    except FileNotFoundError:
        return []
    return [*(spec.get("grid") or {}), *(["seed"] if spec.get("seeds") is not None else [])]


def metric_names(frame: pd.DataFrame) -> list[str]:
    return [c[6:] for c in frame.columns if c.startswith("final.") and pd.api.types.is_numeric_dtype(frame[c])]


def metric_values(frame: pd.DataFrame, metric: str) -> pd.Series:
    """Values of `metric` per run: a final metric, or `TABLE:COLUMN` (the table's last row)."""
    if ":" in metric:
        table, column = metric.split(":", 1)
        return pd.Series(
            [_last_value(Path(p) / f"{table}.parquet", column, metric) for p in frame["path"]],
            index=frame.index,
            dtype=float,
        )
    if f"final.{metric}" not in frame:
        raise ConfigError(
            f"no run has a final metric {metric!r}; final metrics: "
            f"{', '.join(metric_names(frame)) or 'none'} (or TABLE:COLUMN)"
        )
    return pd.to_numeric(frame[f"final.{metric}"], errors="coerce")


def _last_value(path: Path, column: str, metric: str) -> float:
    if not path.exists():
        return math.nan
    table = pd.read_parquet(path)
    if column not in table:
        raise ConfigError(
            f"metric {metric!r}: {path.name} has no column {column!r}; columns: {', '.join(table.columns)}"
        )
    return float(table[column].iloc[-1]) if len(table) else math.nan


def compare(frame: pd.DataFrame, by: Iterable[str], metrics: Iterable[str], confidence: float = 0.95) -> pd.DataFrame:
    """Complete runs grouped by config keys `by`: n, mean and CI half-width of each metric."""
    by = list(by)
    for key in by:
        if f"config.{key}" not in frame:
            raise ConfigError(
                f"--by {key!r} is not a config key of these runs; keys that vary: "
                f"{', '.join(varying_keys(frame)) or 'none'}"
            )
    complete = frame[frame["status"] == "complete"]
    data = pd.DataFrame({key: complete[f"config.{key}"] for key in by}, index=complete.index)
    metrics = list(metrics)
    for metric in metrics:
        data[metric] = metric_values(complete, metric)
    rows = []
    try:
        groups = list(data.groupby(by, sort=True, dropna=False)) if by else [((), data)]
    except TypeError:  # values of mixed types (e.g. null and numbers) do not sort
        groups = list(data.astype({key: str for key in by}).groupby(by, sort=True))
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        row: dict[str, Any] = dict(zip(by, values))
        row["n"] = len(group)
        for metric in metrics:
            mean, half = mean_ci(group[metric].dropna().to_numpy(), confidence)
            row[f"{metric}.mean"], row[f"{metric}.ci"] = mean, half
        rows.append(row)
    return pd.DataFrame(rows)
