"""Sweeps: a base experiment config times a grid of values times seeds, as named runs.

    <out_dir>/<sweep name>/
        sweep.yaml                 the resolved sweep spec (what was launched)
        <key=value,...,seed=N>/    one run directory per grid point and seed
        .launch/<run>.yaml         the resolved config each worker executes
        .launch/<run>.log          the worker's stdout and stderr (local launcher)
        .launch/slurm/             submitit's job files and logs (Slurm launcher)

Every expanded config is validated before anything starts, so a typo in a grid key costs
nothing. Run names come from the grid values only, so re-launching the same sweep finds the
same directories: complete runs are skipped and unfinished ones resume from their checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..core import atomic
from ..core.config import ConfigError, from_dict, read_yaml, to_dict, to_yaml
from ..core.experiment import ExperimentConfig, load_experiment_config
from ..core.rundir import IDENTITY_FREE_KEYS, is_locked, read_status
from .specs import LocalConfig, PlannedRun, SlurmConfig
from .worker import EXIT_BUSY

LAUNCH_DIR = ".launch"
RESERVED_KEYS = ("name", "out_dir", "seed")
MAX_NAME = 200


@dataclass
class SweepConfig:
    """A sweep: which config, which values, which seeds, where, and how to launch."""

    config: str = ""
    """Base experiment config file (relative to the sweep file when given in one)."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides applied to the base config in every run."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted config key -> values; the sweep runs every combination."""
    seeds: list[int] | str | None = None
    """Seeds for every grid point: a list or ranges like "0-9" or "0-4,10"; None keeps the config's seed."""
    name: str | None = None
    """Sweep folder name; None uses the base config file's name."""
    out_dir: str | None = None
    """Parent of the sweep folder; None uses the base config's out_dir."""
    launcher: Literal["local", "slurm"] = "local"
    """Where runs execute: local worker processes, or a Slurm job array."""
    local: LocalConfig = field(default_factory=LocalConfig)
    """Local launcher settings."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Slurm launcher settings."""


@dataclass
class Sweep:
    spec: SweepConfig
    directory: Path
    runs: list[PlannedRun]


# ------------------------------------------------------------------------------------ parsing
def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """`train.lr=1e-3,1e-2` -> ("train.lr", [0.001, 0.01]); values are YAML, lists may nest."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--grid {text!r} is not of the form key=v1,v2,... (e.g. train.lr=1e-3,1e-2)")
    try:
        values = yaml.safe_load(f"[{raw}]") if raw.strip() else []
    except yaml.YAMLError as error:
        raise ConfigError(f"--grid {text!r}: values are not valid YAML: {error}") from None
    return key.strip(), [_scientific(v) for v in values]


def _scientific(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` as a string; a grid means the number."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)
    return value


def parse_seeds(spec: int | str | list[int] | None) -> list[int] | None:
    """`"0-9"`, `"0-4,10"`, `[1, 2]` or `3` -> a list of seeds; None stays None."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, list):
        seeds = spec
    else:
        seeds = []
        for part in str(spec).replace(" ", "").split(","):
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not match:
                raise ConfigError(f"seeds {spec!r}: {part!r} is not a seed or range; write e.g. 0-9 or 0-4,10")
            first, last = int(match[1]), int(match[2] or match[1])
            if last < first:
                raise ConfigError(f"seeds {spec!r}: range {part!r} is empty")
            seeds.extend(range(first, last + 1))
    if not seeds:
        raise ConfigError("seeds: no seeds given")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {spec!r}: a seed appears twice")
    return list(seeds)


def read_sweep_file(path: str | Path) -> SweepConfig:
    """A sweep YAML file; its `config` path is resolved against the file's folder."""
    path = Path(path)
    spec = from_dict(SweepConfig, read_yaml(path))
    if not spec.config:
        raise ConfigError(f"{path}: missing key 'config' (the base experiment config file)")
    return dataclasses.replace(spec, config=str(path.parent / spec.config))


def is_sweep_file(path: str | Path) -> bool:
    """A sweep file names its base `config`; an experiment config names its `experiment`."""
    data = read_yaml(path)
    return "config" in data and "experiment" not in data


