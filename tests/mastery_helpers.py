"""Shared by the mastery test modules: tiny synthetic scenes that carry their labels in their
pixels, overrides that shrink any mastery config to seconds, and scripted test accuracies."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from metacl.core.experiment import execute, load_experiment_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mastery"


def write_scenes(path: Path, n: int, height: int = 16, width: int = 16, seed: int = 0) -> Path:
    """A reference-layout file whose pixels carry the labels: feature f lights its own 4x4 cell
    of channel f // 10, so small models learn every task in a few epochs."""
    rng = np.random.default_rng(seed)
    objects = rng.integers(4, 6, n)
    D = np.full((n, 5, 3), 255, np.uint8)
    for dimension in range(3):
        D[:, :, dimension] = rng.random((n, 10)).argsort(1)[:, :5] + 10 * dimension
    D[objects == 4, 4, :] = 255
    y = np.zeros((n, 30), np.uint8)
    rows, features = np.repeat(np.arange(n), 15), D.reshape(-1)
    y[rows[features != 255], features[features != 255]] = 1
    X = rng.integers(0, 70, (n, height, width, 3), dtype=np.uint8)
    for feature in range(30):
        channel, cell = divmod(feature, 10)
        r, c = divmod(cell, 4)
        X[y[:, feature] == 1, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4, channel] = 220
    with h5py.File(path, "w") as f:
        f["X"], f["D"], f["y"] = X, D, y
        f["Q"] = np.broadcast_to(np.eye(30, dtype=np.uint8), (n, 30, 30))
        f["properties"] = np.array([f"feature{i}" for i in range(30)], dtype="S")
    return path


def tiny(scenes: Path, out: Path, *extra: str) -> list[str]:
    """Overrides that shrink any mastery config to a few seconds on the synthetic scenes."""
    return [
        f"data.path={scenes}",
        f"out_dir={out}",
        "device=cpu",
        "quiet=true",
        "model.channels=[4, 8]",
        "model.hidden=[64, 64]",
        "tasks.num_tasks=3",
        "train.lr=0.01",
        "train.batch_size=60",
        "train.eval_batch_size=100",
        "train.max_epochs_per_episode=6",
        "tracking.console_every=1000",
        *extra,
    ]


def run_config(path: Path | None, overrides: list[str], mode: str = "new"):
    config = load_experiment_config(path, overrides, "mastery")
    run_dir, final = execute(config, mode)
    tables = {
        name: pd.read_parquet(run_dir / f"{name}.parquet")
        for name in ("epochs", "criterion", "forgetting")
        if (run_dir / f"{name}.parquet").exists()
    }
    return run_dir, final, tables


def scripted_evaluate(script: list[list[float]]):
    """An `evaluate` that returns the next scripted accuracy list (one entry per task) per call."""
    calls = iter(script)

    def evaluate(model, data, tasks, batch_size, **options):
        acc = next(calls)
        assert len(acc) == len(tasks), (acc, tasks)
        return {"acc": list(acc), "loss": [1.0 - a for a in acc]}

    return evaluate
