"""A run directory and the life cycle of the run that writes it.

    <out_dir>/<name>/
        config.yaml      resolved config
        env.json         versions, device, git commit, command line
        log.txt          the run's log
        status.json      running | interrupted | failed | diverged | complete (+ error or final
                         metrics), the writer's pid and host and a heartbeat
        data.json        fingerprint of the data the run trained on (checked on resume)
        <table>.parquet  tidy metrics tables
        checkpoints/     last.pt, last-previous.pt (the one before) and named checkpoints
        .lock            held by the one process that writes the directory (see rundir.py)

Every file is written atomically. `save_checkpoint` flushes the tables and records their
lengths; `load_checkpoint` truncates the tables back to those lengths, so a run resumed after a
hard kill logs each row exactly once and ends as an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

from . import atomic
from .checkpoint import load_checkpoint, save_checkpoint
from .config import to_dict, to_yaml
from .environment import environment
from .errors import DataError, MetaclError
from .rundir import RunLock, check_resume, check_run_name, clear_run_directory, holder_record, read_status, user_files
from .table import MetricsTable
from .tracking import build_tracker

__all__ = ["Mode", "Run", "Status"]

Status = Literal["running", "interrupted", "failed", "diverged", "complete"]
Mode = Literal["new", "resume", "extend", "overwrite"]


class Run:
    """Owns one run directory: files, logger, tracker, tables, checkpoints and stop requests."""

    def __init__(
        self,
        path: Path,
        config: Any,
        device: torch.device,
        tracker: Any = None,
        lock: RunLock | None = None,
        accept_data_change: bool = False,
    ):
        self.path = Path(path)
        self.config = config
        self.device = device
        self.lock = lock
        self.accept_data_change = accept_data_change
        self.created = False  # whether opening the run created its directory
        self._status: dict[str, Any] = {}
        self.log = _file_logger(self.path)
        self.tables: dict[str, MetricsTable] = {}
        self.stop_requested = False
        self.tracker = tracker or build_tracker(config.tracking, self.path, self.path.name, to_dict(config), self.log)

    # ------------------------------------------------------------------------------ creation
    @classmethod
    def open(cls, config: Any, device: torch.device, mode: Mode = "new", accept_data_change: bool = False) -> Run:
        """Create, resume or overwrite the run directory, holding its lock from the first write.

        Everything that can be refused is checked before any file is deleted or written."""
        check_run_name(config.name)
        out_dir = Path(config.out_dir)
        path = out_dir / config.name
        if path.exists() and not path.is_dir():
            raise MetaclError(f"{path} exists and is not a directory; choose another name=")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise MetaclError(
                f"cannot create run directory {path}: {error.strerror}; choose a writable out_dir="
            ) from None
        try:
            lock = RunLock(path).acquire()
        except BaseException:
            if created:
                path.rmdir()
            raise
        try:
            existing = user_files(path)
            if existing and mode == "new":
                raise MetaclError(
                    f"run directory {path} already exists (status: {read_status(path)['status']}); "
                    f"pass --resume to continue it, --overwrite to start again, or choose another "
                    f"name=..."
                )
            if existing and mode == "overwrite":
                clear_run_directory(path, out_dir)
            resumed = bool(existing) and mode in ("resume", "extend")
            lengthened = check_resume(path, config, extend=mode == "extend") if resumed else []
            if lengthened:  # the run directory describes the longer run from now on
                atomic.write_text(path / "config.yaml", to_yaml(config))
            elif not resumed:
                atomic.write_text(path / "config.yaml", to_yaml(config))
                atomic.write_text(path / "env.json", json.dumps(environment(device), indent=2))
        except BaseException:
            lock.release()
            if created:
                import shutil

                shutil.rmtree(path, ignore_errors=True)
            raise
        run = cls(path, config, device, lock=lock, accept_data_change=accept_data_change)
        run.created = created
        if resumed:
            run.log.info("resuming on %s (pid %d, host %s)", device, *holder_record().values())
        if lengthened:
            run.log.info("extended: %s", "; ".join(lengthened))
        return run

    # ------------------------------------------------------------------------------ files
    def table(self, name: str) -> MetricsTable:
        if name not in self.tables:
            self.tables[name] = MetricsTable(self.path / f"{name}.parquet")
        return self.tables[name]

    def flush(self) -> None:
        for table in self.tables.values():
            table.flush()

    def set_status(self, status: Status, **info: Any) -> None:
        record = {"status": status, **info, **holder_record(), "heartbeat": time.time()}
        atomic.write_text(self.path / "status.json", json.dumps(record, indent=2, default=str))
        self._status = record

    def heartbeat(self) -> None:
        """Refresh status.json's heartbeat (at every checkpoint): when the run was last alive."""
        if self._status.get("status") == "running":
            status = {k: v for k, v in self._status.items() if k not in ("status", "pid", "host", "heartbeat")}
            self.set_status("running", **status)

    def check_data(self, fingerprint: dict[str, Any]) -> None:
        """Record what data a new run trains on; refuse to resume on different data unless the
        user accepted the change (--accept-data-change)."""
        path = self.path / "data.json"
        if path.exists():
            stored = json.loads(path.read_text())
            if stored == json.loads(json.dumps(fingerprint, default=str)):
                return
            changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
            if not self.accept_data_change:
                raise DataError(
                    f"the data differs from what {self.path} trained on ({', '.join(changed)}"
                    f"; stored in data.json); resume with --accept-data-change to go on "
                    f"with the new data anyway"
                )
            self.log.warning("data changed (%s); continuing as --accept-data-change asks", ", ".join(changed))
        atomic.write_text(path, json.dumps(fingerprint, indent=2, default=str))

    def checkpoint_path(self, name: str = "last") -> Path:
        return self.path / "checkpoints" / f"{name}.pt"

    def save_checkpoint(self, state: dict[str, Any], name: str = "last") -> Path:
        """Flush the tables, then write the checkpoint; `last` keeps the one before it as
        `last-previous`, so a damaged `last.pt` never loses the run."""
        self.flush()
        state = {**state, "_table_lengths": {k: len(t) for k, t in self.tables.items()}}
        previous = self.checkpoint_path(f"{name}-previous") if name == "last" else None
        path = save_checkpoint(state, self.checkpoint_path(name), previous=previous)
        self.heartbeat()
        return path

    def load_checkpoint(self, name: str = "last") -> dict[str, Any] | None:
        """The checkpoint's state (tables rewound to it), or None when the run starts fresh.

        An unreadable `last.pt` (truncated by a full disk, say) falls back to `last-previous.pt`."""
        path = self.checkpoint_path(name)
        previous = self.checkpoint_path(f"{name}-previous")
        try:
            state = load_checkpoint(path) if path.exists() else None
        except DataError as error:
            if not previous.exists():
                raise
            self.log.warning("%s; falling back to the checkpoint before it, %s", error, previous.name)
            state = None
        if state is None and previous.exists():
            path, state = previous, load_checkpoint(previous)
        if state is None:
            return None
        lengths = state.pop("_table_lengths", {})
        # a table the checkpoint does not know was started after it: its rows go too
        for table_name in {*lengths, *(p.stem for p in self.path.glob("*.parquet"))}:
            self.table(table_name).truncate(lengths.get(table_name, 0))
        self.log.info("resumed from %s", path)
        return state

    # ------------------------------------------------------------------------------ stopping
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT ask the run to checkpoint at its next safe point and exit cleanly."""

        def request_stop(signum, _frame):
            if self.stop_requested:  # a second signal stops at once
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log.warning("received %s: checkpointing at the next safe point", signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def close(self) -> None:
        """Flush and close everything; the lock goes last, after the final status is written."""
        try:
            self.flush()
            self.tracker.close()
        finally:
            for handler in list(self.log.handlers):
                handler.close()
                self.log.removeHandler(handler)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def tensor_digest(*tensors: torch.Tensor, max_rows: int = 4096) -> str:
    """A content hash of tensors for data.json: shapes, dtypes and up to `max_rows` evenly spaced
    rows of each (every row of small data), so it costs milliseconds even for gigabytes."""
    import hashlib

    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
        rows = tensor[:: max(1, -(-tensor.shape[0] // max_rows))] if tensor.ndim else tensor
        digest.update(rows.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _file_logger(path: Path) -> logging.Logger:
    logger = logging.getLogger(f"metacl.run.{path.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in (logging.FileHandler(path / "log.txt"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger
