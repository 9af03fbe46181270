"""Every command on a CUDA GPU, tiny: scenes (CUDA and CPU renders agree), a mastery run, ANML and
OML meta-training, every meta-test flavour, and the sweep launcher sharing a GPU. They skip
without CUDA (CI has none); `benchmarks/gpu_check.sh` runs them on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from metacl.cli import main
from metacl.core.experiment import execute, load_experiment_config
from metacl.models import build_model, save_model
from metacl.scenes.h5 import load_scenes
from tests.mastery_helpers import tiny, write_scenes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def test_scenes_render_on_cuda_as_on_cpu(tmp_path):
    for device in ("cpu", "cuda"):
        args = ["data", "scenes", "--num-images", "8", "--seed", "3", "--device", device, "--quiet"]
        assert main([*args, "--out", str(tmp_path / f"{device}.h5")]) == 0
    cpu, cuda = load_scenes(tmp_path / "cpu.h5"), load_scenes(tmp_path / "cuda.h5")
    assert np.array_equal(cpu.D, cuda.D) and np.array_equal(cpu.y, cuda.y)  # the same layouts
    difference = np.abs(cpu.X.astype(int) - cuda.X.astype(int))
    assert difference.max() <= 8 and difference.mean() < 0.5, (difference.max(), difference.mean())


def test_mastery_runs_on_cuda(tmp_path):
    scenes = write_scenes(tmp_path / "scenes.h5", 200)
    overrides = [*tiny(scenes, tmp_path / "runs"), "device=cuda", "train.max_epochs_per_episode=2"]
    run_dir, final = execute(load_experiment_config(ROOT / "configs" / "mastery" / "quick.yaml", overrides))
    assert final["episodes"] == 3 and len(pd.read_parquet(run_dir / "epochs.parquet")) > 0
    assert "cuda" in (run_dir / "env.json").read_text()


def pool(classes: int, per_class: int, seed: int, size: int) -> torch.Tensor:
    return torch.rand(classes, per_class, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def cuda_pools(monkeypatch):
    import metacl.meta.train.experiment as meta_experiment

    images = {28: pool(classes=8, per_class=20, seed=9, size=28), 84: pool(classes=8, per_class=20, seed=9, size=84)}

    def load_pools(config, device):
        data = images[config.data.image_size].to(device)
        return data[:6], data[6:]

    monkeypatch.setattr(meta_experiment, "load_pools", load_pools)


@pytest.mark.parametrize(
    "model, size, inner",
    [
        ("{name: anml, rln_channels: 16, nm_channels: 8, num_classes: 8}", 28, "[rln, fc]"),
        ("{name: oml, channels: 16, hidden: 32, num_classes: 8}", 84, "[fc1, fc]"),
    ],
)
def test_meta_training_runs_on_cuda(tmp_path, cuda_pools, model, size, inner):
    overrides = [
        f"out_dir={tmp_path}",
        "device=cuda",
        "quiet=true",
        "tracking.backends=[]",
        f"model={model}",
        f"data.image_size={size}",
        "data.val_classes=2",
        "train.episodes=4",
        "train.num_batches=5",
        "train.remember_size=8",
        f"train.inner_params={inner}",
        "log_every=2",
        "checkpoint_every=2",
        "eval.every=2",
        "eval.classes=2",
        "eval.train_per_class=5",
    ]
    path, final = execute(load_experiment_config(None, overrides, "meta-train"))
    assert pd.read_parquet(path / "train.parquet")["step"].tolist() == [2, 4]
    assert all(np.isfinite(v) for v in final.values())


@pytest.mark.parametrize("flavour", sorted(p.stem for p in (ROOT / "configs" / "meta" / "eval").glob("*.yaml")))
def test_every_meta_test_flavour_runs_on_cuda(tmp_path, flavour):
    omniglot = ROOT.parent / "shared" / "data" / "omniglot"
    if not (omniglot / "images_evaluation.zip").exists():
        pytest.skip("real Omniglot not found")
    oml = flavour.startswith("oml")
    spec = {"name": "oml", "channels": 32, "hidden": 64} if oml else {"name": "anml"}
    checkpoint = save_model(build_model(spec), tmp_path / "model.pt", step=0)
    overrides = [
        f"checkpoint={checkpoint}",
        f"out_dir={tmp_path}",
        "device=cuda",
        "quiet=true",
        f"data_dir={omniglot}",
        "protocol.classes=[5]",
        "protocol.runs=2",
        "protocol.lrs=[0.001]",
        "splits=[test]",
    ]
    config = ROOT / "configs" / "meta" / "eval" / f"{flavour}.yaml"
    path, _ = execute(load_experiment_config(config, overrides, "meta-eval"))
    frame = pd.read_parquet(path / "results.parquet")
    assert len(frame) and frame["test_acc"].between(0, 1).all()


def test_sweep_shares_the_gpu_by_memory(tmp_path, toy_config, capsys):
    args = [
        "sweep",
        str(toy_config),
        "device=cuda",
        "--grid",
        "walk.scale=1,2,3",
        "--gpu-memory-gb",
        "2",
        "--workers",
        "3",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    assert "3 complete" in capsys.readouterr().out
