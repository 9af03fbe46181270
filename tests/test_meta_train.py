"""Meta-training: episodes, zapping, second-order meta-gradients, no inner-gradient leak, resume."""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import metacl.meta.train.experiment as meta_experiment
from metacl.core.allocator import MallocTuning
from metacl.core.denormals import flushing
from metacl.core.errors import ConfigError, MetaclError, RunInterrupted
from metacl.core.experiment import execute, load_experiment_config
from metacl.meta.train.algorithms import algorithm_class, available_algorithms, register_algorithm
from metacl.meta.train.algorithms.iid import lr_factor
from metacl.meta.train.algorithms.meta import Meta
from metacl.meta.train.algorithms.sequential_episodic import SequentialEpisodic
from metacl.meta.train.episodes import EpisodeSampler
from metacl.meta.train.functional import (
    FunctionalModel,
    _GatherWeightGradient,
    _ProductWithStashedGradient,
    _WeightGradient,
    continual_trial,
    meta_loss,
    zap_rows,
)
from metacl.models import build_model, load_model, select_parameters

ROOT = Path(__file__).resolve().parents[1]
TINY_ANML = {
    "name": "anml",
    "rln_channels": 4,
    "nm_channels": 3,
    "num_classes": 8,
    "image_size": 22,
}  # 22 px: the smallest the 3 unpadded ANML blocks accept
TINY_CONVNET = "{name: convnet, num_blocks: 2, num_filters: 4, norm: in, image_size: 8, num_classes: 8}"


def pool(classes=6, per_class=10, seed=0, dtype=torch.float32, size=22):
    return torch.rand(classes, per_class, 1, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def trainer(cls, model, inner, outer, *, zap_seed=0, **settings):
    """An episodic algorithm on a given model, to drive with pre-sampled episodes."""
    config = cls.Config(inner_params=list(inner), outer_params=list(outer), **settings)
    streams = {"sample": torch.Generator().manual_seed(0), "zap": torch.Generator().manual_seed(zap_seed)}
    return cls(model, pool(per_class=20), config, streams)  # its own sampler stays unused


def tiny_model(spec=TINY_ANML, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return build_model(spec).to(dtype)


# ------------------------------------------------------------------------------------ episodes
def test_single_class_episode_layout():
    images = pool()
    sampler = EpisodeSampler(images, torch.Generator().manual_seed(1), num_batches=5, batch_size=2, remember_size=7)
    episode = sampler.sample()
    assert episode.images.shape == (17, 1, 22, 22) and episode.labels.shape == (17,)
    inner = episode.labels[:10]
    assert (inner == inner[0]).all() and episode.inner_classes.tolist() == [int(inner[0])]
    assert [(s.start, s.stop) for s in episode.inner_batches(2)] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)] * 2
    assert episode.meta_rows == slice(0, None)
    # every image is the pool image of its label (tensor indexing picked matching rows)
    matches = (episode.images[:, None] == images[episode.labels]).flatten(2).all(2)
    assert matches.any(1).all()
    inner_rows = matches[:10].float().argmax(1)
    assert len(set(inner_rows.tolist())) == 10  # drawn without replacement within the class


def test_uniform_and_remember_only_episodes():
    sampler = EpisodeSampler(
        pool(),
        torch.Generator().manual_seed(2),
        sample_method="uniform",
        num_batches=20,
        remember_size=3,
        remember_only=True,
    )
    episode = sampler.sample()
    assert len(episode.inner_classes) > 1  # 20 random images of 6 classes
    assert episode.meta_rows == slice(20, None)
    assert len(episode.labels[episode.meta_rows]) == 3


def test_sampler_is_seeded_and_rejects_impossible_sizes():
    first = EpisodeSampler(pool(per_class=20), torch.Generator().manual_seed(3)).sample()
    again = EpisodeSampler(pool(per_class=20), torch.Generator().manual_seed(3)).sample()
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    with pytest.raises(ConfigError, match="exceeds"):
        EpisodeSampler(pool(per_class=10), torch.Generator(), num_batches=20)
    with pytest.raises(ConfigError, match="sample_method"):
        EpisodeSampler(pool(), torch.Generator(), sample_method="stratified", num_batches=2)


