"""Run directories can never be corrupted: names, --overwrite, one writer, checked resumes,
validation before anything exists, divergence, full disks and the command line (issue: user data
is sacred). None of these depends on float results of training."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from metacl.cli import main
from metacl.core import table as table_module
from metacl.core.config import to_yaml
from metacl.core.errors import DataError, MetaclError, RunDiverged
from metacl.core.experiment import execute, load_experiment_config
from metacl.core.rundir import RunInUse, RunLock, read_status
from metacl.mastery import experiment as mastery
from tests.mastery_helpers import tiny

TOY = "tests.toy_experiment"
MASTERY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mastery" / "quick.yaml"


def toy(tmp_path: Path, *overrides: str):
    return load_experiment_config(
        None, [f"out_dir={tmp_path}", "device=cpu", "name=walk", "tracking.console_every=1000", *overrides], TOY
    )


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its size, to prove a command changed nothing."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def mastery_args(scenes: Path, out: Path, *extra: str) -> list[str]:
    return ["mastery", "run", str(MASTERY_CONFIG), *tiny(scenes, out, *extra)]


# ----------------------------------------------------------------- 1. names and --overwrite
@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "/abs", "a\\b"])
def test_a_run_name_is_one_folder_name(name, scenes, tmp_path, capsys):
    out = tmp_path / "runs"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "results.csv").write_text("precious")
    (tmp_path / "sibling.txt").write_text("precious")
    before = snapshot(tmp_path)
    assert main(mastery_args(scenes, out, f"name={name}", "--overwrite")) == 2
    assert "name" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_overwrite_deletes_only_a_metacl_run_directory(tmp_path):
    folder = tmp_path / "walk"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(MetaclError, match="not a metacl run directory"):
        execute(toy(tmp_path), "overwrite")
    assert (folder / "thesis.tex").read_text() == "precious"
    folder.joinpath("thesis.tex").unlink()
    path, first = execute(toy(tmp_path))
    (path / "stray.txt").write_text("x")
    path, again = execute(toy(tmp_path), "overwrite")
    assert again == first and not (path / "stray.txt").exists()


# ----------------------------------------------------------------- 2. one writer
def start_toy(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    config = toy(tmp_path, "walk.steps=100", "walk.step_seconds=0.05", *overrides)
    config_file = tmp_path / "walk.yaml"
    config_file.write_text(to_yaml(config))
    return subprocess.Popen(
        [sys.executable, "-m", "metacl.launch.worker", str(config_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_until(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_second_writer_is_refused_and_a_dead_one_leaves_a_stale_run(tmp_path):
    process = start_toy(tmp_path)
    path = tmp_path / "walk"
    try:
        wait_until(lambda: (path / "checkpoints" / "last.pt").exists())
        assert read_status(path)["status"] == "running"
        assert read_status(path)["pid"] == process.pid
        busy = toy(tmp_path, "walk.steps=100", "walk.step_seconds=0.05")
        before = snapshot(path / "checkpoints")
        for mode in ("resume", "overwrite", "new"):
            with pytest.raises((RunInUse, MetaclError), match=f"in use by process {process.pid}"):
                execute(busy, mode)
        assert set(before) <= set(snapshot(path / "checkpoints"))  # nothing deleted
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert read_status(path)["status"] == "stale"  # says running; its writer is gone
    final = execute(busy, "resume")[1]  # and a resume takes it over
    assert final["steps"] == 100 and read_status(path)["status"] == "complete"


def test_status_records_pid_host_and_heartbeat(tmp_path):
    path, _ = execute(toy(tmp_path))
    status = json.loads((path / "status.json").read_text())
    assert status["pid"] == os.getpid() and status["host"] and status["heartbeat"] <= time.time()


# ----------------------------------------------------------------- 3. checked resumes
def crash_at_13(tmp_path, monkeypatch, *overrides):
    monkeypatch.setenv("TOY_CRASH_AT", "13")
    with pytest.raises(ValueError):
        execute(toy(tmp_path, *overrides))
    monkeypatch.delenv("TOY_CRASH_AT")
    return tmp_path / "walk"


def test_resume_refuses_a_results_changing_config_and_allows_the_rest(tmp_path, monkeypatch):
    path = crash_at_13(tmp_path, monkeypatch)
    stored = (path / "config.yaml").read_text()
    with pytest.raises(MetaclError) as refused:
        execute(toy(tmp_path, "walk.scale=2", "seed=5"), "resume")
    assert "walk.scale: 1.0 (stored) vs 2.0 (now)" in str(refused.value)
    assert "seed: 0 (stored) vs 5 (now)" in str(refused.value)
    assert (path / "config.yaml").read_text() == stored
    final = execute(
        toy(tmp_path, "threads=1", "quiet=true", "tracking.console_every=7", "walk.checkpoint_every=5"), "resume"
    )[1]
    assert final == execute(toy(tmp_path / "ref"))[1]
    assert (path / "config.yaml").read_text() == stored  # the directory still describes its run
    with pytest.raises(MetaclError, match="walk.scale"):  # a complete run too
        execute(toy(tmp_path, "walk.scale=2"), "resume")


def test_resume_refuses_another_experiment(scenes, tmp_path, capsys):
    execute(toy(tmp_path))
    before = snapshot(tmp_path)
    assert main(mastery_args(scenes, tmp_path, "name=walk", "--resume")) == 2
    assert "it is a 'tests.toy_experiment' run" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_resume_refuses_different_data_unless_accepted(tmp_path, monkeypatch):
    path = crash_at_13(tmp_path, monkeypatch)
    assert json.loads((path / "data.json").read_text()) == {"source": "v1"}
    monkeypatch.setenv("TOY_DATA", "v2")
    with pytest.raises(DataError, match="data differs.*--accept-data-change"):
        execute(toy(tmp_path), "resume")
    assert execute(toy(tmp_path), "resume", accept_data_change=True)[1]["steps"] == 20
    assert json.loads((path / "data.json").read_text()) == {"source": "v2"}


def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(tmp_path, monkeypatch):
    path = crash_at_13(tmp_path, monkeypatch)  # checkpoints at steps 5 and 10
    checkpoints = path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last-previous.pt", "last.pt"]
    data = (checkpoints / "last.pt").read_bytes()
    (checkpoints / "last.pt").write_bytes(data[: len(data) // 2])  # truncated by a full disk
    final = execute(toy(tmp_path), "resume")[1]
    assert final == execute(toy(tmp_path / "ref"))[1]
    assert "falling back to the checkpoint before it" in (path / "log.txt").read_text()
    table = pd.read_parquet(path / "metrics.parquet")
    assert list(table.step) == list(range(1, 21))


def test_a_file_that_is_not_a_metacl_checkpoint_is_refused_plainly(tmp_path):
    import pickle

    from metacl.core.checkpoint import load_checkpoint

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(ValueError("not a state")))
    with pytest.raises(DataError, match="not a metacl checkpoint") as error:
        load_checkpoint(path)
    assert "weights_only" not in str(error.value)


# ----------------------------------------------------------------- 4. validation first
@pytest.mark.parametrize(
    "override, message",
    [
        ("train.new_task_share=1.5", "train.new_task_share: 1.5 is out of range; valid values: (0, 1)"),
        ("train.lr=-1", "train.lr: -1"),
        ("train.lr=.inf", "not a finite number"),
        ("model.channels=[0]", "model.channels[0]: 0 is out of range"),
        ("model.channels=[]", "model.channels: must not be empty"),
        ("train.batch_size=0", "train.batch_size: 0 is out of range; valid values: >= 1"),
        ("threads=0", "threads"),
    ],
)
def test_bad_values_are_refused_before_anything_exists(override, message, scenes, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(mastery_args(scenes, out, override)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.remember_size=-1", "train.remember_size: -1 is out of range"),
        ("train.episodes=0", "train.episodes: 0"),
        ("log_every=0", "log_every: 0"),
        ("model.rln_channels=0", "cannot be built"),
        ("model.widht=3", "valid arguments: num_classes"),
        ("train.outer_lr=-1", "train.outer_lr"),
    ],
)
def test_meta_train_values_are_checked_by_config_show(override, message, capsys):
    config = str(Path(__file__).resolve().parents[1] / "configs" / "meta" / "anml.yaml")
    assert main(["config", "show", config, override]) == 2
    assert message in capsys.readouterr().err


def test_a_run_refused_inside_run_leaves_no_folder(scenes, tmp_path, capsys):
    config = str(MASTERY_CONFIG.parent / "quick" / "query-modulated.yaml")
    out = tmp_path / "runs"
    assert main(["mastery", "run", config, *tiny(scenes, out, "model.levels=[5]")]) == 2
    assert "levels" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_yaml_problems_are_named(tmp_path, capsys):
    cases = {
        "dup.yaml": ("experiment: mastery\nseed: 1\nseed: 2\n", "duplicate key 'seed'"),
        "cycle.yaml": ("extends: cycle2.yaml\nseed: 1\n", "extends forms a cycle"),
        "cycle2.yaml": ("extends: cycle.yaml\n", "extends forms a cycle"),
        "bad_extends.yaml": ("extends: [a, b]\n", "extends must be the path"),
    }
    for name, (text, _) in cases.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "latin1.yaml").write_bytes("experiment: mastery\nname: caf\xe9\n".encode("latin-1"))
    cases["latin1.yaml"] = ("", "not a UTF-8 text file")
    for name, (_, message) in cases.items():
        assert main(["config", "show", str(tmp_path / name)]) == 2, name
        assert message in capsys.readouterr().err, name


# ----------------------------------------------------------------- divergence, disks, CLI
def test_a_nan_loss_stops_the_run_as_diverged(scenes, tmp_path, capsys, monkeypatch):
    original = mastery.train_trials

    def poisoned(*args):
        stats = original(*args)
        return {**stats, "loss": [float("nan")] * len(stats["loss"])}

    monkeypatch.setattr(mastery, "train_trials", poisoned)
    assert main(mastery_args(scenes, tmp_path, "name=nan")) == 3
    assert "diverged: the training loss became [nan] at epoch 1 (episode 1)" in capsys.readouterr().err
    status = read_status(tmp_path / "nan")
    assert status["status"] == "diverged" and "epoch 1" in status["error"]


def test_meta_train_divergence_names_the_step(monkeypatch):
    with pytest.raises(RunDiverged):
        mastery.check_finite([0.5, float("inf")], "epoch 3")


def test_a_full_disk_fails_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    from metacl.core.checkpoint import load_checkpoint

    original, calls = table_module.MetricsTable.flush, []

    def fill_disk(self):
        calls.append(1)
        if len(calls) > 2:  # at the step-15 checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return original(self)

    monkeypatch.setattr(table_module.MetricsTable, "flush", fill_disk)
    with pytest.raises(OSError):
        execute(toy(tmp_path))
    monkeypatch.setattr(table_module.MetricsTable, "flush", original)
    status = read_status(tmp_path / "walk")
    assert status["status"] == "failed" and status["error"].startswith("disk full while writing")
    assert load_checkpoint(tmp_path / "walk" / "checkpoints" / "last.pt")["step"] == 10
    assert execute(toy(tmp_path), "resume")[1] == execute(toy(tmp_path / "ref"))[1]


def test_an_unwritable_out_dir_is_a_clear_error(scenes, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert main(mastery_args(scenes, blocker / "runs")) == 2
    assert "cannot create run directory" in capsys.readouterr().err


def test_overrides_and_flags_mix_in_any_order(scenes, tmp_path, capsys):
    args = mastery_args(scenes, tmp_path, "name=mixed")
    command, rest = args[:3], args[3:]
    assert main([*command, "--quiet", *rest[:2], "--overwrite", *rest[2:]]) == 0
    assert main([*command, "--resume", *rest]) == 0
    assert "run complete" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([*command, *rest, "--bogus"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_lock_is_exclusive_between_open_files_of_one_process(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(RunInUse, match=f"in use by process {os.getpid()}"):
            RunLock(tmp_path).acquire(wait_s=0.1)
    finally:
        first.release()
    RunLock(tmp_path).acquire().release()


def test_a_table_started_after_the_checkpoint_is_emptied_on_resume(tmp_path):
    """Rows flushed to a table that the loaded checkpoint does not know yet (the run was killed
    between flushing and checkpointing) are not kept twice."""
    import torch

    from metacl.core.run import Run

    config = toy(tmp_path)
    run = Run.open(config, torch.device("cpu"))
    run.table("epochs").append({"epoch": 1})
    run.save_checkpoint({"epoch": 1})
    run.table("criterion").append({"episode": 1})
    run.flush()  # ... and the process dies here
    run.close()
    run.release()
    again = Run.open(config, torch.device("cpu"), "resume")
    try:
        assert again.load_checkpoint()["epoch"] == 1
        assert len(again.table("criterion")) == 0 and len(again.table("epochs")) == 1
        again.flush()
        assert len(pd.read_parquet(tmp_path / "walk" / "criterion.parquet")) == 0
    finally:
        again.close()
        again.release()
