"""Atomic file writes: write a temporary sibling, fsync, then rename over the target.

A killed process therefore leaves either the old file or the new one, never a truncated file
that looks valid.

Permissions: the final file gets the mode any newly created file gets (0666 minus the user's
umask, or what the folder's default ACL says), as if it had been written in place, so results
in a shared folder stay readable by colleagues. (`tempfile.mkstemp` would make every result
0600.) The temporary file is created with mode 0666 and the kernel applies the umask, so the
umask is never changed, not even for an instant (changing it races with other threads).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import DataError

_TEMP_FLAGS = (
    os.O_RDWR
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def temp_sibling(path: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create a new hidden file `.<name>.<random><suffix>` next to `path`: (open fd, its path).

    Unlike `tempfile.mkstemp` (always 0600) it gets the usual mode of a new file: 0666 & ~umask.
    """
    path = Path(path)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def file_mode(fd: int) -> int:
    """The permission bits of an open file."""
    return stat.S_IMODE(os.fstat(fd).st_mode)


def new_file_mode() -> int:
    """The mode a file created now gets from the umask: 0666 & ~umask (without changing the umask
    where /proc tells it; otherwise it is set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to `path`; on clean exit it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_sibling(path)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for libraries that write by file name (h5py, pyarrow, torch)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_sibling(path)
    try:
        wanted = file_mode(fd)
    finally:
        os.close(fd)
    try:
        yield tmp
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.stat(tmp).st_mode) != wanted:  # the library made a file of its own
                os.chmod(tmp, wanted)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def check_writable_dir(folder: str | os.PathLike, hint: str = "") -> Path:
    """Raise DataError unless files can be created in `folder`, or in the folders that would be
    created for it; creates nothing. `hint` ends the message (what the user can do)."""
    folder = Path(folder)
    existing = folder
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    tail = f"; {hint}" if hint else ""
    if not existing.is_dir():
        raise DataError(f"cannot write to {folder}: {existing} is a file, not a folder{tail}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f" (the nearest existing folder, {existing})"
        raise DataError(f"cannot write to {folder}: {_why_not_writable(existing)}{where}{tail}")
    return folder


def _why_not_writable(folder: Path) -> str:
    with contextlib.suppress(OSError, AttributeError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    return "permission denied"


def write_error_message(error: OSError, folder: str | os.PathLike, hint: str = "") -> str:
    """A message for an OSError met while writing into `folder`: where, why, what to do."""
    reason = {
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "read-only file system",
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
    }.get(error.errno or 0)
    reason = reason or (error.strerror or str(error)).lower()
    where = error.filename or folder
    return f"cannot write to {where}: {reason}" + (f"; {hint}" if hint else "")
