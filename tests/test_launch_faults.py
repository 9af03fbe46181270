"""Faults: SIGTERM/SIGINT checkpoint and exit cleanly; after `kill -9` mid-run, resuming (or
re-launching the sweep) ends exactly where an uninterrupted run ends.

`assert_kill_and_resume_matches` is generic over (experiment, config file, overrides): add a
case to FAULT_CASES for each experiment (kept tiny: the suite has a time budget).
"""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch

from metacl.cli import main
from metacl.core.config import to_yaml
from metacl.core.experiment import execute, load_experiment_config
from metacl.core.rundir import read_status

TOY = "tests.toy_experiment"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SLOW_TOY = ["walk.steps=40", "walk.step_seconds=0.05", "walk.checkpoint_every=5"]

FAULT_CASES = [pytest.param(TOY, None, SLOW_TOY, id="toy")]


def start_worker(config_file: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "metacl.launch.worker", str(config_file)], stdout=handle, stderr=subprocess.STDOUT
        )


def wait_until(condition, timeout_s: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def is_timing(name: str) -> bool:
    """Wall-clock columns and metrics, the only values a resumed run may legitimately change."""
    return "seconds" in name


def tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    frames = {p.stem: pd.read_parquet(p) for p in sorted(run_dir.glob("*.parquet"))}
    return {name: f.drop(columns=[c for c in f.columns if is_timing(c)]) for name, f in frames.items()}


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not is_timing(k)}


def assert_same_tables(resumed: Path, reference: Path) -> None:
    expected = tables(reference)
    got = tables(resumed)
    assert got.keys() == expected.keys()
    for name, frame in expected.items():
        pd.testing.assert_frame_equal(got[name], frame, check_exact=True, obj=name)


