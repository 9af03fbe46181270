"""A run directory and the life cycle of the run that writes it.

    <out_dir>/<name>/
        config.yaml      resolved config
        env.json         versions, device, git commit, command line
        log.txt          the run's log
        status.json      running | interrupted | failed | complete (+ error or final metrics)
        <table>.parquet  tidy metrics tables
        checkpoints/     last.pt and named checkpoints

Every file is written atomically. `save_checkpoint` flushes the tables and records their
lengths; `load_checkpoint` truncates the tables back to those lengths, so a run resumed after a
hard kill logs each row exactly once and ends as an uninterrupted run would.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from ..tracking import build_tracker
from . import atomic
from .checkpoint import load_checkpoint, save_checkpoint
from .config import to_dict, to_yaml
from .environment import environment
from .errors import MetaclError
from .table import MetricsTable

Status = Literal["running", "interrupted", "failed", "complete"]
Mode = Literal["new", "resume", "overwrite"]


def read_status(path: Path) -> dict[str, Any]:
    """The status record of run directory `path` ({"status": "missing"} if none)."""
    try:
        return json.loads((Path(path) / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"status": "missing"}


class Run:
    """Owns one run directory: files, logger, tracker, tables, checkpoints and stop requests."""

    def __init__(self, path: Path, config: Any, device: torch.device, tracker: Any = None):
        self.path = Path(path)
        self.config = config
        self.device = device
        self.log = _file_logger(self.path)
        self.tables: dict[str, MetricsTable] = {}
        self.stop_requested = False
        self.tracker = tracker or build_tracker(config.tracking, self.path, self.path.name,
                                                to_dict(config), self.log)

    # ------------------------------------------------------------------------------ creation
    @classmethod
    def open(cls, config: Any, device: torch.device, mode: Mode = "new") -> "Run":
        path = Path(config.out_dir) / config.name
        status = read_status(path)["status"]
        if path.exists() and any(path.iterdir()):
            if mode == "new":
                raise MetaclError(
                    f"run directory {path} already exists (status: {status}); pass --resume to "
                    f"continue it, --overwrite to start again, or choose another name=...")
            if mode == "overwrite":
                import shutil
                shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path / "config.yaml", to_yaml(config))
        atomic.write_text(path / "env.json", json.dumps(environment(device), indent=2))
        return cls(path, config, device)

    # ------------------------------------------------------------------------------ files
    def table(self, name: str) -> MetricsTable:
        if name not in self.tables:
            self.tables[name] = MetricsTable(self.path / f"{name}.parquet")
        return self.tables[name]

    def flush(self) -> None:
        for table in self.tables.values():
            table.flush()

    def set_status(self, status: Status, **info: Any) -> None:
        record = {"status": status, **info}
        atomic.write_text(self.path / "status.json", json.dumps(record, indent=2, default=str))

    def checkpoint_path(self, name: str = "last") -> Path:
        return self.path / "checkpoints" / f"{name}.pt"

    def save_checkpoint(self, state: dict[str, Any], name: str = "last") -> Path:
        self.flush()
        state = {**state, "_table_lengths": {k: len(t) for k, t in self.tables.items()}}
        return save_checkpoint(state, self.checkpoint_path(name))

    def load_checkpoint(self, name: str = "last") -> dict[str, Any] | None:
        """The checkpoint's state (tables rewound to it), or None when the run starts fresh."""
        path = self.checkpoint_path(name)
        if not path.exists():
            return None
        state = load_checkpoint(path)
        for table_name, length in state.pop("_table_lengths", {}).items():
            self.table(table_name).truncate(length)
        self.log.info("resumed from %s", path)
        return state

    # ------------------------------------------------------------------------------ stopping
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT ask the run to checkpoint at its next safe point and exit cleanly."""
        def request_stop(signum, _frame):
            if self.stop_requested:  # a second signal stops at once
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log.warning("received %s: checkpointing at the next safe point",
                             signal.Signals(signum).name)
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def close(self) -> None:
        self.flush()
        self.tracker.close()
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)


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
