"""The Slurm launcher against a real slurmctld + slurmd on localhost (tests/slurm/start.sh).

CI starts the cluster with .ci/slurm_setup.sh; when it is not running and this is root with
Slurm installed, the fixture starts it. The tests skip, saying why, only when Slurm cannot be
installed, started or reached.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from metacl.cli import main
from metacl.core.experiment import execute, load_experiment_config
from metacl.launch.slurm import SlurmLauncher, active_jobs
from metacl.launch.sweep import expand, launch, sweep_spec
from tests.test_launch_faults import assert_same_tables, status, wait_until

pytestmark = pytest.mark.slurm

TOY = "tests.toy_experiment"
START = Path(__file__).resolve().parent / "slurm" / "start.sh"


def _problem() -> str | None:
    """Why Slurm cannot run jobs here, or None when the localhost node answers."""
    if not shutil.which("sinfo"):
        return "Slurm is not installed (no sinfo); .ci/slurm_setup.sh installs and starts it"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld does not answer"
    states = out.stdout.split()
    if out.returncode != 0 or not states:
        return f"sinfo failed: {out.stderr.strip() or 'no nodes'}"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return f"no node is up (states: {', '.join(states)})"
    return None


@pytest.fixture(scope="session")
def slurm():
    problem = _problem()
    if problem and os.geteuid() == 0 and shutil.which("slurmctld"):
        started = subprocess.run([str(START)], capture_output=True, text=True, timeout=300)
        problem = _problem() and f"{_problem()}; {START.name} said: {started.stderr.strip()[-500:]}"
    if problem:
        pytest.skip(f"no Slurm cluster: {problem}")


def reference(tmp_path, *overrides):
    config = load_experiment_config(
        None,
        [f"out_dir={tmp_path / 'reference'}", "device=cpu", "name=run", "tracking.console_every=1000", *overrides],
        TOY,
    )
    return execute(config, "overwrite")


def test_slurm_2x3_sweep(slurm, toy_config, tmp_path, capsys):
    args = [
        "sweep",
        str(toy_config),
        "--grid",
        "walk.scale=0.5,2",
        "--grid",
        "walk.steps=2,4,6",
        "--launcher",
        "slurm",
        "--time-min",
        "5",
        "--cpus-per-task",
        "1",
        "--wait",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "submitted 6 runs as Slurm job array" in out
    assert "6 runs (6 complete; 0 were already complete)" in out
    sweep_dir = tmp_path / "runs" / "toy"
    for scale in ("0.5", "2"):
        for steps in (2, 4, 6):
            run = sweep_dir / f"walk.scale={scale},walk.steps={steps}"
            assert status(run)["final"] == reference(tmp_path, f"walk.scale={scale}", f"walk.steps={steps}")[1]
            env = json.loads((run / "env.json").read_text())
            assert env["cpu_threads"] == 1  # cpus_per_task sets each run's threads
    jobs = json.loads((sweep_dir / ".launch" / "slurm" / "jobs.json").read_text())
    assert len(set(j.split("_")[0] for j in jobs.values())) == 1  # one job array
    assert main(args) == 0  # a relaunch finds everything complete and submits nothing
    assert "6 were already complete" in capsys.readouterr().out


def test_slurm_preemption_and_requeue_resume_exactly(slurm, toy_config, tmp_path):
    """Signal the running job as Slurm does before a time limit or preemption (USR2: submitit
    checkpoints and requeues), then requeue it as an admin or preemption would (SIGTERM). Both
    times the run checkpoints, and the finished run equals an uninterrupted one."""
    overrides = ["walk.steps=100", "walk.step_seconds=0.02", "walk.checkpoint_every=5"]
    sweep = expand(
        sweep_spec(toy_config, overrides, seeds="0", name="requeue", launcher="slurm", slurm={"time_min": 10})
    )
    [job] = launch(sweep, wait=False)
    run = sweep.runs[0]
    checkpoint, log = run.path / "checkpoints" / "last.pt", run.path / "log.txt"

    wait_until(checkpoint.exists, 180, "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_until(lambda: log.read_text().count("resumed from") == 1, 180, "the first resume")
    resumed_at = checkpoint.stat().st_mtime
    wait_until(lambda: checkpoint.stat().st_mtime > resumed_at, 60, "a checkpoint after resuming")
    assert status(run.path)["status"] == "running", "the run ended before the second stop"
    subprocess.run(["scontrol", "requeue", job], check=True)
    SlurmLauncher(sweep.spec.slurm, sweep.directory / ".launch" / "slurm").wait([job], 0.5)
    assert job not in active_jobs()

    ref_dir, final = reference(tmp_path, *overrides)
    recorded = status(run.path)
    assert (recorded["status"], recorded["final"]) == ("complete", final)
    assert_same_tables(run.path, ref_dir)
    text = log.read_text()
    assert text.count("received SIGTERM") == 2 and text.count("resumed from") == 2
    submitit_log = "".join(p.read_text() for p in (sweep.directory / ".launch" / "slurm").glob("*_log.*"))
    assert "Calling checkpoint method" in submitit_log  # the USR2 path went through submitit
    assert "Bypassing signal SIGTERM" in submitit_log  # the requeue path through Slurm
    info = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    assert "Restarts=2" in info
