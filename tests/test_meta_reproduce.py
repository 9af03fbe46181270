"""`metacl meta reproduce`: meta-train, honest meta-test, learning curve and report in one command,
on synthetic Omniglot-shaped data (metacl.meta.data.load_dataset replaced)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from metacl.cli import main
from metacl.meta import data
from metacl.meta.data.class_images import ClassImages
from metacl.meta.eval.results import read_results

TINY = [
    "model={name: convnet, num_blocks: 2, num_filters: 4, norm: in, image_size: 8, num_classes: 10}",
    "data.image_size=8",
    "data.val_classes=3",
    "train.episodes=4",
    "train.num_batches=3",
    "train.remember_size=4",
    "eval.every=0",
    "eval_steps=[2, 4]",
    "meta_test.splits=[]",
    "log_every=1",
    "checkpoint_every=1",
    "device=cpu",
    "tracking.backends=[]",
    "quiet=true",
]
EVAL = [
    "--eval",
    "protocol.lrs=[0.05,0.005]",
    "--eval",
    "protocol.classes=[2,5]",
    "--eval",
    "protocol.runs=2",
    "--eval",
    "protocol.train_examples=3",
    "--eval",
    "protocol.test_examples=2",
    "--eval",
    "protocol.compile=false",
    "--eval",
    "data.size=8",
]


@pytest.fixture
def synthetic_omniglot(monkeypatch):
    """9 background classes (3 held out for validation) and 6 evaluation classes of 8 px images."""

    def load_dataset(name, split, *, size, data_dir, device, quiet, first_963=False):
        classes, seed = (9, 1) if split == "background" else (6, 2)
        images = torch.rand(classes, 10, 1, size, size, generator=torch.Generator().manual_seed(seed))
        return ClassImages(images.to(device), [f"{split}{i}" for i in range(classes)])

    monkeypatch.setattr(data, "load_dataset", load_dataset)


def reproduce(tmp_path, *overrides, curve_runs=2):
    return main(
        ["meta", "reproduce", "configs/meta/zapping.yaml", f"out_dir={tmp_path}", "name=zap", *TINY, *overrides, *EVAL]
        + ["--curve-classes", "2,5", "--curve-runs", str(curve_runs)]
    )


def test_one_command_trains_meta_tests_honestly_and_reports_the_curve(tmp_path, synthetic_omniglot, capsys):
    assert reproduce(tmp_path) == 0
    out = capsys.readouterr().out
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == ["zap", "zap-curve-2", "zap-meta-test", "zap-report"]  # step 4 is the final model
    # the final meta-test: the whole LR sweep on validation, the test split at the chosen LR only
    final = read_results([tmp_path / "zap-meta-test"])
    assert sorted(final.loc[final["split"] == "val", "lr"].unique()) == [0.005, 0.05]
    assert final[final["split"] == "test"].groupby("classes")["lr"].nunique().to_dict() == {2: 1, 5: 1}
    # the curve: one honest row per saved step and class count, at the training time of that step
    curve = pd.read_csv(tmp_path / "zap-report" / "learning_curve.csv")
    assert list(zip(curve["step"], curve["classes"])) == [(2, 2), (2, 5), (4, 2), (4, 5)]
    assert set(curve["selection"]) == {"validation"} and (curve["runs"] == 2).all()
    assert curve["test_acc"].between(0, 1).all()
    train = pd.read_parquet(tmp_path / "zap" / "train.parquet")
    assert curve.loc[curve["step"] == 4, "wall_s"].iloc[0] == pytest.approx(train["seconds_per_step"].sum())
    assert curve.loc[curve["step"] == 2, "cpu_s"].iloc[0] == pytest.approx(train["cpu_seconds_per_step"][:2].sum())
    # the table beside the published numbers, printed and written
    text = (tmp_path / "zap-report" / "reproduction.md").read_text()
    assert "| 5 | " in text and "| 600 | not run | not run | 0.65 | 0.64-0.66 | 0.55-0.59 |" in text
    assert "4 episodes" in text and "3 background classes held out" in text
    assert "## Learning curve" in out
    assert (tmp_path / "zap-report" / "learning_curve.png").stat().st_size > 0

    # run again: every step is complete, nothing is redone and the numbers stay
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/results.parquet")}
    assert reproduce(tmp_path) == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/results.parquet")} == before

    # the final model replaced (a training started again, say): its old meta-test is not reused
    shutil.copy(tmp_path / "zap" / "models" / "step-2.pt", tmp_path / "zap" / "model.pt")
    capsys.readouterr()
    assert reproduce(tmp_path) == 2
    assert "meta-tested a different model" in capsys.readouterr().err


def test_an_extended_reproduction_meta_tests_the_new_end_beside_the_old(tmp_path, synthetic_omniglot):
    assert reproduce(tmp_path) == 0
    old = read_results([tmp_path / "zap-meta-test"])
    assert reproduce(tmp_path, "train.episodes=6", "eval_steps=[2, 4, 6]", "--extend") == 0
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == ["zap", "zap-curve-2", "zap-curve-4", "zap-meta-test", "zap-meta-test-6", "zap-report"]
    pd.testing.assert_frame_equal(read_results([tmp_path / "zap-meta-test"]), old)  # kept as it was
    curve = pd.read_csv(tmp_path / "zap-report" / "learning_curve.csv")
    assert sorted(set(curve["step"])) == [2, 4, 6]
    assert "6 episodes" in (tmp_path / "zap-report" / "reproduction.md").read_text()
    # a plain reproduce of the extended run finds everything done
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/results.parquet")}
    assert reproduce(tmp_path, "train.episodes=6", "eval_steps=[2, 4, 6]") == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/results.parquet")} == before


def test_a_model_without_validation_classes_is_reported_best_on_test(tmp_path, synthetic_omniglot):
    assert reproduce(tmp_path, "data.val_classes=0", curve_runs=0) == 0
    final = read_results([tmp_path / "zap-meta-test"])
    assert set(final["split"]) == {"test"} and final["lr"].nunique() == 2  # every LR, on test
    text = (tmp_path / "zap-report" / "reproduction.md").read_text()
    assert "| 5 | not run | " in text  # no honest column; the labelled best-on-test one only
    assert not (tmp_path / "zap-report" / "learning_curve.csv").exists()


def test_bad_meta_test_settings_are_refused_before_training(tmp_path, synthetic_omniglot, capsys):
    code = main(
        ["meta", "reproduce", "configs/meta/zapping.yaml", f"out_dir={tmp_path}", "name=zap", *TINY]
        + ["--eval", "protocol.runs=0"]
    )
    assert code == 2
    assert "protocol.runs" in capsys.readouterr().err
    assert not (tmp_path / "zap").exists()
