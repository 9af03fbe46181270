"""Trackers: TensorBoard event files and offline W&B runs are written and read back; no API
key ever reaches a run directory."""

import json
import struct
from pathlib import Path

import pandas as pd
import pytest

from metacl.core.config import ConfigError
from metacl.core.experiment import execute, load_experiment_config

TOY = "tests.toy_experiment"
SECRET = "metacl-test-secret-0123456789abcdef"


def toy(tmp_path, *overrides):
    return load_experiment_config(
        None, [f"out_dir={tmp_path}", "device=cpu", "name=run", "tracking.console_every=1000", *overrides], TOY
    )


def tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), purge_orphaned_data=True)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (LevelDB log format, W&B header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, chunks = 7, 32768, []
    while position + 7 <= len(data):
        if block - position % block < 7:  # block trailer padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def test_tensorboard_scalars_match_the_table_after_a_resume(tmp_path, monkeypatch):
    """A run that crashes at step 13 and resumes from its step-10 checkpoint shows every step
    once in TensorBoard, with the values of its metrics table."""
    crashed = toy(tmp_path, "tracking.backends=[tensorboard]")
    monkeypatch.setenv("TOY_CRASH_AT", "13")
    with pytest.raises(ValueError, match="planned failure"):
        execute(crashed)
    monkeypatch.delenv("TOY_CRASH_AT")
    path, _ = execute(toy(tmp_path, "tracking.backends=[tensorboard]"), "resume")
    table = pd.read_parquet(path / "metrics.parquet")
    scalars = tensorboard_scalars(path / "tensorboard", "walk/position")
    assert [step for step, _ in scalars] == list(range(1, 21))
    assert [value for _, value in scalars] == pytest.approx(list(table.position), rel=1e-6)
    assert len(list((path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_wandb_offline_run_is_readable_and_holds_no_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    path, final = execute(toy(tmp_path, "tracking.backends=[tensorboard,wandb]", "walk.steps=6"))
    [run_file] = (path / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item}
            history[int(items["_step"])] = float(items["walk/position"])
        if record.WhichOneof("record_type") == "run":
            config = {u.key: u.value_json for u in record.run.config.update}
            assert record.run.project == "metacl" and record.run.display_name == "run"
    table = pd.read_parquet(path / "metrics.parquet")
    assert history == dict(zip(table.step, table.position))
    assert history[6] == final["position"]
    assert json.loads(config["seed"]) == 0 and json.loads(config["walk"])["steps"] == 6
    for file in path.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), f"API key written to {file}"


def test_unknown_tracker_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'; valid choices: console, tensorboard, wandb"):
        toy(tmp_path, "tracking.backends=[mlflow]")
