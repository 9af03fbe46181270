"""Figures for the reports: matplotlib without a screen, saved atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic import atomic_path


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (reports run on clusters and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write `fig` as a PNG to `path` atomically and free it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path
