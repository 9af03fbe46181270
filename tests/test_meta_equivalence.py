"""metacl's optimized meta-training episode against a deliberately naive, independent one.

metacl's episode (the registered `meta` / `sequential_episodic` algorithms, through
`metacl.meta.train.functional`) reuses the NM mask or the encoder output across inner steps when
the inner loop cannot change them, slices batches through `Episode.inner_batches`, and runs the
model in stages. The naive episodes below share none of that: every inner step is
a plain forward of the WHOLE model (`torch.func.functional_call(model, fast, x)`, the NM mask
recomputed each time), explicit SGD on a dict of tensors, batches sliced by hand, and the
meta-loss on the meta batch, all differentiated by `torch.autograd.grad`:

meta                 (second order) fast = {n: p - lr * g} with g from autograd.grad(...,
                     create_graph=True) for the inner parameters, the others unchanged; the
                     meta-gradient is taken w.r.t. the ORIGINAL (pre-episode) outer parameters.
sequential_episodic  (first order) plain SGD, no graph, through the trajectory on the inner
                     parameters; the meta-gradient is taken at the weights SGD reached, w.r.t.
                     the outer parameters there (metacl keeps those weights and takes its Adam
                     step from them; inner gradients never reach the Adam step).

Zapping is in scope: the naive side re-implements it (kaiming-normal rows drawn as
`randn(k, fan_in) * sqrt(2 / fan_in)` from a generator with the same state as metacl's, for the
sorted distinct classes of the trajectory), and the tests require the zapped weights metacl's
Adam step starts from to be bit-identical to the naive ones.

metacl's side is a real training step: the algorithm is built as a meta-training run builds it
(`algorithm_class(name)(model, pool, config.train, streams)`, the config one of the shipped
`configs/meta/*.yaml`) and its `step()` draws its own episode; the naive side draws the same
episode from a sampler whose generator has the same state. Adam's `step` is wrapped so that the
gradient it is about to apply (`.grad` after the no-op clipping of `max_grad_norm: 0`) and the
weights it is about to move are recorded, and the set of parameters it updates must be the
naive side's outer parameters. Everything runs in float64. Meta-loss, inner loss
and every parameter's meta-gradient must agree to a relative error below 1e-10
(||g_metacl - g_naive|| <= 1e-10 * ||g_naive||). The biases of convolutions followed by an
InstanceNorm (ANML's and SANML's RLN and NM blocks) have an exactly zero true gradient (the norm
subtracts every per-channel constant), so what both sides compute for them is pure rounding:
they are compared with an absolute tolerance of 1e-10 times the norm of the whole meta-gradient.

The default (CI) variants use reduced widths and small images; `slow` ones use the paper's
sizes (20 single-image inner steps, 64 remember images, full channels, 1000 output rows).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metacl.core.experiment import load_experiment_config
from metacl.meta.train.algorithms import algorithm_class
from metacl.meta.train.episodes import EpisodeSampler
from metacl.models import build_model

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-10
DTYPE = torch.float64


# ----------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    config: str
    """A shipped meta-training config (configs/meta/...): algorithm, parameters, learning rates."""
    model: dict = field(default_factory=dict)
    """Overrides of the config's model spec (reduced widths for the CI variants)."""
    train: dict = field(default_factory=dict)
    """Overrides of the config's `train` section (episode sizes)."""
    pool: tuple[int, int] = (12, 20)
    """(classes, images per class) of the random image pool episodes are drawn from."""


REDUCED_ANML = {"rln_channels": 8, "nm_channels": 8, "num_classes": 12, "image_size": 22}
REDUCED_SANML = {"rln_channels": 8, "num_classes": 12, "image_size": 22}
REDUCED_OML = {"channels": 8, "hidden": 32, "num_classes": 12, "image_size": 28, "strides": [2, 1, 2, 1]}

# reduced widths, but the configs' episodes: 20 single-image steps, a meta batch of 20 + 64 images
FAST_CASES = {
    "anml-meta": Case("anml.yaml", REDUCED_ANML),
    "oml-meta": Case("oml.yaml", REDUCED_OML),
    "sanml-meta": Case("sanml.yaml", REDUCED_SANML),
    "sanml-sequential": Case("sanml_sequential_episodic.yaml", REDUCED_SANML),
    # metacl's shared-mask and shared-encoder paths under the first-order algorithm
    "anml-sequential": Case("anml.yaml", REDUCED_ANML, {"algorithm": "sequential_episodic"}),
    "oml-sequential": Case("oml.yaml", REDUCED_OML, {"algorithm": "sequential_episodic"}),
    # meta batch without the trajectory, 2-image steps over several classes, two passes
    "anml-meta-remember-only": Case(
        "anml.yaml",
        REDUCED_ANML,
        {
            "num_batches": 3,
            "remember_size": 10,
            "batch_size": 2,
            "sample_method": "uniform",
            "train_cycles": 2,
            "remember_only": True,
        },
    ),
}
PAPER_POOL = (40, 20)  # labels index the 1000 output rows; 40 classes of 20 images suffice
SLOW_CASES = {
    "anml-meta-paper": Case("anml.yaml", pool=PAPER_POOL),
    "oml-meta-paper": Case("oml.yaml", pool=PAPER_POOL),
    "sanml-meta-paper": Case("sanml.yaml", pool=PAPER_POOL),
    "sanml-sequential-paper": Case("sanml_sequential_episodic.yaml", pool=PAPER_POOL),
}