# ---------------------------------------------------------------------------------- expansion
def value_text(value: Any) -> str:
    """A grid value as it appears in run names: short, stable, file-name safe."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = "[" + ",".join(value_text(v) for v in value) + "]"
    elif value is None:
        text = "null"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+\-\[\],]", "_", text)


def override_text(key: str, value: Any) -> str:
    """`key=value` that parses back to exactly `value` (YAML flow style)."""
    dumped = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return f"{key}={dumped.removesuffix('...').strip()}"


def run_name(values: dict[str, Any]) -> str:
    """`key=value,...`; a name too long for a file name keeps its start plus a hash of the rest."""
    name = ",".join(f"{key}={value_text(value)}" for key, value in values.items()) or "base"
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 17]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


def expand(spec: SweepConfig) -> Sweep:
    """All runs of `spec`, each config validated; raises ConfigError before anything runs."""
    if not spec.config:
        raise ConfigError("sweep: no base experiment config given")
    seeds = parse_seeds(spec.seeds)
    for key, values in spec.grid.items():
        if key in RESERVED_KEYS:
            hint = "use --seeds" if key == "seed" else "it is set by the sweep"
            raise ConfigError(f"grid key {key!r} cannot be swept ({hint})")
        if not values:
            raise ConfigError(f"grid key {key!r} has no values; write e.g. --grid {key}=v1,v2")
    if not spec.grid and seeds is None:
        raise ConfigError("empty sweep: give at least one --grid key=v1,v2 or --seeds (e.g. 0-9)")

    base = _validated(spec.config, spec.overrides, "base config")
    directory = (Path(spec.out_dir or base.out_dir) / (spec.name or Path(spec.config).stem)).resolve()
    keys = list(spec.grid) + (["seed"] if seeds is not None else [])
    runs: list[PlannedRun] = []
    for combo in itertools.product(*spec.grid.values(), *([seeds] if seeds is not None else [])):
        point = dict(zip(keys, combo))
        name = run_name(point)
        overrides = [
            *spec.overrides,
            *(override_text(k, v) for k, v in point.items()),
            f"out_dir={directory}",
            f"name={name}",
            "quiet=true",
        ]
        config = _validated(spec.config, overrides, f"sweep run {name}")
        runs.append(PlannedRun(name, config, directory / name, directory / LAUNCH_DIR / f"{name}.yaml", point))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"two grid points give the same run name {duplicate!r}; make the grid values distinct")
    return Sweep(spec, directory, runs)


def _validated(path: str, overrides: list[str], what: str) -> ExperimentConfig:
    try:
        return load_experiment_config(path, overrides)
    except ConfigError as error:
        raise ConfigError(f"{what}: {error}") from None


# ---------------------------------------------------------------------------------- preparing
def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that decides results (what a resumed run must share)."""
    return {k: v for k, v in config.items() if k not in (*IDENTITY_FREE_KEYS, "device")}


def check_existing(sweep: Sweep) -> None:
    """An existing run directory whose config differs from the planned one is an error:
    resuming it would mix two experiments under one name."""
    for run in sweep.runs:
        existing = run.path / "config.yaml"
        if existing.exists():
            old, new = identity(yaml.safe_load(existing.read_text()) or {}), identity(to_dict(run.config))
            if old != new:
                changed = ", ".join(_differences(old, new)[:5])
                raise ConfigError(
                    f"run {run.path} exists with a different config ({changed}); "
                    f"give the sweep another name (--name) or delete that run"
                )


def prepare(sweep: Sweep) -> list[PlannedRun]:
    """Write the sweep's files; return the runs still to do (all but the complete ones)."""
    check_existing(sweep)
    sweep.directory.mkdir(parents=True, exist_ok=True)
    atomic.write_text(sweep.directory / "sweep.yaml", to_yaml(sweep.spec))
    todo = []
    for run in sweep.runs:
        if read_status(run.path)["status"] != "complete":
            atomic.write_text(run.config_file, to_yaml(run.config))
            todo.append(run)
    return todo


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for key in dict.fromkeys([*old, *new])
            for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


