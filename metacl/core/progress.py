"""Progress bars that can be silenced for batch logs (`quiet=true`)."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             quiet: bool = False, unit: str = "it", initial: int = 0) -> tqdm:
    """A tqdm bar on stderr; disabled entirely when `quiet`."""
    return tqdm(iterable, total=total, desc=desc, disable=quiet, unit=unit, initial=initial,
                file=sys.stderr, dynamic_ncols=True, leave=False)