@dataclass
class Setup:
    algorithm: str
    """The registered algorithm's name (`meta` or `sequential_episodic`)."""
    spec: dict
    """The model's registry spec."""
    train: object
    """The algorithm's validated `train:` section (an EpisodeConfig), with the case's overrides."""
    image_size: int


def resolve(case: Case) -> Setup:
    config = load_experiment_config(ROOT / "configs" / "meta" / case.config)
    overrides = {k: v for k, v in case.train.items() if k != "algorithm"}
    algorithm = case.train.get("algorithm", config.algorithm)
    train = algorithm_class(algorithm).Config(**{**dataclasses.asdict(config.train), **overrides})
    assert train.max_grad_norm == 0  # no clipping: .grad is the raw meta-gradient
    spec = {**config.model, **case.model}
    return Setup(algorithm, spec, train, spec.get("image_size", config.data.image_size))


def image_pool(setup: Setup, case: Case, seed: int = 0) -> torch.Tensor:
    classes, per_class = case.pool
    return torch.rand(
        classes,
        per_class,
        1,
        setup.image_size,
        setup.image_size,
        generator=torch.Generator().manual_seed(seed),
        dtype=DTYPE,
    )


def build(setup: Setup, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(setup.spec).to(DTYPE)


def draw_episode(setup: Setup, pool: torch.Tensor, sample_generator: torch.Generator):
    """The episode a sampler with `sample_generator`'s state draws (that generator untouched)."""
    generator = torch.Generator()
    generator.set_state(sample_generator.get_state())
    train = setup.train
    return EpisodeSampler(
        pool,
        generator,
        sample_method=train.sample_method,
        batch_size=train.batch_size,
        num_batches=train.num_batches,
        remember_size=train.remember_size,
        remember_only=train.remember_only,
    ).sample()


# -------------------------------------------------------------------------- the naive episodes
def naive_names(model: nn.Module, prefixes: list[str]) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    if "all" in prefixes:
        return names
    return [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]


def naive_zap(model: nn.Module, episode, generator: torch.Generator) -> None:
    """Kaiming-normal (fan-in) rows for the trajectory's classes, drawn in ascending class order."""
    weight = dict(model.named_parameters())["fc.weight"]
    classes = sorted(set(episode.labels[: episode.inner_size].tolist()))
    fan_in = weight.shape[1]
    fresh = torch.randn(len(classes), fan_in, generator=generator) * math.sqrt(2.0 / fan_in)
    with torch.no_grad():
        for row, values in zip(classes, fresh):
            weight[row] = values.to(weight.dtype)


def naive_batches(episode, cycles: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for _ in range(cycles):
        for start in range(0, episode.inner_size, episode.batch_size):
            stop = start + episode.batch_size
            batches.append((episode.images[start:stop], episode.labels[start:stop]))
    return batches


def naive_meta_batch(episode) -> tuple[torch.Tensor, torch.Tensor]:
    start = episode.inner_size if episode.remember_only else 0
    return episode.images[start:], episode.labels[start:]


def naive_meta(model, inner, outer, episode, lr, cycles):
    """Second order: whole-model forwards, SGD on a dict with create_graph, grad at the start."""
    params = dict(model.named_parameters())
    fast = dict(params)
    inner_losses = []
    for x, y in naive_batches(episode, cycles):
        loss = F.cross_entropy(functional_call(model, fast, (x,)), y)
        grads = torch.autograd.grad(loss, [fast[n] for n in inner], create_graph=True)
        step = dict(zip(inner, grads))
        fast = {n: fast[n] - lr * step[n] if n in step else fast[n] for n in fast}
        inner_losses.append(loss.item())
    x, y = naive_meta_batch(episode)
    loss = F.cross_entropy(functional_call(model, fast, (x,)), y)
    grads = torch.autograd.grad(loss, [params[n] for n in outer])
    start = {n: p.detach().clone() for n, p in params.items()}
    return loss.item(), sum(inner_losses) / len(inner_losses), dict(zip(outer, grads)), start


def naive_sequential(model, inner, outer, episode, lr, cycles):
    """First order: SGD without a graph, then the meta-gradient at the weights it reached."""
    fast = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    inner_losses = []
    for x, y in naive_batches(episode, cycles):
        loss = F.cross_entropy(functional_call(model, fast, (x,)), y)
        grads = torch.autograd.grad(loss, [fast[n] for n in inner])
        with torch.no_grad():
            for name, grad in zip(inner, grads):
                fast[name] = (fast[name] - lr * grad).requires_grad_(True)
        inner_losses.append(loss.item())
    x, y = naive_meta_batch(episode)
    loss = F.cross_entropy(functional_call(model, fast, (x,)), y)
    grads = torch.autograd.grad(loss, [fast[n] for n in outer])
    reached = {n: p.detach().clone() for n, p in fast.items()}
    return loss.item(), sum(inner_losses) / len(inner_losses), dict(zip(outer, grads)), reached


NAIVE = {"meta": naive_meta, "sequential_episodic": naive_sequential}


# ------------------------------------------------------------------------------ metacl's side
def metacl_algorithm(model: nn.Module, setup: Setup, pool: torch.Tensor, seed: int):
    """The registered algorithm, built as a meta-training run builds it."""
    streams = {
        name: torch.Generator().manual_seed(seed + i) for i, name in enumerate(("sample", "zap", "eval", "augment"))
    }
    return algorithm_class(setup.algorithm)(model, pool, setup.train, streams), streams


def metacl_step(algorithm, model: nn.Module, step: int):
    """One real training step (it draws its own episode); returns its metrics, the gradients
    Adam is about to apply and the weights it is about to move (by name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = algorithm.optimizer
    captured = {}
    adam_step = optimizer.step

    def capture(*args, **kwargs):
        captured["grads"] = {
            names[id(p)]: p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]
        }
        captured["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return adam_step(*args, **kwargs)

    optimizer.step = capture
    try:
        stats = algorithm.step(step)
    finally:
        del optimizer.step  # the bound method of the class again
    return stats, captured["grads"], captured["weights"]


# ------------------------------------------------------------------------------- comparisons
def bias_before_instance_norm(model: nn.Module) -> set[str]:
    """Biases of convolutions directly followed by an InstanceNorm: true meta-gradient zero."""
    names = set()
    for prefix, module in model.named_modules():
        children = list(module.named_children())
        for (name, layer), (_, following) in zip(children, children[1:]):
            if isinstance(layer, nn.Conv2d) and layer.bias is not None and isinstance(following, nn.InstanceNorm2d):
                names.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return names


def relative(a: float | torch.Tensor, b: float | torch.Tensor, scale=None) -> float:
    a, b = torch.as_tensor(a, dtype=DTYPE), torch.as_tensor(b, dtype=DTYPE)
    scale = b.norm() if scale is None else torch.as_tensor(scale, dtype=DTYPE)
    return float((a - b).norm() / max(float(scale), 1e-300))


def compare(model, setup, stats, grads, weights, naive) -> dict[str, float]:
    """Assert the agreement of one episode; return the relative errors reached."""
    loss, inner_loss, naive_grads, naive_weights = naive
    assert set(grads) == set(naive_grads)
    total = torch.sqrt(sum(g.pow(2).sum() for g in naive_grads.values()))
    zero_true = bias_before_instance_norm(model)
    errors = {"meta_loss": relative(stats["meta_loss"], loss), "inner_loss": relative(stats["inner_loss"], inner_loss)}
    per_param, per_bias = {}, {}
    for name, g in grads.items():
        if name in zero_true:
            per_bias[name] = relative(g, naive_grads[name], total)
            # both sides' values are rounding noise around the exact zero
            assert float(naive_grads[name].norm()) <= TOLERANCE * float(total), name
            assert float(g.norm()) <= TOLERANCE * float(total), name
        else:
            assert float(naive_grads[name].norm()) > 0, f"{name}: a zero meta-gradient"
            per_param[name] = relative(g, naive_grads[name])
    errors["grad"] = max(per_param.values())
    errors["grad_in_bias_abs"] = max(per_bias.values(), default=0.0)
    errors["grad_total"] = relative(
        torch.cat([g.flatten() for g in grads.values()]), torch.cat([naive_grads[n].flatten() for n in grads])
    )
    # the weights Adam steps from: the zapped pre-episode weights (meta, bit-identical) or the
    # weights SGD reached (sequential_episodic: relative to how far SGD moved them)
    inner = set(naive_names(model, setup.train.inner_params))
    moved = {}
    for name, w in weights.items():
        if setup.algorithm == "meta" or name not in inner:
            assert torch.equal(w, naive_weights[name]), f"{name}: weights differ before Adam"
    if setup.algorithm == "sequential_episodic":
        start = {n: p.detach() for n, p in model.named_parameters()}
        displacement = torch.sqrt(sum((naive_weights[n] - start[n]).pow(2).sum() for n in inner))
        for name in inner:
            scale = displacement if name in zero_true else (naive_weights[name] - start[name]).norm()
            moved[name] = relative(weights[name], naive_weights[name], scale)
        errors["reached_weights"] = max(moved.values())
    bad = {k: v for k, v in {**errors, **per_param, **per_bias, **moved}.items() if not v <= TOLERANCE}
    assert not bad, f"metacl and the naive episode disagree: {bad}"
    return errors


def run_episodes(case: Case, episodes: int, seed: int = 0, naive=None) -> list[dict[str, float]]:
    """`episodes` consecutive metacl steps; before each, the naive model takes metacl's weights.
    `naive` replaces the naive episode of the case's algorithm (same signature)."""
    setup = resolve(case)
    model = build(setup, seed)
    pool = image_pool(setup, case, seed)
    algorithm, streams = metacl_algorithm(model, setup, pool, seed + 1)
    naive_model = copy.deepcopy(model)
    inner = naive_names(naive_model, setup.train.inner_params)
    outer = naive_names(naive_model, setup.train.outer_params)
    naive_generator = torch.Generator()
    results = []
    for step in range(episodes):
        episode = draw_episode(setup, pool, streams["sample"])
        naive_model.load_state_dict(model.state_dict())
        naive_generator.set_state(streams["zap"].get_state())
        if setup.train.zap:
            naive_zap(naive_model, episode, naive_generator)
        naive_episode = naive or NAIVE[setup.algorithm]
        reference = naive_episode(naive_model, inner, outer, episode, setup.train.inner_lr, setup.train.train_cycles)
        stats, grads, weights = metacl_step(algorithm, model, step)
        errors = compare(naive_model, setup, stats, grads, weights, reference)
        results.append(errors)
        print(f"{case.config} {setup.algorithm} episode {step}:", ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return results


# ----------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", list(FAST_CASES))
def test_episode_matches_the_naive_episode(name):
    run_episodes(FAST_CASES[name], 1)


@pytest.mark.parametrize("name", ["anml-meta", "oml-meta", "sanml-sequential"])
def test_consecutive_episodes_match_with_the_naive_side_reset_to_metacl(name):
    # free-running copies drift: Adam's first steps turn rounding in near-zero gradients into
    # learning-rate-sized moves, so the naive model takes metacl's weights before each episode
    results = run_episodes(FAST_CASES[name], 3, seed=3)
    assert len(results) == 3


@pytest.mark.parametrize("name", ["anml-meta", "sanml-sequential"])
def test_the_comparison_catches_a_slightly_wrong_episode(name):
    """An inner learning rate off by one part in a million on the naive side fails the test."""

    def off_by_1e_6(model, inner, outer, episode, lr, cycles):
        return NAIVE[algorithm](model, inner, outer, episode, lr * (1 + 1e-6), cycles)

    algorithm = resolve(FAST_CASES[name]).algorithm
    with pytest.raises(AssertionError, match="disagree"):
        run_episodes(FAST_CASES[name], 1, naive=off_by_1e_6)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_paper_size_episode_matches_the_naive_episode(name):
    run_episodes(SLOW_CASES[name], 1)


def test_anml_meta_gradient_matches_higher():
    """metacl's ANML meta-gradient against the `higher` library's differentiable SGD."""
    higher = pytest.importorskip("higher")

    def higher_meta(model, inner, outer, episode, lr, cycles):
        params = dict(model.named_parameters())
        optimizer = torch.optim.SGD([params[n] for n in inner], lr=lr)
        inner_losses = []
        context = higher.innerloop_ctx(model, optimizer, copy_initial_weights=False)
        with context as (fmodel, diffopt):
            for x, y in naive_batches(episode, cycles):
                loss = F.cross_entropy(fmodel(x), y)
                inner_losses.append(loss.item())
                diffopt.step(loss)
            x, y = naive_meta_batch(episode)
            loss = F.cross_entropy(fmodel(x), y)
            grads = torch.autograd.grad(loss, [params[n] for n in outer])
        start = {n: p.detach().clone() for n, p in params.items()}
        return loss.item(), sum(inner_losses) / len(inner_losses), dict(zip(outer, grads)), start

    run_episodes(FAST_CASES["anml-meta"], 1, naive=higher_meta)