# ---------------------------------------------------------------------------------- reporting
@dataclass
class RunOutcome:
    name: str
    status: str
    error: str | None = None
    final: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepReport:
    directory: Path
    outcomes: list[RunOutcome]
    skipped: int = 0
    """Runs that were already complete before this launch."""

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status != "complete"]

    def format(self) -> str:
        counts: dict[str, int] = {}
        for outcome in self.outcomes:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        lines = [f"sweep {self.directory}: {len(self.outcomes)} runs ({summary}; {self.skipped} were already complete)"]
        for outcome in self.failed:
            lines.append(f"  {outcome.status}: {outcome.name}: {outcome.error or 'no error recorded'}")
        if self.failed:
            lines.append(
                f"re-launch the same sweep to resume them; details in "
                f"<run>/status.json, <run>/log.txt and {LAUNCH_DIR}/<run>.log"
            )
        return "\n".join(lines)


def report(
    sweep: Sweep, skipped: int = 0, exit_codes: dict[str, int] | None = None, all_stopped: bool = False
) -> SweepReport:
    """Each run's outcome, from its status.json (and its worker's log if it never started).

    `exit_codes` are the local workers'; `all_stopped` says no run can still be executing, so
    a run whose status still says running was killed before it could record anything.
    """
    outcomes = []
    for run in sweep.runs:
        status = read_status(run.path)
        error = status.get("error")
        code = (exit_codes or {}).get(run.name)
        if code == EXIT_BUSY and status["status"] == "running":
            status, error = {"status": "busy"}, "still running in another process"
        elif code and status["status"] in ("running", "stale"):
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            status, error = {"status": "died"}, f"the worker process died ({how}) mid-run"
        elif all_stopped and status["status"] in ("running", "stale"):
            status, error = {"status": "died"}, "the run stopped without recording why (killed?)"
        elif status["status"] == "missing":
            error = _last_line(run.config_file.with_suffix(".log")) or "the run never started"
        outcomes.append(RunOutcome(run.name, status["status"], error, status.get("final", {})))
    return SweepReport(sweep.directory, outcomes, skipped)


def wait_for_runs_elsewhere(runs: list[PlannedRun], poll_s: float) -> None:
    """Runs that another launcher's worker holds: wait until their writer lets go, so that this
    launch reports how they ended instead of asking for a re-launch."""
    if not runs:
        return
    print(
        f"{len(runs)} run(s) running elsewhere (another launch holds them): waiting for "
        f"{', '.join(r.name for r in runs)}",
        flush=True,
    )
    while any(is_locked(r.path) for r in runs):
        time.sleep(poll_s)


def _last_line(path: Path) -> str | None:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return None
    return lines[-1] if lines else None


# ----------------------------------------------------------------------------------- launching
def launch(sweep: Sweep, wait: bool = True, poll_s: float = 1.0) -> SweepReport | list[str]:
    """Run the sweep's unfinished runs with its launcher.

    Local sweeps always finish before this returns. Slurm sweeps return the submitted job ids
    unless `wait`, in which case they also wait for the jobs and report.
    """
    todo = prepare(sweep)
    skipped = len(sweep.runs) - len(todo)
    if sweep.spec.launcher == "local":
        from .local import LocalLauncher

        codes = LocalLauncher(sweep.spec.local).run(todo)
        wait_for_runs_elsewhere([r for r in todo if codes.get(r.name) == EXIT_BUSY], poll_s)
        return report(sweep, skipped, codes)
    from .slurm import SlurmLauncher

    launcher = SlurmLauncher(sweep.spec.slurm, sweep.directory / LAUNCH_DIR / "slurm")
    job_ids = launcher.submit(todo, sweep.directory.name)
    if not wait:
        return job_ids
    launcher.wait(job_ids, poll_s)
    return report(sweep, skipped, all_stopped=True)


def sweep_spec(
    config: str | Path,
    overrides: Sequence[str] = (),
    grid: dict[str, list[Any]] | None = None,
    seeds: Any = None,
    **fields: Any,
) -> SweepConfig:
    """A validated SweepConfig from Python (the API twin of `metacl sweep`)."""
    data = {"config": str(config), "overrides": list(overrides), "grid": dict(grid or {}), "seeds": seeds, **fields}
    return from_dict(SweepConfig, data)