# ------------------------------------------------------------------------------------ zapping
def test_zap_rows_reinitialises_only_those_rows():
    layer = torch.nn.Linear(4096, 6)
    before_w, before_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    zap_rows(layer.weight, torch.tensor([1, 4]), torch.Generator().manual_seed(0))
    changed = (layer.weight != before_w).any(1)
    assert changed.tolist() == [False, True, False, False, True, False]
    assert torch.equal(layer.bias, before_b)
    std = layer.weight[[1, 4]].std().item()
    assert abs(std - (2 / 4096) ** 0.5) < 0.05 * (2 / 4096) ** 0.5  # kaiming-normal, fan-in
    other = torch.nn.Linear(4096, 6)
    zap_rows(other.weight, torch.tensor([1, 4]), torch.Generator().manual_seed(0))
    assert torch.equal(other.weight[[1, 4]], layer.weight[[1, 4]])  # seeded


def test_trainer_zaps_the_episode_class_before_learning():
    model = tiny_model()
    episode = EpisodeSampler(pool(), torch.Generator().manual_seed(0), num_batches=2, remember_size=2).sample()
    before = model.fc.weight.detach().clone()
    # fc adapts in the inner loop only (not an outer parameter): what stays is the zap alone
    trainer(Meta, model, ["fc.weight", "fc.bias"], ["rln.0.0.weight"], zap_seed=5).train_episode(episode)
    changed = (model.fc.weight != before).any(1)
    assert changed.nonzero().flatten().tolist() == episode.inner_classes.tolist()
    unzapped = copy.deepcopy(model)
    trainer(Meta, unzapped, ["fc.weight"], ["rln.0.0.weight"], zap=False).train_episode(episode)
    assert torch.equal(unzapped.fc.weight, model.fc.weight)


# ----------------------------------------------------------------------- second-order gradients
def tiny_episode(dtype=torch.float64):
    sampler = EpisodeSampler(pool(dtype=dtype), torch.Generator().manual_seed(4), num_batches=3, remember_size=4)
    return sampler.sample()


def test_meta_gradient_is_second_order_and_matches_finite_differences():
    model = tiny_model(dtype=torch.float64)
    params = dict(model.named_parameters())
    inner = list(select_parameters(model, ["rln", "fc"]))
    fmodel = FunctionalModel(model, inner)
    episode = tiny_episode()
    lr = 0.5
    loss, _, _ = meta_loss(fmodel, params, inner, episode, lr, create_graph=True)
    second = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    loss_fo, _, _ = meta_loss(fmodel, params, inner, episode, lr, create_graph=False)
    first = dict(zip(params, torch.autograd.grad(loss_fo, list(params.values()))))
    assert torch.allclose(loss, loss_fo)

    generator = torch.Generator().manual_seed(0)
    eps = 1e-6
    for name in ("rln.0.0.weight", "rln.1.1.weight", "nm.2.weight", "fc.weight"):
        flat = params[name].view(-1)
        for index in torch.randint(flat.numel(), (2,), generator=generator).tolist():
            original = flat[index].item()
            losses = []
            for value in (original + eps, original - eps, original):
                with torch.no_grad():
                    flat[index] = value
                losses.append(meta_loss(fmodel, params, inner, episode, lr, create_graph=False)[0].item())
            numeric = (losses[0] - losses[1]) / (2 * eps)
            analytic = second[name].view(-1)[index].item()
            assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(numeric)), (name, index)
    for name in ("rln.0.0.weight", "nm.2.weight"):
        difference = (second[name] - first[name]).norm() / second[name].norm()
        assert difference > 0.05, name  # the first-order approximation is measurably different


