"""Downloads that are checked, retried, and never leave a partial file looking complete.

The bytes stream into a hidden temporary file next to the target, with an md5 computed on the
way; only a complete, verified file is renamed to the target name.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ...core.errors import DataError
from ...core.progress import progress
from .cache import make_shareable

log = logging.getLogger(__name__)

BLOCK = 1 << 20


class _BadDownload(Exception):
    """The transfer finished but the bytes are incomplete or have the wrong md5."""


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: str | os.PathLike, md5: str | None = None, *, retries: int = 3,
             backoff_s: float = 2.0, timeout_s: float = 60.0, quiet: bool = False) -> Path:
    """Fetch `url` to `dest`; try `retries` times, then raise DataError naming the last problem."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    problem = "no attempt made"
    for attempt in range(1, retries + 1):
        try:
            _fetch_once(url, dest, md5, timeout_s, quiet)
            return dest
        except (OSError, urllib.error.URLError, http.client.HTTPException, _BadDownload) as error:
            problem = str(error) or type(error).__name__
            log.warning("download of %s failed (attempt %d of %d): %s", url, attempt, retries, problem)
            if attempt < retries:
                time.sleep(backoff_s * attempt)
    raise DataError(f"could not download {url} after {retries} attempt(s): {problem}. "
                    f"Download it yourself and save it as {dest}; "
                    "files already there are used as they are.")


def _fetch_once(url: str, dest: Path, md5: str | None, timeout_s: float, quiet: bool) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            digest, received = hashlib.md5(), 0
            with progress(total=expected, desc=f"downloading {dest.name}", unit="B", unit_scale=True,
                          quiet=quiet) as bar:
                while block := response.read(BLOCK):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and received != expected:
            raise _BadDownload(f"incomplete transfer: {received} of {expected} bytes")
        if md5 is not None and digest.hexdigest() != md5:
            raise _BadDownload(f"md5 mismatch: got {digest.hexdigest()}, expected {md5}")
        make_shareable(Path(tmp))
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
