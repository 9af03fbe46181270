"""Progress bars that can be silenced for batch logs (`quiet=true`)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    quiet: bool = False,
    unit: str = "it",
    initial: int = 0,
    unit_scale: bool = False,
) -> tqdm:
    """A tqdm bar on stderr; disabled entirely when `quiet`. `unit_scale` shows k/M prefixes (bytes)."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=quiet,
        unit=unit,
        initial=initial,
        unit_scale=unit_scale,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )
