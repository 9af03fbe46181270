"""Downloads that are checked, retried, time-limited, and never leave a partial file looking complete.

The bytes stream into a hidden temporary file next to the target, with an md5 computed on the
way; only a complete, verified file is renamed to the target name.

Time limits: connecting (TCP and TLS) may take at most CONNECT_TIMEOUT_S per attempt, and a
download gives up once the server has sent nothing for `timeout` seconds, counted over all its
attempts (and the pauses between them), so a server that accepts the connection and never
answers fails after about `timeout` seconds, while a slow transfer that keeps receiving data is
never cut off. `timeout` is the `--timeout` flag of `metacl data omniglot`, else
$METACL_DOWNLOAD_TIMEOUT, else DEFAULT_TIMEOUT_S.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import logging
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from ...core.atomic import temp_sibling, write_error_message
from ...core.errors import ConfigError, DataError
from ...core.progress import progress

log = logging.getLogger(__name__)

BLOCK = 1 << 20
DEFAULT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
TIMEOUT_ENV = "METACL_DOWNLOAD_TIMEOUT"
"""Environment variable: seconds a download may go without receiving data (default 30)."""
RAISE_TIMEOUT_HINT = f"allow more time with `metacl data omniglot --timeout SECONDS` or {TIMEOUT_ENV}=SECONDS"


class _BadDownload(Exception):
    """The transfer finished but the bytes are incomplete or have the wrong md5."""


def download_timeout(explicit: float | None = None) -> float:
    """Seconds a download may wait for data: `explicit`, else $METACL_DOWNLOAD_TIMEOUT, else 30."""
    if explicit is not None:
        value, source = explicit, "--timeout"
    elif os.environ.get(TIMEOUT_ENV, "").strip():
        value, source = os.environ[TIMEOUT_ENV].strip(), TIMEOUT_ENV
    else:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{source} must be a positive number of seconds, got {value!r}")
    return seconds


def download(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    *,
    retries: int = 3,
    backoff_s: float = 2.0,
    timeout_s: float | None = None,
    quiet: bool = False,
) -> Path:
    """Fetch `url` to `dest`; try up to `retries` times within the time limit (see the module
    docstring; `timeout_s` None: $METACL_DOWNLOAD_TIMEOUT or 30 s), then raise DataError naming
    the last problem."""
    timeout_s = download_timeout(timeout_s)
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(write_error_message(error, dest.parent, _write_hint(dest))) from None
    problem, timed_out, attempts = "no attempt made", False, 0
    deadline = time.monotonic() + timeout_s
    for attempt in range(1, retries + 1):
        attempts = attempt
        last_data: list[float] = []
        try:
            _fetch_once(url, dest, md5, deadline - time.monotonic(), quiet, last_data)
            return dest
        except (OSError, urllib.error.URLError, http.client.HTTPException, _BadDownload) as error:
            timed_out = _is_timeout(error)
            problem = str(error) or type(error).__name__
            log.warning("download of %s failed (attempt %d of %d): %s", url, attempt, retries, problem)
        if last_data:  # the server was alive: the silence is counted from its last bytes
            deadline = max(deadline, last_data[-1] + timeout_s)
        pause = backoff_s * attempt
        if attempt == retries or time.monotonic() + pause >= deadline:
            break
        time.sleep(pause)
    if timed_out or time.monotonic() >= deadline:
        raise DataError(
            f"could not download {url}: no answer from the server within the "
            f"{timeout_s:g} s download timeout ({attempts} attempt(s); last problem: "
            f"{problem}). The server may be down or unreachable from this machine; if it "
            f"is only slow, {RAISE_TIMEOUT_HINT}. Or download the file yourself and "
            f"save it as {dest}; files already there are used as they are."
        )
    raise DataError(
        f"could not download {url} after {attempts} attempt(s): {problem}. "
        f"Download it yourself and save it as {dest}; "
        "files already there are used as they are."
    )


def _write_hint(dest: Path) -> str:
    return f"save {dest.name} there yourself or choose a writable data folder (--data-dir)"


def _is_timeout(error: BaseException) -> bool:
    return isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError)


def _fetch_once(url: str, dest: Path, md5: str | None, timeout_s: float, quiet: bool, last_data: list[float]) -> None:
    if timeout_s <= 0:
        raise TimeoutError("timed out")
    hint = _write_hint(dest)
    try:
        fd, tmp = temp_sibling(dest, suffix=".part")
    except OSError as error:
        raise DataError(write_error_message(error, dest.parent, hint)) from None
    try:
        with os.fdopen(fd, "wb") as out, _opener().open(url, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            digest, received = hashlib.md5(), 0
            with progress(
                total=expected, desc=f"downloading {dest.name}", unit="B", unit_scale=True, quiet=quiet
            ) as bar:
                while block := response.read(BLOCK):
                    last_data.append(time.monotonic())
                    try:
                        out.write(block)
                    except OSError as error:
                        raise DataError(write_error_message(error, dest.parent, hint)) from None
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and received != expected:
            raise _BadDownload(f"incomplete transfer: {received} of {expected} bytes")
        if md5 is not None and digest.hexdigest() != md5:
            raise _BadDownload(f"md5 mismatch: got {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# ------------------------------------------------------------------ a short connect timeout
# urllib applies one timeout to connecting and to every read; these handlers connect (TCP, proxy
# tunnel and TLS handshake) within CONNECT_TIMEOUT_S and then wait for data up to the timeout.


@functools.cache
def _connect_limited(http_class: type) -> type:
    class Connection(http_class):
        def connect(self):
            read_timeout = self.timeout
            if isinstance(read_timeout, (int, float)):
                self.timeout = min(CONNECT_TIMEOUT_S, read_timeout)
            try:
                super().connect()
            finally:
                self.timeout = read_timeout
            if isinstance(read_timeout, (int, float)):
                self.sock.settimeout(read_timeout)

    Connection.__name__ = Connection.__qualname__ = f"ConnectLimited{http_class.__name__}"
    return Connection


class _ConnectLimited:
    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_connect_limited(http_class), req, **kwargs)


class _HTTPHandler(_ConnectLimited, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_ConnectLimited, urllib.request.HTTPSHandler):
    pass


def _opener() -> urllib.request.OpenerDirector:
    """urllib's usual opener (proxies from the environment, redirects, file:// URLs) with the
    connect timeout."""
    return urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)