@pytest.mark.parametrize("create_graph", [True, False])
@pytest.mark.parametrize(("inner_prefixes", "batch_size", "cycles"), [(["rln", "fc"], 1, 1), (["all"], 2, 2)])
def test_low_rank_head_is_the_materialised_fast_weights(create_graph, inner_prefixes, batch_size, cycles):
    """Carrying the adapted fc as W_0 - lr * G^T Z gives the fast weights, meta-loss and
    meta-gradient of writing W_k at every step (float64, to rounding), second and first order."""
    model = tiny_model(dtype=torch.float64)
    params = dict(model.named_parameters())
    inner = list(select_parameters(model, inner_prefixes))
    sampler = EpisodeSampler(
        pool(dtype=torch.float64),
        torch.Generator().manual_seed(5),
        num_batches=3,
        batch_size=batch_size,
        remember_size=4,
    )
    episode = sampler.sample()
    results = []
    for low_rank in (True, False):
        fmodel = FunctionalModel(model, inner)
        assert fmodel.low_rank_head
        fmodel.low_rank_head = low_rank
        loss, logits, _ = meta_loss(fmodel, params, inner, episode, 0.3, cycles, create_graph=create_graph)
        grads = torch.autograd.grad(loss, list(params.values()))
        results.append([loss, logits, *grads])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert float(results[0][2].abs().max()) > 0  # the head's meta-gradient is not trivially zero


def test_stashed_weight_gradient_is_gathered_after_every_use():
    """A weight used only through stashing products still gets its whole gradient, summed once."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, dtype=torch.float64, generator=generator).requires_grad_()
    x = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    g = torch.randn(2, 5, dtype=torch.float64, generator=generator)
    stash = _WeightGradient()
    gathered = _GatherWeightGradient.apply(weight, stash)
    loss = (_ProductWithStashedGradient.apply(x, gathered, stash, True) ** 2).sum() + (
        _ProductWithStashedGradient.apply(g, gathered, stash, False) ** 3
    ).sum()
    (ours,) = torch.autograd.grad(loss, weight)
    (plain,) = torch.autograd.grad(((x @ weight.T) ** 2).sum() + ((g @ weight) ** 3).sum(), weight)
    assert torch.allclose(ours, plain, rtol=1e-12, atol=0) and not stash.lefts  # summed, then cleared


def test_low_rank_head_only_where_fc_reads_the_encoder():
    model = tiny_model()
    assert FunctionalModel(model, ["fc.weight", "fc.bias"]).low_rank_head
    assert not FunctionalModel(model, ["rln.0.0.weight"]).low_rank_head  # fc not adapted
    oml = build_model(
        {"name": "oml", "image_size": 22, "channels": 4, "strides": [1, 2, 1, 2], "hidden": 8, "num_classes": 8}
    )
    assert not FunctionalModel(oml, ["fc1.weight", "fc.weight"]).low_rank_head  # a layer between


def test_shared_encoder_and_mask_paths_give_identical_meta_gradients():
    episode = tiny_episode()
    for spec, inner_prefixes, reuse in (
        (TINY_ANML, ["rln", "fc"], "mask"),
        (TINY_ANML, ["fc"], "encode"),
        (
            {"name": "oml", "image_size": 22, "channels": 4, "strides": [1, 2, 1, 2], "hidden": 8, "num_classes": 8},
            ["fc1", "fc"],
            "encode",
        ),
    ):
        model = tiny_model(spec, dtype=torch.float64)
        params = dict(model.named_parameters())
        inner = list(select_parameters(model, inner_prefixes))
        fast_path = FunctionalModel(model, inner)
        assert fast_path.reuse == reuse
        plain = FunctionalModel(model, inner)
        plain.reuse = None
        grads = []
        for fmodel in (fast_path, plain):
            loss = meta_loss(fmodel, params, inner, episode, 0.3)[0]
            grads.append(torch.autograd.grad(loss, list(params.values())))
        for a, b in zip(*grads):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------- sequential_episodic leak
def test_sequential_episodic_outer_step_sees_only_the_meta_gradient():
    """By default the Adam step follows the meta gradient alone; `inner_grads_in_outer` adds the
    inner steps' gradient sum, as the reference's never-cleared .grad did. In float64: a conv
    bias before InstanceNorm has a zero true gradient, and Adam would scale float32 rounding in it
    to a visible step."""
    model = tiny_model(dtype=torch.float64)
    reference = copy.deepcopy(model)
    as_reference = copy.deepcopy(model)
    images = pool(dtype=torch.float64)
    episode = EpisodeSampler(images, torch.Generator().manual_seed(6), num_batches=4, remember_size=4).sample()
    trainer(SequentialEpisodic, model, ["all"], ["all"], inner_lr=0.1, outer_lr=0.01, zap=False).train_episode(episode)
    settings = dict(inner_lr=0.1, outer_lr=0.01, zap=False, inner_grads_in_outer=True)
    trainer(SequentialEpisodic, as_reference, ["all"], ["all"], **settings).train_episode(episode)

    params = list(reference.parameters())
    inner_grad_sum = [torch.zeros_like(p) for p in params]
    for rows in episode.inner_batches():
        loss = F.cross_entropy(reference(episode.images[rows]), episode.labels[rows])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, total in zip(params, grads, inner_grad_sum):
                p -= 0.1 * g
                total += g
    meta = F.cross_entropy(reference(episode.images), episode.labels)
    meta_grads = torch.autograd.grad(meta, params)
    leaked = copy.deepcopy(reference)
    for target, grads in ((reference, meta_grads), (leaked, [m + i for m, i in zip(meta_grads, inner_grad_sum)])):
        for p, g in zip(target.parameters(), grads):
            p.grad = g.clone()
        optimizer = torch.optim.Adam(target.parameters(), lr=0.01)
        optimizer.step()
    for ours, expected, ours_leaked, expected_leaked in zip(
        model.parameters(), reference.parameters(), as_reference.parameters(), leaked.parameters()
    ):
        assert torch.allclose(ours, expected, atol=1e-6)
        assert torch.allclose(ours_leaked, expected_leaked, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(model.parameters(), leaked.parameters()))


def test_meta_step_updates_the_pre_episode_weights():
    model = tiny_model()
    reference = copy.deepcopy(model)
    episode = EpisodeSampler(pool(), torch.Generator().manual_seed(7), num_batches=3, remember_size=4).sample()
    names = list(dict(model.named_parameters()))
    trainer(Meta, model, ["all"], ["all"], inner_lr=0.1, outer_lr=0.01, zap=False).train_episode(episode)
    params = dict(reference.named_parameters())
    loss = meta_loss(FunctionalModel(reference, names), params, names, episode, 0.1)[0]
    for p, g in zip(params.values(), torch.autograd.grad(loss, list(params.values()))):
        p.grad = g
    torch.optim.Adam(reference.parameters(), lr=0.01).step()
    for ours, expected in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(ours, expected, atol=1e-6)


def test_the_outer_adam_is_fused_and_stays_fused_when_an_older_state_is_loaded():
    """The fused kernel is the same Adam (the step above matches the default one); an older
    checkpoint's optimizer state, saved unfused, is loaded without switching the kernel off."""
    model = tiny_model()
    ours = trainer(Meta, model, ["all"], ["all"], inner_lr=0.1, outer_lr=0.01, zap=False)
    assert all(group["fused"] for group in ours.optimizer.param_groups)
    older = torch.optim.Adam(model.parameters(), lr=0.01)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    older.step()
    ours.load_state_dict({"optimizer": older.state_dict()})
    assert all(group["fused"] for group in ours.optimizer.param_groups)
    assert ours.optimizer.state_dict()["state"][0]["exp_avg"].equal(older.state_dict()["state"][0]["exp_avg"])


