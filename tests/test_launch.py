"""Sweeps on the local launcher, sweep validation, `metacl runs ls|compare`."""

import json
import os

import pandas as pd
import pytest

from metacl.cli import main
from metacl.core.config import ConfigError
from metacl.core.experiment import execute, load_experiment_config
from metacl.core.stats import mean_ci, t_quantile
from metacl.launch.runs import compare, load_runs
from metacl.launch.sweep import expand, parse_grid_option, parse_seeds, sweep_spec

TOY = "tests.toy_experiment"


def reference(tmp_path, *overrides):
    """Final metrics of the same run executed in this process."""
    config = load_experiment_config(None, [f"out_dir={tmp_path / 'reference'}", "device=cpu", *overrides], TOY)
    return execute(config, "overwrite")[1]


def test_parse_grid_and_seeds():
    assert parse_grid_option("train.lr=1e-3,0.01,abc") == ("train.lr", [0.001, 0.01, "abc"])
    assert parse_grid_option("model.sizes=[1,2],[3]") == ("model.sizes", [[1, 2], [3]])
    assert parse_grid_option("a.b=") == ("a.b", [])
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_seeds(4) == [4]
    assert parse_seeds(None) is None
    for bad in ("3-1", "x", "1,1"):
        with pytest.raises(ConfigError, match="seeds"):
            parse_seeds(bad)


def test_sweep_expands_into_named_validated_runs(toy_config):
    sweep = expand(
        sweep_spec(toy_config, ["walk.steps=3"], {"walk.scale": [0.5, 2], "walk.fail_at": [None, 1e6]}, seeds="1-2")
    )
    assert sweep.directory == (toy_config.parent / "runs" / "toy").resolve()
    assert len(sweep.runs) == 8
    first = sweep.runs[0]
    assert first.name == "walk.scale=0.5,walk.fail_at=null,seed=1"
    assert first.path == sweep.directory / first.name
    assert (first.config.walk.scale, first.config.walk.fail_at, first.config.seed) == (0.5, None, 1)
    assert first.config.walk.steps == 3 and first.config.quiet
    assert sweep.runs[-1].name == "walk.scale=2,walk.fail_at=1000000.0,seed=2"
    assert sweep.runs[-1].config.walk.fail_at == 1000000  # an int field: 1e6 parsed as a number


@pytest.mark.parametrize(
    "grid, seeds, message",
    [
        ({"walk.stepz": [1, 2]}, None, "unknown key 'walk.stepz'; valid keys under 'walk'"),
        ({"walk.steps": []}, None, "grid key 'walk.steps' has no values"),
        ({}, None, "empty sweep"),
        ({"walk.steps": [3, "many"]}, None, "walk.steps: expected an integer, got 'many'"),
        ({"seed": [1, 2]}, None, "use --seeds"),
        ({"walk.scale": [1, "1"]}, None, "same run name"),
    ],
)
def test_bad_sweeps_fail_before_anything_runs(toy_config, grid, seeds, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        expand(sweep_spec(toy_config, grid=grid, seeds=seeds))
    assert not (toy_config.parent / "runs").exists()


def test_cli_bad_grid_is_a_clear_error(toy_config, capsys):
    assert main(["sweep", str(toy_config), "--grid", "walk.stepz=1,2", "--seeds", "0-1"]) == 2
    assert "unknown key 'walk.stepz'" in capsys.readouterr().err
    assert main(["sweep", str(toy_config), "--grid", "walk.steps="]) == 2
    assert "has no values" in capsys.readouterr().err
    assert not (toy_config.parent / "runs").exists()


def test_local_2x3_sweep_reports_failures_skips_and_aggregates(toy_config, tmp_path, capsys):
    """Six runs on three workers: the two that reach fail_at fail with their reason, the others
    complete with the same metrics as in-process runs; a relaunch skips what is complete."""
    args = [
        "sweep",
        str(toy_config),
        "walk.checkpoint_every=2",
        "--grid",
        "walk.steps=3,6,9",
        "--grid",
        "walk.fail_at=null,4",
        "--workers",
        "3",
        "--threads",
        "1",
    ]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "launching 6 runs: 3 workers x 1 threads" in out
    assert "6 runs (4 complete, 2 failed; 0 were already complete)" in out
    for steps in (6, 9):
        assert f"failed: walk.steps={steps},walk.fail_at=4: ValueError: planned failure at step 4" in out
    directory = tmp_path / "runs" / "toy"
    for steps, fail_at in [(3, "null"), (3, 4), (6, "null"), (9, "null")]:
        status = json.loads((directory / f"walk.steps={steps},walk.fail_at={fail_at}" / "status.json").read_text())
        assert status["status"] == "complete"
        assert status["final"] == reference(tmp_path, f"walk.steps={steps}")
        config = load_experiment_config(directory / f"walk.steps={steps},walk.fail_at={fail_at}" / "config.yaml")
        assert config.threads == 1 and config.walk.checkpoint_every == 2

    # `runs ls`: one row per run, grid keys first, final metrics, failure reasons.
    assert main(["runs", "ls", str(directory), "--csv"]) == 0
    table = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert list(table.columns) == ["name", "status", "walk.steps", "walk.fail_at", "position", "steps"]
    assert list(table.status).count("failed") == 2 and len(table) == 6
    assert main(["runs", "ls", str(directory)]) == 0
    assert "failed: walk.steps=9,walk.fail_at=4: ValueError: planned failure" in capsys.readouterr().out

    # `runs compare`: complete runs grouped by a key.
    assert main(["runs", "compare", str(directory), "--by", "walk.steps", "--metric", "steps"]) == 0
    out = capsys.readouterr().out
    assert "2 runs not complete were left out" in out
    frame = compare(load_runs(directory), ["walk.steps"], ["position", "metrics:step"])
    assert list(frame["walk.steps"]) == [3, 6, 9] and list(frame.n) == [2, 1, 1]
    assert list(frame["metrics:step.mean"]) == [3, 6, 9]
    assert frame["position.ci"][0] == 0  # both steps=3 runs walk the same seeded path

    # Relaunching would skip the complete runs and resume the failed ones.
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("skip (complete)") == 4 and out.count("resume (failed)") == 2

    # A relaunch with a changed config is refused before anything runs.
    assert main([*args[:2], "walk.scale=3", *args[2:]]) == 2
    assert "exists with a different config (walk.scale: 1.0 -> 3.0)" in capsys.readouterr().err


def test_sweep_file_form(tmp_path, toy_config, capsys):
    sweep_file = tmp_path / "sweeps" / "walks.yaml"
    sweep_file.parent.mkdir()
    sweep_file.write_text(
        "config: ../toy.yaml\nname: walks\noverrides: [walk.steps=2]\n"
        "grid:\n  walk.scale: [1, 2]\nseeds: 0-1\nlocal:\n  workers: 2\n"
    )
    assert main(["sweep", str(sweep_file), "--seeds", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "walks: 2 runs, launcher local" in out
    assert "walk.scale=1,seed=5: start" in out and "walk.scale=2,seed=5: start" in out


def test_mean_ci_matches_student_t():
    assert t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.95, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.99, 9) == pytest.approx(3.2498, abs=1e-4)
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.7764 * (2.5**0.5) / 5**0.5, rel=1e-4)
    assert mean_ci([2.0])[0] == 2.0


def test_example_sweep_files_expand():
    from pathlib import Path

    from metacl.launch.sweep import read_sweep_file

    files = sorted((Path(__file__).parents[1] / "configs" / "sweeps").glob("*.yaml"))
    assert files
    for path in files:
        spec = read_sweep_file(path)
        assert len(expand(spec).runs) > 1, path


def fake_gpus(monkeypatch, count, total_gb):
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=int(total_gb * 2**30))
    )


