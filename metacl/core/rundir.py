"""What a run directory is, who may write it, and what a command may delete.

A run directory is `<out_dir>/<name>`, `name` one plain path component. metacl recognises its
own run directories by the files it writes first (`config.yaml` and `env.json`), and deletes
nothing else. One process writes a run directory at a time: it holds an exclusive OS lock
(`flock`) on `<run>/.lock` for its lifetime. The kernel releases the lock when the process dies,
however it dies, so a killed run never leaves a stale lock, and a `running` status whose lock is
free belongs to a process that is gone (`stale`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError, MetaclError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not guarded
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
OWN_FILES = ("config.yaml", "env.json")
"""Files every metacl run directory holds from its first moment (written before any result)."""


class RunInUse(MetaclError):
    """Another live process holds the run directory's lock."""


def check_run_name(name: Any) -> str:
    """A run name is one plain path component; anything that could reach another folder is refused."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name {name!r}: a run name must be a non-empty folder name, e.g. name=my-run")
    if name in (".", "..") or "/" in name or "\\" in name or os.path.isabs(name) or "\0" in name:
        raise ConfigError(
            f"name {name!r}: a run name must be one folder name (no '/', '\\', '.' or "
            f"'..'); set out_dir= to choose where runs go"
        )
    return name


def is_run_directory(path: Path) -> bool:
    """Whether `path` is a folder that metacl created for a run (it holds config.yaml and env.json)."""
    return path.is_dir() and all((path / name).is_file() for name in OWN_FILES)


def user_files(path: Path) -> list[Path]:
    """The entries of a run directory other than its lock file."""
    return [p for p in path.iterdir() if p.name != LOCK_NAME] if path.is_dir() else []


def clear_run_directory(path: Path, out_dir: Path) -> None:
    """Delete a metacl run directory's contents (keeping its lock) for --overwrite, after checking
    that it is one and lies directly inside `out_dir`."""
    import shutil

    if path.resolve().parent != out_dir.resolve():
        raise MetaclError(f"--overwrite refused: {path} is not directly inside out_dir {out_dir}")
    if not is_run_directory(path):
        raise MetaclError(
            f"--overwrite refused: {path} is not a metacl run directory (it has no "
            f"{' and '.join(OWN_FILES)}); delete it yourself if you mean to"
        )
    for entry in user_files(path):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# ---------------------------------------------------------------------------------- the lock
def lock_holder(path: Path) -> dict[str, Any]:
    """What the lock file says about its holder ({} when unknown)."""
    try:
        return json.loads((path / LOCK_NAME).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def is_locked(path: Path) -> bool:
    """Whether a live process holds the run's lock (a shared probe: it never blocks a writer for long)."""
    if fcntl is None or not (path / LOCK_NAME).exists():
        return False
    try:
        with open(path / LOCK_NAME, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


class RunLock:
    """An exclusive lock on one run directory, held until `release()` or the process ends."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.handle: IO[str] | None = None

    def acquire(self, wait_s: float = 1.0) -> RunLock:
        """Take the lock or raise RunInUse naming the holder. Waits briefly, so that a status
        probe (`metacl runs ls`) at the same instant is not mistaken for a writer."""
        if fcntl is None:
            return self
        handle = open(self.path / LOCK_NAME, "a+")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.close()
                    holder = lock_holder(self.path)
                    raise RunInUse(
                        f"run {self.path} is in use by process {holder.get('pid', '?')} "
                        f"on host {holder.get('host', '?')}; wait for it to finish or stop "
                        f"it first"
                    ) from None
                time.sleep(0.05)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder_record()))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def holder_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


# ---------------------------------------------------------------------------------- status
def read_status(path: Path) -> dict[str, Any]:
    """The status record of run directory `path` ({"status": "missing"} if none), with `running`
    turned into `stale` when no live process holds the run's lock."""
    try:
        record = json.loads((Path(path) / "status.json").read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return {"status": "missing"}
    if record.get("status") == "running" and fcntl is not None and not is_locked(Path(path)):
        record["status"] = "stale"
    return record


# ---------------------------------------------------------------------------------- resume
IDENTITY_FREE_KEYS = ("name", "out_dir", "quiet", "tracking", "threads", "data_dir")
"""Top-level config keys that cannot change results; a default run name leaves them out."""
RESULT_FREE_KEYS = (*IDENTITY_FREE_KEYS, "device", "log_every", "checkpoint_every")
"""Config keys (and sections) that cannot change a run's results: a resume may change them."""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 0.001, ...}: nested mappings as dotted keys, everything else a value."""
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def config_differences(
    stored: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None, free_keys: tuple[str, ...] = ()
) -> list[str]:
    """'key: stored vs now' for every result-changing key (and not in `free_keys`) whose value differs.

    A key the stored config lacks is no difference when the new value is that key's default (a
    field added by a newer metacl: old run directories must still resume)."""
    old, now, default = flatten(stored), flatten(new), flatten(defaults or {})
    missing = object()

    def free(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in (*RESULT_FREE_KEYS, *free_keys))

    differences = []
    for key in sorted(set(old) | set(now)):
        before, after = old.get(key, missing), now.get(key, missing)
        if free(key) or before == after or after is missing:  # missing: a field metacl dropped
            continue
        if before is missing and default.get(key, missing) == after:
            continue
        show = lambda v: "(not set)" if v is missing else repr(v)  # noqa: E731
        differences.append(f"{key}: {show(before)} (stored) vs {show(after)} (now)")
    return differences


def check_resume(path: Path, config: Any, extend: bool = False) -> list[str]:
    """Refuse to resume `path` with a config of another experiment or with other results-changing
    values: the run directory must keep describing what produced it.

    With `extend`, the config's `length_keys()` may differ too, as far as its `check_extension`
    allows; returns those differences (what the extension changes)."""
    import yaml

    from .config import to_dict

    try:
        stored = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise MetaclError(f"cannot resume {path}: its config.yaml is unreadable ({error})") from None
    if stored.get("experiment") != config.experiment:
        raise MetaclError(
            f"cannot resume {path} as a {config.experiment!r} run: it is a "
            f"{stored.get('experiment')!r} run; choose another name="
        )
    cls = type(config)
    stored, length_keys = cls.upgrade(stored), config.length_keys() if extend else ()
    differences = config_differences(stored, to_dict(config), to_dict(cls()), free_keys=length_keys)
    if extend and (not differences or not length_keys):  # no length keys: it explains why not
        config.check_extension(stored)
    if differences:
        raise MetaclError(
            f"cannot resume {path} with a different config (a resumed run must be the "
            f"run its directory describes); differing keys:\n  "
            + "\n  ".join(differences)
            + "\nresume without these overrides, or start a new run with another name="
        )
    return config_differences(stored, to_dict(config), to_dict(cls())) if extend else []