# ------------------------------------------------------------------------- trials, schedules
def test_continual_trial_is_sequential_sgd_then_accuracy_on_the_held_out_images():
    # float64: the two computations round differently, and a float32 near-tie could flip an argmax
    model = build_model(
        {"name": "convnet", "num_blocks": 2, "num_filters": 4, "norm": None, "num_classes": 8, "image_size": 8}
    ).double()
    images = torch.rand(3, 6, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    names = ["fc.weight", "fc.bias"]
    acc = continual_trial(
        FunctionalModel(model, names),
        dict(model.named_parameters()),
        names,
        images,
        0.5,
        4,
        torch.Generator().manual_seed(0),
    )

    reference = copy.deepcopy(model)
    zap_rows(reference.fc.weight, torch.arange(8), torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(reference.fc.parameters(), lr=0.5)
    for c in range(3):
        for i in range(4):
            optimizer.zero_grad()
            F.cross_entropy(reference(images[c, i : i + 1]), torch.tensor([c])).backward()
            optimizer.step()
    predictions = reference(images[:, 4:].reshape(6, 1, 8, 8)).argmax(1)
    expected = (predictions == torch.arange(3).repeat_interleave(2)).float().mean().item()
    assert acc == pytest.approx(expected)
    assert not torch.equal(model.fc.weight, reference.fc.weight)  # the model itself is untouched


def test_lr_schedules():
    assert lr_factor("constant", 500, 1000, 100, 0.1) == 1.0
    assert lr_factor("step", 250, 1000, 100, 0.5) == 0.25
    assert lr_factor("cosine", 0, 1000, 100, 0.1) == 1.0
    assert abs(lr_factor("cosine", 500, 1000, 100, 0.1) - 0.5) < 1e-12
    with pytest.raises(ConfigError, match="constant, step, cosine"):
        lr_factor("linear", 0, 10, 1, 0.1)


# ----------------------------------------------------------------- experiment, checkpoints, resume
@pytest.fixture
def synthetic_pools(monkeypatch):
    images = pool(classes=8, per_class=10, seed=9, size=8)
    monkeypatch.setattr(
        meta_experiment, "load_pools", lambda config, device: (images[:6].to(device), images[6:].to(device))
    )
    test_pool = pool(classes=4, per_class=10, seed=10, size=8)
    monkeypatch.setattr(meta_experiment, "load_test_pool", lambda config, device: test_pool.to(device))


TINY_TRAIN = {
    "iid": ["train.max_steps=6", "train.batch_size=8", "train.zap_every=2", "train.zap_size=2"],
    "episodic": [
        "train.episodes=6",
        "train.num_batches=3",
        "train.remember_size=4",
        "train.inner_params=[encoder.1, fc]",
    ],
}


def tiny_config(tmp_path, algorithm, name, *extra):
    return load_experiment_config(
        None,
        [
            f"algorithm={algorithm}",
            f"out_dir={tmp_path}",
            f"name={name}",
            "quiet=true",
            "tracking.backends=[]",
            f"model={TINY_CONVNET}",
            *TINY_TRAIN["iid" if algorithm == "iid" else "episodic"],
            "log_every=2",
            "checkpoint_every=2",
            "eval.every=3",
            "eval.classes=2",
            "eval.train_per_class=3",
            "eval_steps=[4]",
            "data.val_classes=2",
            "meta_test.splits=[val, test]",
            "meta_test.protocol.classes=[2, 4]",
            "meta_test.protocol.lrs=[0.001, 0.01]",
            "meta_test.protocol.runs=2",
            "meta_test.protocol.train_examples=3",
            "meta_test.protocol.test_examples=2",
            "meta_test.protocol.compile=false",
            *extra,
        ],
        "meta-train",
    )


def test_meta_training_flushes_denormals_while_it_steps_only(tmp_path, synthetic_pools, monkeypatch):
    trainer_class = algorithm_class("meta")
    real_step, seen = trainer_class.step, []

    def step(self, *args):
        seen.append(flushing())
        return real_step(self, *args)

    monkeypatch.setattr(trainer_class, "step", step)
    assert not flushing()
    execute(tiny_config(tmp_path, "meta", "run"))
    assert seen and all(seen) and not flushing()


def test_a_cpu_meta_training_tunes_the_allocator(tmp_path, synthetic_pools, monkeypatch):
    calls = []
    monkeypatch.setattr(
        meta_experiment, "tune_malloc", lambda **kw: calls.append(kw) or MallocTuning("tuned", "tuned (test)")
    )
    path, _ = execute(tiny_config(tmp_path, "meta", "run"))
    assert calls == [{"huge_pages": True}] and "allocator: tuned (test)" in (path / "log.txt").read_text()


@pytest.mark.parametrize("algorithm", ["meta", "sequential_episodic", "iid"])
def test_interrupted_and_resumed_run_ends_exactly_like_a_straight_run(
    tmp_path, synthetic_pools, monkeypatch, algorithm
):
    straight_path, straight = execute(tiny_config(tmp_path, algorithm, "straight"))

    trainer_class = algorithm_class(algorithm)
    real_step = trainer_class.step
    calls = {"n": 0}

    def stop_after_three(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the run checkpoints and stops after this step
        return real_step(self, *args)

    monkeypatch.setattr(trainer_class, "step", stop_after_three)
    config = tiny_config(tmp_path, algorithm, "resumed")
    with pytest.raises(RunInterrupted):
        execute(config)
    monkeypatch.setattr(trainer_class, "step", real_step)
    resumed_path, resumed = execute(config, "resume")

    a, b = load_model(straight_path / "model.pt"), load_model(resumed_path / "model.pt")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    drop = ["seconds_per_step", "cpu_seconds_per_step"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(straight_path / "train.parquet").drop(columns=drop),
        pd.read_parquet(resumed_path / "train.parquet").drop(columns=drop),
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(straight_path / "eval.parquet"), pd.read_parquet(resumed_path / "eval.parquet")
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(straight_path / "meta_test.parquet"), pd.read_parquet(resumed_path / "meta_test.parquet")
    )
    assert len(pd.read_parquet(straight_path / "train.parquet")) == 3
    assert (straight_path / "models" / "step-4.pt").exists()
    assert straight["step"] == 6 and "val_trial_acc" in straight
    assert {k: v for k, v in straight.items() if k not in drop} == {k: v for k, v in resumed.items() if k not in drop}


@pytest.mark.parametrize("first_eval_steps", ["[4, 6]", "[4]"])
def test_an_extended_run_ends_exactly_like_a_run_of_that_length(tmp_path, synthetic_pools, first_eval_steps):
    """--extend of a finished 6-episode run to 10 equals a 10-episode run from the start; with
    the old end newly added to eval_steps, its model is saved and meta-tested on the way."""
    longer = ("train.episodes=10", "eval_steps=[4, 6, 8]")
    straight_path, straight = execute(tiny_config(tmp_path, "meta", "straight", *longer))
    execute(tiny_config(tmp_path, "meta", "grown", f"eval_steps={first_eval_steps}"))
    grown_path, grown = execute(tiny_config(tmp_path, "meta", "grown", *longer), "extend")

    for name in ("model.pt", "models/step-4.pt", "models/step-6.pt", "models/step-8.pt"):
        a, b = load_model(straight_path / name), load_model(grown_path / name)
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), (name, key)
    drop = ["seconds_per_step", "cpu_seconds_per_step"]
    for table in ("train", "eval", "meta_test"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(straight_path / f"{table}.parquet").drop(columns=drop, errors="ignore"),
            pd.read_parquet(grown_path / f"{table}.parquet").drop(columns=drop, errors="ignore"),
        )
    assert grown["step"] == 10 == straight["step"]
    stored = load_experiment_config(str(grown_path / "config.yaml"), [], "meta-train")
    assert stored.train.episodes == 10 and stored.eval_steps == [4, 6, 8]  # it describes the longer run
    assert "extended: eval_steps" in (grown_path / "log.txt").read_text()
    # extending again to the same length is a resume of a complete run: nothing runs
    assert execute(tiny_config(tmp_path, "meta", "grown", *longer), "extend")[1] == grown


@pytest.mark.parametrize(
    "first, then, message",
    [
        ((), ("train.episodes=4", "eval_steps=[4]"), "shorter than the run's 6"),
        ((), ("train.episodes=10", "eval_steps=[6]"), r"eval_steps: an extension may only add steps from 6 on"),
        ((), ("train.episodes=10", "eval_steps=[4]"), r"add 6 \(the run's end\)"),
        ((), ("train.episodes=10", "eval_steps=[4, 6]", "train.inner_lr=0.5"), "train.inner_lr: 0.1"),
        (("log_every=4",), ("train.episodes=8", "eval_steps=[4, 6]", "log_every=4"), "not a multiple of log_every=4"),
    ],
)
def test_extend_refuses_what_would_not_equal_a_longer_run(tmp_path, synthetic_pools, first, then, message):
    path, _ = execute(tiny_config(tmp_path, "meta", "run", *first))
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}
    with pytest.raises(MetaclError, match=message):
        execute(tiny_config(tmp_path, "meta", "run", *then), "extend")
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()} == before  # untouched