def test_gpu_slots_follow_the_memory_budget(monkeypatch, toy_config):
    from metacl.launch.local import LocalLauncher, Slot, gpu_slots, worker_env
    from metacl.launch.specs import LocalConfig

    fake_gpus(monkeypatch, 2, 10)
    assert gpu_slots(LocalConfig(gpu_memory_gb=4)) == [Slot(0, 0.4), Slot(0, 0.4), Slot(1, 0.4), Slot(1, 0.4)]
    assert gpu_slots(LocalConfig(runs_per_gpu=3, gpus=[1])) == [Slot(1, None)] * 3
    assert gpu_slots(LocalConfig()) == [Slot(0, None), Slot(1, None)]
    runs = expand(sweep_spec(toy_config, ["device=auto"], seeds="0-5")).runs
    workers, threads, slots = LocalLauncher(LocalConfig(gpu_memory_gb=4)).plan(runs)
    assert (workers, len(slots)) == (4, 4) and threads >= 1
    env = worker_env(runs[0], 3, Slot(1, 0.4))
    assert (env["CUDA_VISIBLE_DEVICES"], env["METACL_GPU_MEMORY_FRACTION"], env["OMP_NUM_THREADS"]) == (
        "1",
        "0.4000",
        "3",
    )
    cpu_run = expand(sweep_spec(toy_config, seeds="0")).runs[0]  # device=cpu needs no slot
    assert LocalLauncher(LocalConfig()).plan([cpu_run])[2] == []


def test_local_launcher_never_overfills_a_gpu(monkeypatch, toy_config):
    """Eight runs, two GPUs with two slots each and six workers: at most two runs per GPU."""
    import subprocess

    from metacl.launch.local import LocalLauncher
    from metacl.launch.specs import LocalConfig

    fake_gpus(monkeypatch, 2, 10)
    started = []

    def start(self, run, threads, slot):
        busy = sum(1 for s, p in started if s.gpu == slot.gpu and p.poll() is None)
        process = subprocess.Popen(["sleep", "0.2"])
        started.append((slot, process))
        assert busy < 2, f"GPU {slot.gpu} already runs {busy} runs"
        return process

    monkeypatch.setattr(LocalLauncher, "_start", start)
    runs = expand(sweep_spec(toy_config, ["device=auto"], seeds="0-7")).runs
    codes = LocalLauncher(LocalConfig(workers=6, runs_per_gpu=2)).run(runs)
    assert codes == {run.name: 0 for run in runs}
    assert len(started) == 8 and {s.gpu for s, _ in started} == {0, 1}


def test_worker_refuses_a_run_that_another_process_executes(tmp_path, capsys):
    from metacl.core.rundir import RunLock
    from metacl.launch import worker

    config = tmp_path / ".launch" / "run.yaml"
    config.parent.mkdir()
    config.write_text(f"experiment: {TOY}\ndevice: cpu\nout_dir: {tmp_path}\nname: run\n")
    (tmp_path / "run").mkdir()
    held = RunLock(tmp_path / "run").acquire()  # as another writer would hold it
    try:
        assert worker.main([str(config)]) == worker.EXIT_BUSY
    finally:
        held.release()
    assert f"is in use by process {os.getpid()}" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing written
