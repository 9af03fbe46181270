"""The sequential meta-test: protocol order, batched == one-by-one sweeps, lstsq, honest selection, schema, CLI."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from metacl.cli import main
from metacl.core.checkpoint import save_checkpoint
from metacl.core.errors import ConfigError, DataError, RunInterrupted
from metacl.core.experiment import execute, load_experiment_config
from metacl.meta.data.class_images import ClassImages
from metacl.meta.eval import checkpoints as eval_checkpoints
from metacl.meta.eval import experiment as eval_experiment
from metacl.meta.eval import sweep as sweep_module
from metacl.meta.eval.checkpoints import checkpoint_fingerprint, load_eval_model
from metacl.meta.eval.protocol import ProtocolConfig, class_counts, draw_tasks, eval_points, nested_groups
from metacl.meta.eval.reinit import lstsq_fit
from metacl.meta.eval.report import trajectory_accuracy, write_report
from metacl.meta.eval.results import (
    describe,
    final_accuracy,
    read_results,
    result_frame,
    select_learning_rates,
    validation_choice,
)
from metacl.meta.eval.sweep import LRSweep
from metacl.meta.eval.trajectories import Trajectories
from metacl.models import build_model, register_model, save_model
from metacl.models.layers import InstanceNorm
from tests.meta_eval_reference import reference_trajectory


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread avoids OpenMP hand-offs that dominate on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@register_model("meta-eval-tiny")
class Tiny(nn.Module):
    """encode = ReLU(conv(x)) (144 features); head = fc, or fc(ReLU(fc1)) with `hidden`."""

    def __init__(self, num_classes: int = 40, hidden: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        if hidden:
            self.fc1 = nn.Linear(144, hidden)
        self.hidden = hidden
        self.fc = nn.Linear(hidden or 144, num_classes)

    def encode(self, x):
        return torch.relu(self.conv(x)).flatten(1)

    def head(self, z):
        return self.fc(torch.relu(self.fc1(z))) if self.hidden else self.fc(z)

    def forward(self, x):
        return self.head(self.encode(x))


def class_images(classes: int = 30, per_class: int = 20, seed: int = 0) -> torch.Tensor:
    """Learnable synthetic classes: a fixed random prototype per class plus noise, (C, K, 1, 8, 8)."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(classes, 1, 1, 8, 8, generator=generator)
    return (prototypes + 0.3 * torch.rand(classes, per_class, 1, 8, 8, generator=generator)).clamp(0, 1)


def assert_accuracies_agree(a: np.ndarray, b: np.ndarray) -> None:
    """Two computations that agree to float32 rounding can still flip an argmax where two logits
    tie to the last bits, and where they tie depends on the CPU's kernels: allow a rare flip."""
    assert a.shape == b.shape
    differ = ~np.isclose(a, b, rtol=0, atol=1e-9)
    assert differ.mean() <= 0.01, f"{differ.sum()} of {differ.size} accuracies differ"
    assert np.abs(a - b).max(initial=0.0) <= 0.25


def protocol(**changes) -> ProtocolConfig:
    base = dict(classes=[4], lrs=[0.01, 0.001], runs=2, compile=False)
    return ProtocolConfig(**{**base, **changes})


def test_tasks_follow_class_order_and_split_train_test_apart():
    tasks = draw_tasks(30, 20, 6, 15, 5, runs=3, seed=1)
    assert tasks.train.shape == (3, 6 * 15) and tasks.test.shape == (3, 6 * 5)
    for run in range(3):
        assert torch.equal(tasks.train[run] // 20, tasks.class_ids[run].repeat_interleave(15))
        assert torch.equal(tasks.test[run] // 20, tasks.class_ids[run].repeat_interleave(5))
        assert not set(tasks.train[run].tolist()) & set(tasks.test[run].tolist())
    assert len({tuple(ids.tolist()) for ids in tasks.class_ids}) == 3  # runs draw different classes
    again = draw_tasks(30, 20, 6, 15, 5, runs=3, seed=1)
    assert torch.equal(again.train, tasks.train)
    assert eval_points(10, 0) == [10] and eval_points(10, 4) == [1, 4, 8, 10]


def test_one_adam_step_per_image_in_class_order(monkeypatch):
    sweep = LRSweep(Tiny(), class_images(), protocol(), seed=0)
    seen_targets = []
    original = sweep.linear_step

    def counting(weight, m, v, logits, x, target, *rest):
        seen_targets.append(target.clone())
        return original(weight, m, v, logits, x, target, *rest)

    monkeypatch.setattr(sweep, "linear_step", counting)
    sweep.run(4)
    tasks = draw_tasks(30, 20, 4, 15, 5, 2, 0, "test")
    assert len(seen_targets) == 4 * 15
    targets = torch.stack(seen_targets, 1)  # (trajectories, steps): trajectory = run * lrs + lr
    for trajectory in range(4):
        assert torch.equal(targets[trajectory], tasks.class_ids[trajectory // 2].repeat_interleave(15))


@pytest.mark.parametrize(
    "hidden, opt_params, reinit_params, reinit_method, path, atol",
    [
        (0, ["fc"], ["fc"], "kaiming", "linear", 2e-6),  # ANML protocol (olft)
        (0, ["fc"], ["fc"], "lstsq", "linear", 2e-6),  # least-squares start, then Adam
        (16, ["fc."], ["fc."], "kaiming", "linear", 2e-6),  # OML head, last layer only
        (16, ["fc1", "fc."], ["fc1", "fc."], "kaiming", "vmap", 2e-6),  # OML 2-layer head
        # unfrozen: batched convolution gradients sum in another order, and Adam's division by
        # sqrt(v) turns float32 rounding of near-zero gradient entries into ~1e-5 weight differences
        (0, ["all"], ["fc"], "kaiming", "sequential", 2e-5),  # on CPU, one trajectory after another
        (0, ["all"], ["fc"], "kaiming", "vmap", 2e-5),  # elsewhere
    ],
)
def test_batched_sweep_equals_one_by_one_torch_adam(
    hidden, opt_params, reinit_params, reinit_method, path, atol, monkeypatch
):
    if path == "vmap" and opt_params == ["all"]:
        monkeypatch.setattr(LRSweep, "sequential_devices", ())
    model, images = Tiny(hidden=hidden), class_images()
    config = protocol(opt_params=opt_params, reinit_params=reinit_params, reinit_method=reinit_method, eval_freq=1)
    sweep = LRSweep(model, images, config, seed=3)
    result = sweep.run(4, return_weights=True)
    assert sweep.engine_name == path
    tasks = draw_tasks(30, 20, 4, 15, 5, 2, 3, "test")
    trajectories = result.trajectories
    assert trajectories.lr.tolist() == [0.01, 0.001] * 2 and trajectories.run.tolist() == [0, 0, 1, 1]
    for trajectory, (lr, run) in enumerate(zip(trajectories.lr, trajectories.run)):
        reference = reference_trajectory(model, images, tasks, int(run), float(lr), config, seed=3)[-1]
        torch.testing.assert_close(result.weights[trajectory], reference, rtol=1e-5, atol=atol)
    assert result.train_acc.shape == (4, 4, 4)  # eval points 1..4, trajectories, classes


def test_unfrozen_anml_sweep_is_the_same_one_by_one_and_under_vmap(monkeypatch):
    """ANML with metacl's batch-1 layers, every parameter learning: the sequential engine (plain
    autograd through the layers' own autograd Functions) and the vmap engine (PyTorch's kernels)
    learn the same weights and accuracies (float32 rounding apart)."""
    torch.manual_seed(0)
    model = build_model({"name": "anml", "num_classes": 6, "rln_channels": 6, "nm_channels": 4})
    images = torch.rand(6, 4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    config = protocol(classes=[3], runs=1, train_examples=2, test_examples=2, opt_params=["all"], reinit_params=["fc"])
    sequential = LRSweep(model, images, config, seed=0).run(3, return_weights=True)
    monkeypatch.setattr(LRSweep, "sequential_devices", ())
    vmapped_sweep = LRSweep(model, images, config, seed=0)
    vmapped = vmapped_sweep.run(3, return_weights=True)
    assert vmapped_sweep.engine_name == "vmap"
    # a conv bias before instance norm has a gradient of exactly zero, so Adam turns its rounding
    # noise into steps of the learning rate's size, in whichever direction the noise points
    pre_norm = {
        f"{name}.0.bias"
        for name, block in model.named_modules()
        if isinstance(block, nn.Sequential) and len(block) > 1 and isinstance(block[1], InstanceNorm)
    }
    sizes = [p.numel() for p in model.parameters()]
    for (name, _), ours, theirs in zip(
        model.named_parameters(), sequential.weights.split(sizes, 1), vmapped.weights.split(sizes, 1)
    ):
        if name not in pre_norm:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=name)
    assert len(pre_norm) == 6 and not torch.equal(sequential.weights[0], sequential.weights[1])
    for kind in ("train_acc", "test_acc"):  # an argmax may flip where two logits tie to the last bits
        assert np.abs(getattr(sequential, kind) - getattr(vmapped, kind)).mean() <= 0.1


@pytest.mark.parametrize("learns", [["fc"], ["fc1", "fc"]])  # the linear engine; the vmap engine
def test_nested_draws_give_each_count_the_sweep_of_the_largest_draws_first_classes(monkeypatch, learns):
    model, images = Tiny(hidden=8 if len(learns) > 1 else 0), class_images()
    nested = protocol(classes=[2, 5], lrs=[0.05, 0.005], opt_params=learns, reinit_params=[], eval_freq=2)
    results = LRSweep(model, images, replace(nested, class_draws="nested"), seed=3).run_counts([2, 5])
    alone = LRSweep(model, images, replace(nested, class_draws="independent"), seed=3)
    assert results[5].classes_trained == [1, 2, 4, 5] and results[2].classes_trained == [1, 2]
    # the largest count is the independent sweep itself
    whole = alone.run(5)
    # a smaller count is the largest draw's first classes, learned and measured on their own
    largest = draw_tasks(30, 20, 5, 15, 5, 2, 3, "test")
    monkeypatch.setattr(sweep_module, "draw_tasks", lambda *args: largest.first(2))
    first = alone.run(2)
    for kind in ("train_acc", "test_acc", "train_top5", "test_top5"):
        assert getattr(results[2], kind).shape == (2, 4, 2)
        assert_accuracies_agree(getattr(results[5], kind), getattr(whole, kind))
        assert_accuracies_agree(getattr(results[2], kind), getattr(first, kind))
    assert not np.array_equal(results[5].test_acc[-1], results[5].test_acc[0])  # learning happened


def test_nested_draws_share_one_trajectory_per_run_among_counts_at_the_same_lr():
    assert nested_groups([600, 10, 50, 100], None) == [([10, 50, 100, 600], None)]
    chosen = {10: 0.001, 50: 0.0004, 100: 0.0004, 600: 0.0004}
    assert nested_groups([10, 50, 100, 600], chosen) == [([10], [0.001]), ([50, 100, 600], [0.0004])]
    with pytest.raises(ConfigError, match="class_draws=independent"):
        protocol(eval_method="iid", class_draws="nested")
    with pytest.raises(ConfigError, match="class_draws=independent"):
        protocol(reinit_method="lstsq", class_draws="nested")
    sweep = LRSweep(Tiny(), class_images(), protocol(eval_method="iid"), seed=0)  # auto: independent for iid
    assert [counts for counts, _ in sweep.groups([2, 4])] == [[2], [4]]


@pytest.mark.parametrize("eval_method", ["sequential", "iid"])
def test_trajectory_groups_give_the_all_at_once_result(eval_method):
    """Advancing trajectories in groups (for cache locality) changes nothing.

    Adam is elementwise; the one reduction, each trajectory's logits, is a batched matmul. Whether
    it sums in the same order for every batch size depends on the CPU's BLAS kernels (on the
    machines tried, groups of 2+ matched bit for bit and a lone trajectory, which takes the
    matrix-vector kernel, did not), so every grouping is held to float32 rounding, the tolerance
    of the torch.optim.Adam equivalence test, and the accuracies to a rare argmax flip.
    """
    images, model = class_images(), Tiny()
    results = []
    for group in (0, 4, 1):  # all 6 at once; 4 + 2 (an uneven last group); one by one
        config = protocol(
            lrs=[0.05, 0.005, 0.0005], eval_freq=2, trajectory_group=group, eval_method=eval_method, batch_size=8
        )
        result = LRSweep(model, images, config, seed=2).run(5, return_weights=True)
        results.append((result, result.weights))
    (together, weights), (grouped, grouped_weights), (single, single_weights) = results
    assert weights.shape[0] == 6
    torch.testing.assert_close(grouped_weights, weights, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(single_weights, weights, rtol=1e-5, atol=2e-6)
    for name in ("train_acc", "test_acc", "train_top5", "test_top5"):
        assert_accuracies_agree(getattr(grouped, name), getattr(together, name))
        assert_accuracies_agree(getattr(single, name), getattr(together, name))
    with pytest.raises(ConfigError, match="trajectory_group"):
        protocol(trajectory_group=-1)


def test_flushing_denormals_leaves_a_saturated_sweep_unchanged(monkeypatch):
    """The sweep flushes denormals for speed; at learning rates that saturate the softmax (where
    the Adam moments go denormal) the weights and accuracies stay those of exact arithmetic."""
    images, model = class_images(), Tiny()
    config = protocol(lrs=[1.0, 0.3], runs=2)
    flushed = LRSweep(model, images, config, seed=3).run(20, return_weights=True)
    monkeypatch.setattr(sweep_module, "denormals_flushed", lambda _device: contextlib.nullcontext())
    exact = LRSweep(model, images, config, seed=3).run(20, return_weights=True)
    outputs, inputs = model.fc.weight.shape
    weights = exact.weights[:, : outputs * inputs].view(-1, outputs, inputs)
    features = model.encode(images[:20].flatten(0, 1)).detach()
    logits = torch.einsum("tod,nd->tno", weights, features)
    gaps = logits.max(2).values - logits.min(2).values
    assert gaps.median() > 100, "the softmax must saturate (probabilities below 1e-38) for this test to mean anything"
    torch.testing.assert_close(flushed.weights, exact.weights, rtol=1e-6, atol=1e-7)
    for name in ("train_acc", "test_acc"):
        assert_accuracies_agree(getattr(flushed, name), getattr(exact, name))


def test_trajectories_name_each_lr_and_run_and_a_subset_learns_as_in_the_whole_sweep():
    grid = Trajectories.grid([0.1, 0.01, 0.001], runs=2)
    assert grid.count == 6 and grid.lr.tolist() == [0.1, 0.01, 0.001] * 2 and grid.run.tolist() == [0, 0, 0, 1, 1, 1]
    groups = list(grid.groups(4))
    assert [(where.start, where.stop) for where, _ in groups] == [(0, 4), (4, 6)]
    assert groups[1][1].run.tolist() == [1, 1] and groups[1][1].lr.tolist() == [0.01, 0.001]
    assert grid.runs == [0, 1] and grid[2:3].lr.tolist() == [0.001]
    sweep = LRSweep(Tiny(), class_images(), protocol(lrs=[0.05, 0.005, 0.0005]), seed=4)
    whole = sweep.run(4, return_weights=True)
    chosen = sweep.run(4, Trajectories.grid([0.005], 2), return_weights=True)
    torch.testing.assert_close(chosen.weights, whole.weights[[1, 4]], rtol=1e-5, atol=2e-6)
    for name in ("train_acc", "test_acc"):
        assert_accuracies_agree(getattr(chosen, name), getattr(whole, name)[:, [1, 4]])
    with pytest.raises(ValueError, match="runs 0..1"):
        sweep.run(4, Trajectories.grid([0.005], 3))


@pytest.mark.slow
def test_compiled_linear_step_matches_eager():
    """torch.compile fuses the linear-head Adam step; it must agree with the eager operations."""
    images, model = class_images(), Tiny()
    results = []
    for compile_step in (False, True):
        result = LRSweep(model, images, protocol(compile=compile_step, lrs=[0.05, 0.001]), seed=1).run(
            4, return_weights=True
        )
        results.append((result, result.weights))
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=2e-6)
    assert_accuracies_agree(results[1][0].test_acc, results[0][0].test_acc)


def test_seen_and_unseen_classes_are_reported_apart():
    config = protocol(lrs=[0.01], eval_freq=1, classes=[5])
    result = LRSweep(Tiny(), class_images(), config, seed=0).run(5)
    frame = result_frame(result, describe(config, "tiny", "synthetic"), 5, "test")
    per_run = trajectory_accuracy(frame)
    first = per_run[per_run["classes_trained"] == 1]
    rows = frame[frame["classes_trained"] == 1]
    for run, group in rows.groupby("run"):
        assert first.loc[first["run"] == run, "seen_train_acc"].item() == pytest.approx(
            group.loc[group["class_id"] == 0, "train_acc"].item()
        )
    assert (first["seen_train_acc"] == 1.0).all()  # the one class learned is remembered
    unseen = rows[rows["class_id"] >= 1]
    assert unseen["train_acc"].mean() < 0.1  # a new head does not know unseen classes
    assert (first["train_acc"] < first["seen_train_acc"]).all()


def test_lstsq_fit_solves_toy_problems():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 6, generator=generator)
    labels = torch.randint(0, 3, (200,), generator=generator)
    weight, bias = lstsq_fit(features, labels, outputs=5)
    inputs = np.c_[features.double().numpy(), np.ones(200)]
    expected = np.linalg.lstsq(inputs, np.eye(5)[labels.numpy()], rcond=None)[0]
    np.testing.assert_allclose(weight.numpy(), expected[:-1].T, atol=1e-5)
    np.testing.assert_allclose(bias.numpy(), expected[-1], atol=1e-5)
    # an exactly linear target is recovered; unused outputs get zero weight
    separable = torch.eye(6)[torch.arange(12) % 6] * 3 + 1
    weight, bias = lstsq_fit(separable, torch.arange(12) % 6, outputs=8)
    assert torch.equal((separable @ weight.T + bias).argmax(1), torch.arange(12) % 6)
    assert weight[6:].abs().max() < 1e-5
    # fewer samples than features: the minimum-norm solution (as the pseudo-inverse gives)
    wide = torch.randn(4, 10, generator=generator)
    weight, bias = lstsq_fit(wide, torch.arange(4), outputs=4)
    pinv = np.linalg.pinv(np.c_[wide.double().numpy(), np.ones(4)]) @ np.eye(4)
    np.testing.assert_allclose(torch.cat([weight, bias[:, None]], 1).numpy(), pinv.T, atol=1e-5)


def test_zero_shot_and_iid_flavours_run_and_learn():
    images = class_images()
    zero = LRSweep(Tiny(), images, protocol(eval_method="zero-shot", reinit_method="lstsq", init_size=60), seed=0).run(
        4
    )
    assert zero.trajectories.lr.tolist() == [0.0, 0.0] and zero.train_acc.mean() > 0.8
    iid = LRSweep(Tiny(), images, protocol(eval_method="iid", epochs=5, batch_size=8, lrs=[0.01]), seed=0).run(4)
    assert iid.classes_trained == [4] and iid.train_acc.mean() > 0.8
    assert (iid.train_top5 >= iid.train_acc).all()
    with pytest.raises(ConfigError, match="zero-shot"):
        protocol(eval_method="zero-shot")


def write_checkpoint(tmp_path, seed=0, **extra):
    torch.manual_seed(seed)
    model = build_model({"name": "meta-eval-tiny", "num_classes": 40})
    return save_model(model, tmp_path / "model.pt", **extra)


def run_eval(tmp_path, monkeypatch, splits, name, mode="new", model_seed=0, **changes):
    monkeypatch.setattr(eval_experiment, "load_splits", lambda config, device, setup: splits)
    overrides = [
        f"checkpoint={write_checkpoint(tmp_path, model_seed)}",
        f"out_dir={tmp_path}",
        f"name={name}",
        "protocol.classes=[3,5]",
        "protocol.lrs=[0.05,0.005,0.0005]",
        "protocol.runs=2",
        "protocol.compile=false",
        "quiet=true",
        "device=cpu",
        *[f"{k}={v}" for k, v in changes.items()],
    ]
    path, final = execute(load_experiment_config(None, overrides, "meta-eval"), mode)
    return path, final, pd.read_parquet(path / "results.parquet")


@pytest.fixture
def sweeps(monkeypatch):
    """Every LRSweep.run_group of a meta-eval, in order: (split, class count or counts, their Trajectories)."""
    calls = []
    real = LRSweep.run_group

    def spy(self, counts, trajectories=None, **options):
        results = real(self, counts, trajectories, **options)
        calls.append((self.split, counts[0] if len(counts) == 1 else tuple(counts), results[counts[0]].trajectories))
        return results

    monkeypatch.setattr(LRSweep, "run_group", spy)
    return calls


VAL, TEST = class_images(12, seed=1), class_images(20, seed=2)
"""A validation pool of 12 classes (fewer than the 15-class test count below) and a test split of 20."""


def test_validation_selection_never_touches_test_images(tmp_path, monkeypatch):
    _, final, frame = run_eval(tmp_path, monkeypatch, {"val": VAL, "test": TEST}, "clean")
    poisoned = TEST.clone()
    poisoned[:, 15:] = float("nan")  # every image that can be a test image of the test split
    _, final_poisoned, frame_poisoned = run_eval(tmp_path, monkeypatch, {"val": VAL, "test": poisoned}, "poisoned")
    val_rows = frame[frame["split"] == "val"].reset_index(drop=True)
    pd.testing.assert_frame_equal(val_rows, frame_poisoned[frame_poisoned["split"] == "val"].reset_index(drop=True))
    chosen = select_learning_rates(frame).query("selection == 'validation'")[["classes", "lr"]]
    chosen_poisoned = select_learning_rates(frame_poisoned).query("selection == 'validation'")[["classes", "lr"]]
    pd.testing.assert_frame_equal(chosen.reset_index(drop=True), chosen_poisoned.reset_index(drop=True))
    assert {k: v for k, v in final.items() if k.startswith("validation") and k.endswith("/lr")} == {
        k: v for k, v in final_poisoned.items() if k.startswith("validation") and k.endswith("/lr")
    }
    # the test split ran at the chosen LRs, whatever its images
    for rows in (frame, frame_poisoned):
        test_lrs = rows[rows["split"] == "test"].groupby("classes")["lr"].unique().map(list).to_dict()
        assert test_lrs == {row.classes: [row.lr] for row in chosen.itertuples()}
    # the poison did reach the test split's measurement, so the check above could have failed
    test_rows = frame_poisoned[frame_poisoned["split"] == "test"]
    assert not np.allclose(test_rows["test_acc"], frame[frame["split"] == "test"]["test_acc"])


def test_test_split_runs_only_at_the_validation_chosen_lr_by_default(tmp_path, monkeypatch, sweeps):
    _, final, frame = run_eval(
        tmp_path,
        monkeypatch,
        {"val": VAL, "test": TEST},
        "chosen",
        **{"protocol.classes": "[3,15]", "protocol.class_draws": "independent"},
    )
    # validation: every LR x run (3 x 2) at 3 and 12 classes (its pool holds 12); test: the 2 runs at one LR
    assert [(split, classes, t.count) for split, classes, t in sweeps] == [
        ("val", 3, 6),
        ("val", 12, 6),
        ("test", 3, 2),
        ("test", 15, 2),
    ]
    val_final = final_accuracy(frame[frame["split"] == "val"])
    for _, classes, trajectories in sweeps[2:]:
        lr, val_classes = validation_choice(val_final, classes)
        assert val_classes == min(classes, 12)  # 15 classes take the choice of the largest validated count
        assert trajectories.lr.tolist() == [lr, lr] and trajectories.run.tolist() == [0, 1]
        assert final[f"validation/{classes}/lr"] == lr
    test_rows = frame[frame["split"] == "test"]
    assert len(test_rows) == 2 * (3 + 15)  # runs x classes, measured once at the end
    assert len(frame) - len(test_rows) == 6 * (3 + 12)
    assert not any(key.startswith("best-on-test") for key in final)


def test_the_default_meta_eval_learns_each_runs_largest_draw_once_per_chosen_lr(tmp_path, monkeypatch, sweeps):
    _, final, frame = run_eval(
        tmp_path, monkeypatch, {"val": VAL, "test": TEST}, "nested", **{"protocol.classes": "[3,5,15]"}
    )
    # validation: one sweep of every LR x run for 3, 5 and 12 classes; test: one per distinct chosen LR
    assert [(split, counts, t.count) for split, counts, t in sweeps[:1]] == [("val", (3, 5, 12), 6)]
    chosen = {classes: final[f"validation/{classes}/lr"] for classes in (3, 5, 15)}
    tested = {}
    for split, counts, trajectories in sweeps[1:]:
        counts = counts if isinstance(counts, tuple) else (counts,)
        assert split == "test" and trajectories.run.tolist() == [0, 1]
        tested.update({classes: trajectories.lr.tolist() for classes in counts})
    assert tested == {classes: [lr, lr] for classes, lr in chosen.items()}
    assert len(sweeps) == 1 + len(set(chosen.values()))
    # every count has its rows: runs x classes at the end, on its own first classes
    test_rows = frame[frame["split"] == "test"]
    assert len(test_rows) == 2 * (3 + 5 + 15) and test_rows["class_draws"].eq("nested").all()
    assert (test_rows.groupby("classes")["class_id"].max() == pd.Series({3: 2, 5: 4, 15: 14})).all()


def test_test_lrs_all_reproduces_the_full_sweep_table(tmp_path, monkeypatch, sweeps):
    independent = {"protocol.classes": "[3,15]", "protocol.class_draws": "independent"}
    _, _, chosen = run_eval(tmp_path, monkeypatch, {"val": VAL, "test": TEST}, "chosen", **independent)
    sweeps.clear()
    _, final, frame = run_eval(tmp_path, monkeypatch, {"val": VAL, "test": TEST}, "all", test_lrs="all", **independent)
    assert [(split, classes, t.count) for split, classes, t in sweeps] == [
        ("val", 3, 6),
        ("val", 12, 6),
        ("test", 3, 6),
        ("test", 15, 6),
    ]
    # every split's every-LR sweep, exactly as LRSweep gives it (what meta-eval wrote before test_lrs existed)
    config = protocol(classes=[3, 15], lrs=[0.05, 0.005, 0.0005], class_draws="independent")
    checkpoint = frame["model"].iloc[0]
    model, info = load_eval_model(checkpoint), describe(config, checkpoint, "omniglot")
    expected = []
    for split, images in (("val", VAL), ("test", TEST)):
        sweep = LRSweep(model, images, config, seed=0, split=split)
        expected += [
            result_frame(sweep.run(classes), info, classes, split)
            for classes in class_counts(config, split, images.shape[0])
        ]
    pd.testing.assert_frame_equal(frame, pd.concat(expected, ignore_index=True), check_dtype=False)
    # the default's validation rows are the same, and its test rows are those of the chosen LRs
    pd.testing.assert_frame_equal(chosen[chosen["split"] == "val"], frame[frame["split"] == "val"])
    picked = frame.merge(chosen[chosen["split"] == "test"][["classes", "lr"]].drop_duplicates())
    picked = picked[picked["split"] == "test"].reset_index(drop=True)
    assert_accuracies_agree(picked["test_acc"].to_numpy(), chosen[chosen["split"] == "test"]["test_acc"].to_numpy())
    assert {"best-on-test/3/lr", "best-on-test/15/lr", "validation/15/lr"} <= set(final)


@pytest.mark.parametrize("draws, validation_sweeps", [("independent", 2), ("nested", 1)])
def test_a_meta_eval_stopped_after_validation_resumes_to_the_same_results(
    tmp_path, monkeypatch, draws, validation_sweeps
):
    classes = {"protocol.classes": "[3,15]", "protocol.class_draws": draws}
    _, straight, frame = run_eval(tmp_path, monkeypatch, {"val": VAL, "test": TEST}, "straight", **classes)
    real, calls = LRSweep.run_group, []

    def stop_after_validation(self, *args, **options):
        calls.append(self.split)
        if len(calls) == validation_sweeps:  # the last validation sweep: the run stops after it, before any test
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **options)

    monkeypatch.setattr(LRSweep, "run_group", stop_after_validation)
    with pytest.raises(RunInterrupted):
        run_eval(tmp_path, monkeypatch, {"val": VAL, "test": TEST}, "resumed", **classes)
    monkeypatch.setattr(LRSweep, "run_group", real)
    _, resumed, resumed_frame = run_eval(
        tmp_path, monkeypatch, {"val": VAL, "test": TEST}, "resumed", "resume", **classes
    )
    assert calls == ["val"] * validation_sweeps
    pd.testing.assert_frame_equal(resumed_frame, frame)  # the test split at the LRs chosen before the stop
    assert resumed == straight


def test_a_meta_eval_never_resumes_on_another_model(tmp_path, monkeypatch):
    real = LRSweep.run_group

    def stop_at_once(self, *args, **options):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **options)

    monkeypatch.setattr(LRSweep, "run_group", stop_at_once)
    with pytest.raises(RunInterrupted):
        run_eval(tmp_path, monkeypatch, {"val": VAL, "test": TEST}, "a")
    monkeypatch.setattr(LRSweep, "run_group", real)
    # the same weights saved again (other bytes: torch names the archive after its temporary file) resume
    other_bytes = tmp_path / "copy"
    other_bytes.mkdir()
    assert checkpoint_fingerprint(write_checkpoint(other_bytes)) == checkpoint_fingerprint(write_checkpoint(tmp_path))
    # other weights under the same file name are refused, naming the record
    with pytest.raises(DataError, match="model_sha256"):
        run_eval(tmp_path, monkeypatch, {"val": VAL, "test": TEST}, "a", "resume", model_seed=1)


def test_report_prints_the_final_table_and_labels_best_on_test(tmp_path, monkeypatch):
    chosen, _, _ = run_eval(
        tmp_path, monkeypatch, {"val": VAL, "test": TEST}, "chosen", **{"protocol.classes": "[3,15]"}
    )
    every, _, _ = run_eval(
        tmp_path, monkeypatch, {"val": VAL, "test": TEST}, "all", test_lrs="all", **{"protocol.classes": "[3,15]"}
    )
    printed = []
    files = write_report([chosen], tmp_path / "chosen-report", echo=printed.append)
    text = files["markdown"].read_text()
    assert printed and printed[0] in text  # the final table, printed and in summary.md
    assert "| classes | test acc | chosen LR | chosen on | runs | train acc |" in printed[0]
    assert "| 15 | " in printed[0] and "12 val classes †" in printed[0]
    assert (
        "more classes than the validation pool holds: 15 classes use the choice at the largest "
        "validated count (12 classes)" in printed[0]
    )
    assert "best" not in text.lower()
    assert set(pd.read_csv(files["selection"])["selection"]) == {"validation"}
    files = write_report([every], tmp_path / "all-report", echo=None)
    text = files["markdown"].read_text()
    assert "### Best on test (the reference's choice; optimistic)" in text
    assert text.index("chosen LR") < text.index("Best on test")  # the honest table comes first
    assert set(pd.read_csv(files["selection"])["selection"]) == {"validation", "best-on-test"}
    for file in files.values():
        assert file.is_file() and file.stat().st_size > 0


def test_results_schema_and_report(tmp_path, monkeypatch):
    path, _, frame = run_eval(
        tmp_path, monkeypatch, {"val": VAL, "test": TEST}, "schema", **{"protocol.eval_freq": 2, "test_lrs": "all"}
    )
    expected = [
        "model",
        "dataset",
        "train_examples",
        "test_examples",
        "eval_method",
        "reinit_method",
        "reinit_params",
        "opt_params",
        "class_draws",
        "split",
        "classes",
        "lr",
        "run",
        "classes_trained",
        "class_id",
        "train_acc",
        "test_acc",
        "train_acc_top5",
        "test_acc_top5",
    ]
    assert list(frame.columns) == expected
    # one row per split x class count x lr x run x eval point x class
    per_count = {3: len(eval_points(3, 2)) * 3, 5: len(eval_points(5, 2)) * 5}
    assert len(frame) == 2 * 3 * 2 * sum(per_count.values())
    assert frame["train_acc"].between(0, 1).all() and frame["eval_method"].eq("sequential").all()
    assert frame["class_draws"].eq("nested").all()  # the default, where it applies
    sizes = frame.groupby(["split", "classes", "lr", "run", "classes_trained"]).size()
    assert (sizes.index.get_level_values("classes") == sizes.values).all()
    files = write_report([path], tmp_path / "report", echo=None)
    summary = pd.read_csv(files["summary"])
    assert {"test_acc_ci95", "seen_test_acc", "runs"} <= set(summary.columns)
    # a table written before the repeat index was named `run` reads the same
    old = tmp_path / "old.parquet"
    frame.rename(columns={"run": "trial"}).to_parquet(old)
    pd.testing.assert_frame_equal(read_results([old]), frame)
    old_files = write_report([old], tmp_path / "old-report", echo=None)
    for name in ("summary", "selection"):
        pd.testing.assert_frame_equal(pd.read_csv(old_files[name]), pd.read_csv(files[name]))
    # one written before class_draws existed drew every count on its own
    older = tmp_path / "older.parquet"
    frame.drop(columns="class_draws").to_parquet(older)
    assert read_results([older])["class_draws"].eq("independent").all()


# ------------------------------------------------------------------- the checkpoint's data record
@pytest.fixture
def datasets(monkeypatch):
    """metacl.meta.data.load_dataset replaced by synthetic classes; records what meta-eval loads and splits."""
    from metacl.meta import data

    calls = []

    def load_dataset(name, split, *, size, data_dir, device, quiet, first_963=False):
        calls.append(("load", name, split, data_dir, first_963))
        images = class_images(12 if split == "background" else 20, seed=len(calls))
        return ClassImages(images.to(device), [f"class{i}" for i in range(len(images))])

    def split_classes(data, val_classes, seed):
        calls.append(("split", val_classes, seed))
        return real_split(data, val_classes, seed)

    real_split = data.split_classes
    monkeypatch.setattr(data, "load_dataset", load_dataset)
    monkeypatch.setattr(data, "split_classes", split_classes)
    return calls


def eval_overrides(tmp_path, checkpoint, name, *extra):
    return [
        f"checkpoint={checkpoint}",
        f"out_dir={tmp_path / 'runs'}",
        f"name={name}",
        "protocol.classes=[3]",
        "protocol.lrs=[0.05,0.005]",
        "protocol.runs=1",
        "protocol.compile=false",
        "quiet=true",
        "device=cpu",
        *extra,
    ]


def test_meta_eval_reads_the_validation_split_and_data_dir_from_the_checkpoint(tmp_path, datasets, capsys):
    trained_on = tmp_path / "training-data"
    trained_on.mkdir()
    record = {
        "dataset": "omniglot",
        "split": "background",
        "image_size": 28,
        "val_classes": 6,
        "split_seed": 11,
        "first_963": True,
        "data_dir": str(trained_on),
    }
    checkpoint = write_checkpoint(tmp_path, data=record)
    # the command, with no data_dir: the training's data folder and validation hold-out
    assert main(["meta", "eval", str(checkpoint), *eval_overrides(tmp_path, checkpoint, "a")[1:]]) == 0
    assert datasets == [
        ("load", "omniglot", "background", str(trained_on), True),
        ("split", 6, 11),
        ("load", "omniglot", "evaluation", str(trained_on), False),
    ]
    assert "run complete" in capsys.readouterr().out
    # the user's values win
    datasets.clear()
    execute(
        load_experiment_config(
            None,
            eval_overrides(
                tmp_path, checkpoint, "b", f"data_dir={tmp_path}", "data.val_classes=4", "data.split_seed=3"
            ),
            "meta-eval",
        )
    )
    assert datasets == [
        ("load", "omniglot", "background", str(tmp_path), True),
        ("split", 4, 3),
        ("load", "omniglot", "evaluation", str(tmp_path), False),
    ]
    # validation classes are held out of what the checkpoint was trained on, so that must match
    with pytest.raises(ConfigError, match="meta-trained on 'background'"):
        execute(
            load_experiment_config(
                None, eval_overrides(tmp_path, checkpoint, "c", "data.val_split=evaluation"), "meta-eval"
            )
        )
    # a data folder that does not exist here (the checkpoint moved machines): the default one
    moved = write_checkpoint(tmp_path / "moved", data={**record, "data_dir": str(tmp_path / "gone")})
    datasets.clear()
    execute(load_experiment_config(None, eval_overrides(tmp_path, moved, "d"), "meta-eval"))
    assert [call[3] for call in datasets if call[0] == "load"] == [None, None]


def test_older_checkpoints_fall_back_to_the_training_runs_config(tmp_path, datasets):
    run_dir = tmp_path / "meta-train-old"
    write_checkpoint(run_dir)  # no data record
    (run_dir / "config.yaml").write_text("experiment: meta-train\nseed: 5\ndata: {val_classes: 7, first_963: true}\n")
    _, final = execute(load_experiment_config(None, eval_overrides(tmp_path, run_dir, "old"), "meta-eval"))
    assert datasets == [
        ("load", "omniglot", "background", None, True),
        ("split", 7, 5),
        ("load", "omniglot", "evaluation", None, False),
    ]
    assert "validation/3/lr" in final
    # no validation classes at all: the chosen-LR test refuses, test_lrs=all is the reference's sweep
    bare = write_checkpoint(tmp_path / "bare")
    with pytest.raises(ConfigError, match="test_lrs=all"):
        execute(load_experiment_config(None, eval_overrides(tmp_path, bare, "bare"), "meta-eval"))
    datasets.clear()
    _, final = execute(
        load_experiment_config(None, eval_overrides(tmp_path, bare, "bare", "test_lrs=all"), "meta-eval")
    )
    assert datasets == [("load", "omniglot", "evaluation", None, False)] and "best-on-test/3/lr" in final
    with pytest.raises(ConfigError, match="splits has no val"):
        load_experiment_config(None, eval_overrides(tmp_path, bare, "e", "splits=[test]"), "meta-eval")


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["meta", "eval", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["meta", "eval", str(tmp_path), "protocol.runs=0"]) == 2
    checkpoint = write_checkpoint(tmp_path)
    assert main(["meta", "eval", str(checkpoint), "protocol.nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["meta", "report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    with pytest.raises(SystemExit) as error:
        main(["meta", "report", str(tmp_path)])  # --out is required
    assert error.value.code == 2


def test_run_dir_resolves_to_its_model_checkpoint(tmp_path):
    run_dir = tmp_path / "meta-train-x"
    model = build_model({"name": "meta-eval-tiny", "hidden": 3})
    # an unfinished meta-train run: only the training state, whose model spec is in config.yaml
    save_checkpoint({"step": 5, "model": model.state_dict()}, run_dir / "checkpoints" / "last.pt")
    (run_dir / "config.yaml").write_text("experiment: meta-train\nmodel: {name: meta-eval-tiny, hidden: 3}\n")
    assert eval_checkpoints.resolve_checkpoint(run_dir) == run_dir / "checkpoints" / "last.pt"
    loaded = eval_checkpoints.load_eval_model(run_dir)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    save_model(model, run_dir / "model.pt")  # the finished run's final model wins
    assert eval_checkpoints.resolve_checkpoint(run_dir) == run_dir / "model.pt"
    with pytest.raises(ConfigError, match="no model checkpoint"):
        eval_checkpoints.resolve_checkpoint(tmp_path)


@pytest.mark.slow
def test_real_omniglot_meta_test_and_report(tmp_path, omniglot_dir):
    """A random-init ANML on the real Omniglot evaluation classes: the full pipeline, end to end."""
    torch.manual_seed(0)
    checkpoint = save_model(build_model({"name": "anml"}), tmp_path / "anml.pt")
    overrides = [
        f"checkpoint={checkpoint}",
        f"out_dir={tmp_path}",
        "name=real",
        f"data_dir={omniglot_dir.parent}",
        "protocol.classes=[5,10]",
        "protocol.lrs=[0.001,0.0001]",
        "protocol.runs=2",
        "protocol.eval_freq=5",
        "data.val_classes=20",
        "quiet=true",
        "device=cpu",
    ]
    path, final = execute(load_experiment_config(None, overrides, "meta-eval"))
    frame = pd.read_parquet(path / "results.parquet")
    assert set(frame["split"]) == {"val", "test"}
    final_test = frame[(frame["split"] == "test") & (frame["classes_trained"] == frame["classes"])]
    assert final_test["test_acc"].mean() > 0.2  # random features still separate 5-10 characters well
    files = write_report([path], tmp_path / "report")
    assert files["classes_plot"].stat().st_size > 10_000 and files["lr_plot"].stat().st_size > 10_000
    assert "validation/10/lr" in final
