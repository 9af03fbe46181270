"""Run plumbing: config validation, atomic writes, seeding, run directories, resume."""

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import pytest
import torch

from metacl.cli import main
from metacl.core import allocator
from metacl.core.atomic import atomic_open
from metacl.core.config import ConfigError, describe, from_dict, load_config
from metacl.core.denormals import denormals_flushed, flushing
from metacl.core.device import resolve_device
from metacl.core.experiment import execute, load_experiment_config
from metacl.core.seeding import derive_seed, torch_generator

ROOT = Path(__file__).resolve().parents[1]

TOY = "tests.toy_experiment"


@dataclass
class Inner:
    lr: float = 0.1
    """Learning rate."""
    kind: Literal["a", "b"] = "a"
    """A choice."""


@dataclass
class Outer:
    steps: int = 3
    """Number of steps."""
    tags: list[str] = field(default_factory=list)
    """Free tags."""
    inner: Inner = field(default_factory=Inner)
    """Nested section."""
    note: str | None = None
    """Optional."""


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\ninner:\n  kind: b\n")
    config = load_config(Outer, path, ["inner.lr=1e-4", "tags=[x, y]", "note=hello"])
    assert config == Outer(steps=5, tags=["x", "y"], inner=Inner(lr=1e-4, kind="b"), note="hello")


