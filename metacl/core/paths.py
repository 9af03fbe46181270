"""Where metacl keeps generated and downloaded data.

Order of precedence: an explicit argument (CLI flag or config field), then the
`METACL_DATA_DIR` environment variable, then `$XDG_CACHE_HOME/metacl` (default `~/.cache/metacl`).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "METACL_DATA_DIR"


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "metacl"