def test_extend_needs_a_run_and_an_algorithm_whose_length_only_counts_steps(tmp_path, synthetic_pools):
    with pytest.raises(MetaclError, match="not a run directory; start the run without --extend"):
        execute(tiny_config(tmp_path, "meta", "absent", "eval_steps=[4, 6]"), "extend")
    execute(tiny_config(tmp_path, "iid", "iid"))
    with pytest.raises(ConfigError, match="'iid' cannot be extended: its length shapes the whole run"):
        execute(tiny_config(tmp_path, "iid", "iid", "train.max_steps=8", "eval_steps=[4, 6]"), "extend")


def test_eval_steps_run_the_meta_test_protocol_and_report_reads_the_run(tmp_path, synthetic_pools):
    from metacl.meta.eval.report import write_report

    path, _ = execute(tiny_config(tmp_path, "meta", "mt", "eval_steps=[2, 6]"))
    results = pd.read_parquet(path / "meta_test.parquet")
    # val holds 2 classes, so its class counts cap at 2; test sweeps both counts
    counts = results.groupby(["step", "split"])["classes"].unique().map(sorted).to_dict()
    assert counts == {(2, "test"): [2, 4], (2, "val"): [2], (6, "test"): [2, 4], (6, "val"): [2]}
    assert set(results["model"]) == {"convnet@step-2", "convnet@step-6"}
    final = results[(results["classes_trained"] == results["classes"]) & (results["classes"] == 4)]
    assert len(final) == 2 * 2 * 2 * 4  # steps x lrs x runs x classes
    assert final["test_acc"].between(0, 1).all()
    # the in-training meta-test is `metacl meta eval`'s: the same numbers from the saved step model
    from metacl.meta.eval import meta_test_model

    config = load_experiment_config(path / "config.yaml")
    test_pool = meta_experiment.load_test_pool(config, torch.device("cpu"))
    again = meta_test_model(
        load_model(path / "models" / "step-6.pt"),
        config.meta_test.protocol,
        test_pool,
        seed=config.seed,
        split="test",
        model_name="convnet@step-6",
    )
    at_6 = results[(results["step"] == 6) & (results["split"] == "test")].drop(columns="step")
    pd.testing.assert_frame_equal(at_6.reset_index(drop=True), again, check_dtype=False)
    files = write_report([path], tmp_path / "report")
    selection = pd.read_csv(files["selection"])
    assert set(selection["model"]) == {"convnet@step-2", "convnet@step-6"}
    assert set(selection["selection"]) == {"validation", "best-on-test"}


def test_bad_configs_are_reported(tmp_path, synthetic_pools):
    with pytest.raises(ConfigError, match="parameter prefix 'rln'"):
        execute(tiny_config(tmp_path, "meta", "a", "train.inner_params=[rln]"))
    with pytest.raises(ConfigError, match="num_classes >= 6"):
        execute(tiny_config(tmp_path, "meta", "b", "model.num_classes=5"))
    with pytest.raises(ConfigError, match="image_size"):
        execute(tiny_config(tmp_path, "iid", "c", "model={name: anml, num_classes: 8}"))
    with pytest.raises(ConfigError, match="algorithm"):
        tiny_config(tmp_path, "maml", "d")
    with pytest.raises(ConfigError, match="valid splits are val and test"):
        tiny_config(tmp_path, "meta", "e", "meta_test.splits=[train]")
    with pytest.raises(ConfigError, match="data.val_classes is 0"):
        tiny_config(tmp_path, "meta", "f", "data.val_classes=0")


@pytest.mark.parametrize(
    "path",
    sorted({*(ROOT / "configs" / "meta").glob("*.yaml"), *(ROOT / "configs" / "meta").glob("laptop/*.yaml")}),
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_shipped_configs_load(path):
    config = load_experiment_config(path)
    assert config.experiment == "meta-train"
    model = build_model(config.model)  # builds (no forward), so the spec is valid
    assert isinstance(model.fc, torch.nn.Linear)


# ------------------------------------------------------------------ a new algorithm is one file
@dataclasses.dataclass
class ToySGDConfig:
    steps: int = 5
    """Minibatch steps."""
    lr: float = 0.05
    """SGD learning rate."""


@register_algorithm("toy-sgd")
class ToySGD:
    """A test-only algorithm: plain SGD on random minibatches, to prove the contract is enough."""

    Config = ToySGDConfig

    def __init__(self, model, pool, config, streams, augment):
        self.model, self.pool, self.config, self.streams = model, pool, config, streams
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
        self.steps, self.trial_params, self.trial_lr = config.steps, ["fc.weight"], 0.1

    def step(self, step):
        classes = torch.randint(self.pool.shape[0], (4,), generator=self.streams["sample"])
        loss = F.cross_entropy(self.model(self.pool[classes, 0]), classes)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])


def test_a_registered_algorithm_runs_resumes_and_is_described(tmp_path, synthetic_pools, capsys):
    from metacl.cli import main

    assert {"meta", "sequential_episodic", "iid", "toy-sgd"} <= set(available_algorithms())
    overrides = [
        f"out_dir={tmp_path}",
        "quiet=true",
        "tracking.backends=[]",
        f"model={TINY_CONVNET}",
        "algorithm=toy-sgd",
        "train.steps=4",
        "train.lr=0.1",
        "log_every=1",
        "eval.every=0",
    ]
    path, final = execute(load_experiment_config(None, [*overrides, "name=toy"], "meta-train"))
    assert pd.read_parquet(path / "train.parquet")["step"].tolist() == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="unknown key 'train.episodes'; valid keys under 'train': steps, lr"):
        load_experiment_config(None, [*overrides, "train.episodes=3"], "meta-train")
    with pytest.raises(ConfigError, match="unknown algorithm 'nope'; valid choices: .*toy-sgd"):
        load_experiment_config(None, [*overrides, "algorithm=nope"], "meta-train")
    assert main(["config", "describe", "meta-train", "algorithm=toy-sgd"]) == 0
    out = capsys.readouterr().out
    assert "train.lr: float = 0.05\n    SGD learning rate." in out and "train.episodes" not in out


def test_old_iid_configs_with_an_iid_section_still_load():
    config = load_experiment_config(
        None, ["algorithm=iid", "iid.max_steps=7", "train.episodes=3", "data.val_classes=0"], "meta-train"
    )
    assert config.train.max_steps == 7 and not hasattr(config, "iid")


def test_one_random_zap_is_the_references_uniform_zap():
    """With sample_method uniform the reference zapped one random class, not the trajectory's."""
    model = tiny_model()
    episode = EpisodeSampler(
        pool(), torch.Generator().manual_seed(0), sample_method="uniform", num_batches=6, remember_size=2
    ).sample()
    assert len(episode.inner_classes) > 1
    before = model.fc.weight.detach().clone()
    trainer(Meta, model, ["fc.weight", "fc.bias"], ["rln.0.0.weight"], zap_seed=5, zap_rows="one_random").train_episode(
        episode
    )
    changed = (model.fc.weight != before).any(1).nonzero().flatten().tolist()
    expected = torch.randint(6, (1,), generator=torch.Generator().manual_seed(5)).tolist()
    assert changed == expected


def test_images_per_class_trains_on_the_first_drawings(tmp_path, monkeypatch):
    import metacl.meta.data as meta_data

    class Data:
        images = torch.arange(8 * 10, dtype=torch.float32).view(8, 10, 1, 1, 1).expand(8, 10, 1, 8, 8).clone()

    monkeypatch.setattr(meta_data, "load_dataset", lambda *args, **kwargs: Data())
    config = load_experiment_config(None, ["data.images_per_class=6", f"model={TINY_CONVNET}"], "meta-train")
    train, val = meta_experiment.load_pools(config, torch.device("cpu"))
    assert train.shape[:2] == (8, 6) and val is None
    assert torch.equal(train[:, :, 0, 0, 0], Data.images[:, :6, 0, 0, 0])
    with pytest.raises(ConfigError, match="exceeds the 10 drawings"):
        meta_experiment.load_pools(
            load_experiment_config(None, ["data.images_per_class=11", f"model={TINY_CONVNET}"], "meta-train"),
            torch.device("cpu"),
        )
    load_experiment_config(ROOT / "configs" / "meta" / "sanml_iid.yaml")  # the reference baseline validates