def test_extends_merges_parent_values(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 7\ninner:\n  lr: 0.5\n  kind: b\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ninner:\n  lr: 0.25\n")
    config = load_config(Outer, tmp_path / "child.yaml")
    assert (config.steps, config.inner.lr, config.inner.kind) == (7, 0.25, "b")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stpes": 1}, "unknown key 'stpes'; valid keys: steps, tags, inner, note"),
        ({"inner": {"lrr": 1}}, "unknown key 'inner.lrr'; valid keys under 'inner': lr, kind"),
        ({"steps": "many"}, "steps: expected an integer, got 'many'"),
        ({"inner": {"kind": "c"}}, "inner.kind: invalid value 'c'; valid choices: a, b"),
        ({"inner": {"lr": True}}, "inner.lr: expected a number"),
    ],
)
def test_bad_config_names_key_and_choices(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        from_dict(Outer, data)


@dataclass
class Tuned:
    inner: Inner = field(default_factory=lambda: Inner(lr=0.5, kind="b"))
    """A section whose default differs from Inner's own defaults."""


def test_a_sections_own_default_survives_overriding_one_of_its_keys():
    assert from_dict(Tuned, {}).inner == Inner(lr=0.5, kind="b")
    assert from_dict(Tuned, {"inner": {"lr": 0.25}}).inner == Inner(lr=0.25, kind="b")
    assert from_dict(Tuned, {"inner": None}).inner == Inner()  # null: the nested class's defaults


def test_describe_reads_field_docstrings():
    rows = {key: (default, doc) for key, _, default, doc in describe(Outer)}
    assert rows["inner.lr"] == (0.1, "Learning rate.")
    assert rows["steps"] == (3, "Number of steps.")
    assert {key: default for key, _, default, _ in describe(Tuned)} == {"inner.lr": 0.5, "inner.kind": "b"}


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as handle:
            handle.write("new, half written")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_seed_streams_are_stable_and_independent():
    assert derive_seed(1, "a") == derive_seed(1, "a") != derive_seed(1, "b") != derive_seed(2, "a")
    a = torch.randn(3, generator=torch_generator(0, "x"))
    assert torch.equal(a, torch.randn(3, generator=torch_generator(0, "x")))
    assert not torch.equal(a, torch.randn(3, generator=torch_generator(0, "y")))


def test_device_resolution_and_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(ConfigError, match="valid choices: auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_denormals_flush_on_every_thread_inside_the_block_only():
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tiny = torch.full((4_000_000,), 1e-39)  # denormal; big enough to be split across threads
        assert (tiny * 1.0 != 0).all() and not flushing()
        with denormals_flushed("cpu"):
            assert (tiny * 1.0 == 0).all() and flushing()
        assert (tiny * 1.0 != 0).all() and not flushing()
        torch.set_flush_denormal(True)  # a caller who flushes already keeps flushing afterwards
        with denormals_flushed("cpu"):
            pass
        assert flushing()
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _toy(tmp_path, *overrides):
    return load_experiment_config(None, [f"out_dir={tmp_path}", "device=cpu", *overrides], TOY)


def test_run_directory_holds_config_env_log_table_checkpoint(tmp_path):
    path, final = execute(_toy(tmp_path, "seed=4"))
    assert sorted(p.name for p in path.iterdir()) == [
        ".lock",
        "checkpoints",
        "config.yaml",
        "data.json",
        "env.json",
        "log.txt",
        "metrics.parquet",
        "status.json",
    ]
    env = json.loads((path / "env.json").read_text())
    assert env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["device"] == "cpu"
    table = pd.read_parquet(path / "metrics.parquet")
    assert list(table.step) == list(range(1, 21))
    assert json.loads((path / "status.json").read_text())["status"] == "complete"
    assert final["position"] == pytest.approx(table.position.iloc[-1])


def test_same_seed_same_result_and_name(tmp_path):
    a, b = _toy(tmp_path / "a", "seed=1"), _toy(tmp_path / "b", "seed=1")
    assert a.name == b.name != _toy(tmp_path, "seed=2").name
    assert execute(a)[1] == execute(b)[1]


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    config = _toy(tmp_path)
    execute(config)
    with pytest.raises(Exception, match="--resume"):
        execute(config)
    assert execute(config, "resume")[1]["steps"] == 20  # complete: returns its final metrics
    assert execute(config, "overwrite")[1]["steps"] == 20


def test_resume_after_crash_matches_uninterrupted(tmp_path, monkeypatch):
    reference = execute(_toy(tmp_path / "ref"))[1]
    crashed = _toy(tmp_path / "crash")
    monkeypatch.setenv("TOY_CRASH_AT", "13")
    with pytest.raises(ValueError, match="planned failure"):
        execute(crashed)
    monkeypatch.delenv("TOY_CRASH_AT")
    path = tmp_path / "crash" / crashed.name
    assert json.loads((path / "status.json").read_text())["status"] == "failed"
    resumed = load_experiment_config(path / "config.yaml")
    assert execute(resumed, "resume")[1] == reference
    table = pd.read_parquet(path / "metrics.parquet")
    assert list(table.step) == list(range(1, 21))  # rows after the checkpoint were not doubled


def test_cli_reports_bad_input_with_exit_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"experiment: {TOY}\nwalk:\n  stepz: 3\n")
    assert main(["config", "show", str(config)]) == 2
    assert "unknown key 'walk.stepz'" in capsys.readouterr().err
    assert main(["config", "show", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    config.write_text("experiment: nonsense\n")
    assert main(["config", "show", str(config)]) == 2
    assert "valid choices: mastery, meta-train, meta-eval" in capsys.readouterr().err


# ------------------------------------------------------------------ the allocator
FAULTS = """
import json, resource, statistics
import torch
torch.set_num_threads(1)
from metacl.core import allocator

def step():   # a training step's pattern: big temporaries allocated and freed
    x = torch.ones(32 * 2**20)
    y = (x * 2 + 1).relu_()
    z = y.exp()
    del x, y, z

def faults(warmup=2, rounds=8):
    # minor page faults of a step: the median over `rounds`, once the heap has settled
    counts = []
    for i in range(warmup + rounds):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    return statistics.median(counts[warmup:])

def heap_takes_huge_pages():
    # the [heap] mapping's THPeligible flag in /proc/self/smaps
    in_heap = False
    for line in open("/proc/self/smaps"):
        if "-" in line.split()[0]:
            in_heap = line.rstrip().endswith("[heap]")
        elif in_heap and line.startswith("THPeligible:"):
            return line.split()[1] == "1"
    return None

before = faults()
tuning = allocator.tune_malloc(huge_pages=True)  # as a meta-training asks
print(json.dumps({"before": before, "after": faults(), "status": tuning.status, "detail": tuning.detail,
                  "huge_pages": heap_takes_huge_pages()}))
"""


def page_faults(tuning_env: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop(allocator.ENV_VAR, None)
    if tuning_env is not None:
        env[allocator.ENV_VAR] = tuning_env
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's"
)
def test_malloc_tuning_stops_big_tensors_page_faulting_in_every_time():
    """Four 128 MB temporaries per step: glibc mmaps and unmaps each (~131,000 minor faults a
    step, the median of 8); once tuned, the freed heap is reused (0 here). In a subprocess,
    because the setting cannot be undone."""
    tuned = page_faults(None)
    assert tuned["status"] == "tuned"
    assert tuned["before"] > 100_000 and tuned["after"] < tuned["before"] / 20, tuned
    kept = page_faults("0")
    assert kept["status"] == "disabled" and kept["after"] > kept["before"] / 2, kept
    if allocator.transparent_huge_pages() == "madvise":  # the kernel gives huge pages on request only
        assert tuned["huge_pages"] is True and "huge pages requested" in tuned["detail"], tuned
        assert kept["huge_pages"] is False, kept


def test_malloc_tuning_falls_back_where_glibc_caps_the_mmap_threshold(monkeypatch):
    class FakeGlibc:
        def __init__(self):
            self.calls, self.mmap_allowed, self.blocks = [], True, 0

        def mallopt(self, param, value):
            self.calls.append((param, value))
            if param == allocator.M_MMAP_THRESHOLD:
                return 0  # refused: over HEAP_MAX_SIZE / 2
            if param == allocator.M_MMAP_MAX:
                self.mmap_allowed = value != 0
            return 1

        def malloc(self, size):
            self.blocks += self.mmap_allowed
            return 1

        def free(self, pointer):
            self.blocks -= self.mmap_allowed

        def mallinfo2(self):
            return type("Info", (), {"hblks": self.blocks})()

    fake = FakeGlibc()
    monkeypatch.setattr(allocator, "_result", None)
    monkeypatch.setattr(allocator, "_glibc", lambda: fake)
    monkeypatch.delenv(allocator.ENV_VAR, raising=False)
    result = allocator.tune_malloc()
    assert result.tuned and "mmap off" in result.detail
    assert fake.calls == [
        (allocator.M_TRIM_THRESHOLD, -1),
        (allocator.M_TOP_PAD, 1 << 30),
        (allocator.M_MMAP_THRESHOLD, -1),
        (allocator.M_MMAP_MAX, 0),
    ]
    assert allocator.tune_malloc() is result  # once per process
    assert "ordinary pages" in result.detail  # huge pages only when asked (a meta-training)
    monkeypatch.setattr(allocator, "_result", None)
    monkeypatch.setattr(allocator, "transparent_huge_pages", lambda: "madvise")
    assert "huge pages not requested (no madvise)" in allocator.tune_malloc(huge_pages=True).detail
    monkeypatch.setattr(allocator, "_result", None)
    monkeypatch.setenv(allocator.ENV_VAR, "off")
    assert allocator.tune_malloc().status == "disabled"


@pytest.mark.parametrize("mode", ["always", "never", None])
def test_huge_pages_are_only_requested_where_the_kernel_waits_to_be_asked(monkeypatch, mode):
    class NoCalls:
        def __getattr__(self, name):
            raise AssertionError(f"{name} called with THP {mode}")

    monkeypatch.setattr(allocator, "transparent_huge_pages", lambda: mode)
    detail = allocator._advise_huge_pages(NoCalls())  # type: ignore[arg-type]
    assert detail == f"transparent huge pages {mode or 'unavailable'} (left as they are)"


def test_the_kernels_huge_page_mode_is_read_from_its_bracket(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(allocator, "THP_SETTING", setting)
    assert allocator.transparent_huge_pages() == "madvise"
    monkeypatch.setattr(allocator, "THP_SETTING", tmp_path / "missing")
    assert allocator.transparent_huge_pages() is None
