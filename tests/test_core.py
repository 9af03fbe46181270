"""Run plumbing: config validation, atomic writes, seeding, run directories, resume."""

import json
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import pytest
import torch

from metacl.cli import main
from metacl.core.atomic import atomic_open
from metacl.core.config import ConfigError, describe, from_dict, load_config
from metacl.core.denormals import denormals_flushed, flushing
from metacl.core.device import resolve_device
from metacl.core.experiment import execute, load_experiment_config
from metacl.core.seeding import derive_seed, torch_generator

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