def assert_kill_and_resume_matches(
    tmp_path: Path, experiment: str, config_file: str | None, overrides: list[str], kills=(signal.SIGKILL,)
) -> None:
    """Run once uninterrupted; run again in worker processes (one per signal in `kills`, side
    by side), stop each with its signal after its first checkpoint, resume it: every resumed
    run must end with the reference's final metrics and tables."""

    def config(where: str):
        return load_experiment_config(
            config_file, [*overrides, f"out_dir={tmp_path / where}", "device=cpu", "quiet=true", "name=run"], experiment
        )

    ref_dir, reference = execute(config("reference"))
    reference = untimed(reference)
    stopped = {}
    for kill in kills:
        name = signal.Signals(kill).name
        stopped[kill] = config(name)
        (tmp_path / f"{name}.yaml").write_text(to_yaml(stopped[kill]))
    workers = {
        kill: start_worker(
            tmp_path / f"{signal.Signals(kill).name}.yaml", tmp_path / f"{signal.Signals(kill).name}.log"
        )
        for kill in kills
    }
    run_dirs = {kill: Path(c.out_dir) / c.name for kill, c in stopped.items()}
    try:
        waiting = set(kills)
        deadline = time.monotonic() + 180
        while waiting:
            for kill in list(waiting):
                if (run_dirs[kill] / "checkpoints" / "last.pt").exists():
                    assert status(run_dirs[kill])["status"] == "running", "ended before the stop"
                    workers[kill].send_signal(kill)
                    waiting.discard(kill)
                else:
                    assert workers[kill].poll() is None, f"worker exited early: {workers[kill].args}"
            assert time.monotonic() < deadline, "timed out waiting for the first checkpoints"
            time.sleep(0.02)
        codes = {kill: worker.wait(timeout=120) for kill, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.kill()
    for kill, run_dir in run_dirs.items():
        name, after = signal.Signals(kill).name, status(run_dir)
        if kill == signal.SIGKILL:
            assert codes[kill] == -signal.SIGKILL and after["status"] == "running"  # no chance to record
        else:
            assert codes[kill] == 130, (tmp_path / f"{name}.log").read_text()
            assert after["status"] == "interrupted" and "resume with --resume" in after["error"]
            assert f"received {name}" in (run_dir / "log.txt").read_text()
        _, final = execute(stopped[kill], "resume")
        assert untimed(final) == reference, name
        assert "resumed from" in (run_dir / "log.txt").read_text()
        assert_same_tables(run_dir, ref_dir)


@pytest.mark.parametrize("experiment, config_file, overrides", FAULT_CASES)
def test_kill_9_then_resume_matches_uninterrupted(tmp_path, experiment, config_file, overrides):
    assert_kill_and_resume_matches(tmp_path, experiment, config_file, overrides)


def test_kill_9_then_resume_matches_for_a_mastery_run(tmp_path):
    from tests.mastery_helpers import tiny, write_scenes

    scenes = write_scenes(tmp_path / "scenes.h5", 400)
    overrides = [o for o in tiny(scenes, tmp_path) if not o.startswith(("out_dir=", "quiet="))]
    assert_kill_and_resume_matches(
        tmp_path,
        "mastery",
        str(CONFIGS / "mastery" / "quick.yaml"),
        [*overrides, "train.criterion=0.99", "train.max_epochs_per_episode=3"],
    )


def test_kill_9_then_resume_matches_for_a_meta_training_run(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    pixels = torch.Generator().manual_seed(0)
    for label in range(6):
        (root / "train" / f"class{label}").mkdir(parents=True)
        for index in range(6):
            image = (torch.rand(10, 10, 3, generator=pixels) * 255).to(torch.uint8).numpy()
            Image.fromarray(image).save(root / "train" / f"class{label}" / f"{index}.png")
    overrides = [
        f"data_dir={root}",
        "data.dataset=folder",
        "data.split=train",
        "data.image_size=10",
        "data.val_classes=2",
        "model={name: convnet, in_channels: 3, num_blocks: 2, "
        "num_filters: 4, norm: in, image_size: 10, num_classes: 6}",
        "train.episodes=30",
        "train.num_batches=3",
        "train.remember_size=4",
        "train.inner_params=[encoder.1, fc]",
        "log_every=2",
        "checkpoint_every=3",
        "eval.every=10",
        "eval.classes=2",
        "eval.train_per_class=3",
        "eval_steps=[]",
        "tracking.backends=[]",
    ]
    assert_kill_and_resume_matches(tmp_path, "meta-train", str(CONFIGS / "meta" / "anml.yaml"), overrides)


def test_sigterm_and_sigint_checkpoint_exit_cleanly_and_resume_exactly(tmp_path):
    assert_kill_and_resume_matches(tmp_path, TOY, None, SLOW_TOY, kills=(signal.SIGTERM, signal.SIGINT))


def test_sweep_relaunch_after_kill_9_resumes(tmp_path, capsys):
    """A worker killed with -9 is reported as died; re-launching the sweep resumes that run
    from its checkpoint and leaves the complete one alone."""
    config = tmp_path / "toy.yaml"
    config.write_text(f"experiment: {TOY}\ndevice: cpu\nout_dir: {tmp_path}\n")
    args = ["sweep", str(config), *SLOW_TOY, "--grid", "walk.scale=1,2", "--workers", "2", "--threads", "1"]
    sweep_dir = tmp_path / "toy"
    first, second = sweep_dir / "walk.scale=1", sweep_dir / "walk.scale=2"
    lock = second / ".lock"  # the run directory's writer lock names the worker's pid
    driver = ThreadPoolExecutor(1).submit(main, args)  # the launcher, in a thread of this process
    wait_until(
        lambda: (second / "checkpoints" / "last.pt").exists() or driver.done(), what="the second run's first checkpoint"
    )
    os.kill(json.loads(lock.read_text())["pid"], signal.SIGKILL)
    assert driver.result(timeout=120) == 1
    out = capsys.readouterr().out
    assert "died: walk.scale=2: the worker process died (signal 9) mid-run" in out
    assert status(first)["status"] == "complete" and status(second)["status"] == "running"
    assert read_status(second)["status"] == "stale"  # says running, but its writer is gone
    assert main(["runs", "ls", str(sweep_dir)]) == 0 and "stale" in capsys.readouterr().out

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "launching 1 runs" in out and "1 were already complete" in out
    reference = load_experiment_config(
        None, [*SLOW_TOY, "walk.scale=2", "device=cpu", f"out_dir={tmp_path / 'reference'}"], TOY
    )
    assert status(second)["final"] == execute(reference)[1]
    assert "resumed from" in (second / "log.txt").read_text()


def test_a_sweep_launched_again_while_running_waits_for_the_runs_held_elsewhere(tmp_path, capsys):
    """The second launcher finds the run locked by the first one's worker: it reports it as
    running elsewhere, waits, and exits 0 once the run completes (not 1 with "re-launch")."""
    config = tmp_path / "toy.yaml"
    config.write_text(f"experiment: {TOY}\ndevice: cpu\nout_dir: {tmp_path}\n")
    args = [
        "sweep",
        str(config),
        *SLOW_TOY,
        "walk.steps=200",
        "--grid",
        "walk.scale=1",
        "--workers",
        "1",
        "--threads",
        "1",
    ]
    run = tmp_path / "toy" / "walk.scale=1"
    first = ThreadPoolExecutor(1).submit(main, args)
    wait_until(lambda: (run / "checkpoints" / "last.pt").exists() or first.done(), what="the first checkpoint")
    assert not first.done(), "the run finished before the second launch"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "running elsewhere" in out and "1 complete" in out
    assert first.result(timeout=120) == 0
    assert status(run)["status"] == "complete"
