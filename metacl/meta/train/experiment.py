"""`metacl meta train`: meta-train (ANML, OML), train sequential-episodically, or pre-train i.i.d.

Tables in the run directory:
    train.parquet   every `log_every` steps: means over the window of inner/meta loss and
                    accuracy and gradient norm (episodic), or loss/accuracy/lr (iid)
    eval.parquet    every `eval_every` steps: continual-trial accuracy on the training pool and
                    on the held-out validation pool
    meta_test.parquet  at each of `eval_steps`, when `meta_test.splits` is set: the meta-test
                    protocol's tidy results (as `metacl meta eval` writes them) plus `step`;
                    `metacl meta report RUN_DIR` reads it, one model per step
Models: `model.pt` at the end and `models/step-<n>.pt` at each of `eval_steps` (registry
checkpoints: state dict + model spec), plus `checkpoints/last.pt` (model, optimiser and RNG
state) every `checkpoint_every` steps, so `--resume` continues exactly.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch

from ...core.config import (NonEmpty, NonNegative, NonNegativeFloat, Positive, PositiveFloat,
                            Range)
from ...core.errors import ConfigError, RunDiverged, RunInterrupted
from ...core.experiment import ExperimentConfig
from ...core.progress import progress
from ...core.run import tensor_digest
from ...core.seeding import derive_seed, generator_state, set_generator_state, torch_generator
from ...models import build_model, save_model, select_parameters
from ...models.registry import check_model_spec
from ..eval.experiment import SPLITS, evaluate_checkpoint
from ..eval.protocol import ProtocolConfig
from ..eval.report import best_learning_rates
from .algorithms import Algorithm, EpisodicTrainer, IIDTrainer
from .episodes import EpisodeSampler, SampleMethod
from .functional import FunctionalModel, continual_trial, zap_rows


@dataclass
class DataConfig:
    dataset: Literal["omniglot", "folder"] = "omniglot"
    """Dataset name for metacl.meta.data.load_dataset."""
    split: str = "background"
    """Split to train on (Omniglot: background; evaluation is for meta-testing)."""
    image_size: Positive = 28
    """Image side in pixels (28 for ANML/SANML, 84 for OML)."""
    first_963: bool = False
    """Use the first 963 background classes, as the original ANML and OML did."""
    val_classes: NonNegative = 0
    """Classes held out of training as a validation pool (0: none)."""
    augment: bool = False
    """Random-resized-crop augmentation of each episode's (or batch's) images."""
    crop_scale: tuple[Annotated[float, Range(0, 1, low_open=True)], Annotated[float, Range(0, 1, low_open=True)]] = (0.8, 1.0)
    """Area range of the random-resized crop."""


@dataclass
class EpisodeConfig:
    episodes: Positive = 25000
    """Number of episodes (meta, sequential_episodic)."""
    sample_method: SampleMethod = "single"
    """single: every inner image from one random class; uniform: from random training images."""
    batch_size: Positive = 1
    """Images per inner-loop step."""
    num_batches: Positive = 20
    """Inner-loop steps per pass through the trajectory."""
    train_cycles: Positive = 1
    """Passes through the trajectory (inner steps = num_batches * train_cycles)."""
    remember_size: NonNegative = 64
    """Random training images added to the meta batch."""
    remember_only: bool = False
    """Leave the trajectory's images out of the meta batch."""
    inner_lr: PositiveFloat = 0.1
    """Inner-loop SGD learning rate."""
    outer_lr: PositiveFloat = 1e-3
    """Outer-loop Adam learning rate."""
    inner_params: Annotated[list[str], NonEmpty()] = field(default_factory=lambda: ["all"])
    """Parameter-name prefixes adapted in the inner loop (all = every parameter)."""
    outer_params: Annotated[list[str], NonEmpty()] = field(default_factory=lambda: ["all"])
    """Parameter-name prefixes the outer Adam step updates."""
    zap: bool = True
    """Re-initialise (kaiming-normal) the output rows of the episode's classes first."""
    max_grad_norm: NonNegativeFloat = 0.0
    """Clip the outer gradient to this norm (0: no clipping)."""


@dataclass
class IIDConfig:
    max_steps: Positive = 10000
    """Minibatch steps."""
    batch_size: Positive = 256
    """Images per minibatch."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """Optimiser."""
    lr: PositiveFloat = 1e-3
    """Base learning rate."""
    momentum: Annotated[float, Range(0, 1, high_open=True)] = 0.9
    """SGD momentum."""
    weight_decay: NonNegativeFloat = 0.0
    """L2 weight decay."""
    schedule: Literal["constant", "step", "cosine"] = "constant"
    """Learning-rate schedule over max_steps."""
    step_size: Positive = 1000
    """Steps between decays of the step schedule."""
    gamma: PositiveFloat = 0.1
    """Decay factor of the step schedule."""
    max_grad_norm: NonNegativeFloat = 0.0
    """Clip the gradient to this norm (0: no clipping)."""
    zap_every: NonNegative = 0
    """Zap `zap_size` random output rows every this many steps (0: never)."""
    zap_size: NonNegative = 0
    """Output rows zapped each time."""


@dataclass
class EvalConfig:
    every: NonNegative = 1000
    """Steps between continual trials on the training and validation pools (0: never)."""
    classes: Positive = 10
    """Classes learned, one after another, in each trial."""
    train_per_class: Positive = 15
    """Images per class learned (one SGD step each); the class's other images test it."""
    lr: PositiveFloat | None = None
    """Trial SGD learning rate; None uses train.inner_lr."""
    params: list[str] | None = None
    """Prefixes adapted in the trial; None uses train.inner_params (fc for iid)."""


@dataclass
class MetaTestConfig:
    """The meta-test (`metacl meta eval`'s protocol) run on the model at each of `eval_steps`."""

    splits: list[str] = field(default_factory=list)
    """Class pools to meta-test: val (the held-out meta-training classes, needs data.val_classes)
    and/or test (`test_split` of the dataset); [] runs no meta-test (the model is still saved)."""
    test_split: str = "evaluation"
    """Dataset split of the test pool (never trained on)."""
    protocol: ProtocolConfig = field(default_factory=lambda: ProtocolConfig(classes=[10, 50], runs=3))
    """Protocol and sweep; smaller than the full reference sweep, which `metacl meta eval` runs."""


@dataclass
class Config(ExperimentConfig):
    experiment: str = "meta-train"
    """Which experiment this config runs."""
    algorithm: Algorithm = "meta"
    """meta (second order), sequential_episodic (first order), or iid pre-training."""
    model: dict[str, Any] = field(default_factory=lambda: {"name": "anml"})
    """Registry spec: {name: anml|sanml|oml|convnet|resnet18, **constructor arguments}."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: EpisodeConfig = field(default_factory=EpisodeConfig)
    """Episodes and optimisers of meta and sequential_episodic."""
    iid: IIDConfig = field(default_factory=IIDConfig)
    """Minibatch pre-training (algorithm iid)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic accuracy on the training and validation pools."""
    log_every: Positive = 10
    """Steps (episodes or minibatches) per row of the train table."""
    checkpoint_every: Positive = 500
    """Steps between resumable checkpoints."""
    eval_steps: list[Positive] = field(default_factory=list)
    """Steps at which the model is saved as models/step-<n>.pt (and checkpointed) and meta-tested."""
    meta_test: MetaTestConfig = field(default_factory=MetaTestConfig)
    """The meta-test run at each of `eval_steps`."""

    def __post_init__(self) -> None:
        check_model_spec(self.model)
        unknown = set(self.meta_test.splits) - set(SPLITS)
        if unknown:
            raise ConfigError(f"meta_test.splits has {sorted(unknown)}: valid splits are {' and '.join(SPLITS)}")
        if "val" in self.meta_test.splits and not self.data.val_classes:
            raise ConfigError("meta_test.splits includes val, but data.val_classes is 0: hold out "
                              "validation classes (e.g. data.val_classes=100) or drop val")


def load_pools(config: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training and (optional) validation class images, resident on `device`."""
    from ..data import load_dataset, split_classes
    data = load_dataset(config.data.dataset, config.data.split, size=config.data.image_size,
                        data_dir=config.data_dir, device=device, first_963=config.data.first_963,
                        quiet=config.quiet)
    if config.data.val_classes <= 0:
        return data.images, None
    train, val = split_classes(data, config.data.val_classes, config.seed)
    return train.images, val.images


def load_test_pool(config: Config, device: torch.device) -> torch.Tensor:
    """The meta-test classes' images (`meta_test.test_split`), resident on `device`."""
    from ..data import load_dataset
    return load_dataset(config.data.dataset, config.meta_test.test_split, size=config.data.image_size,
                        data_dir=config.data_dir, device=device, quiet=config.quiet).images


def augmenter(config: Config, generator: torch.Generator):
    """A function that augments a batch of images (identity when augmentation is off)."""
    if not config.data.augment:
        return lambda images: images
    from ..data import random_resized_crop
    return lambda images: random_resized_crop(images, generator, config.data.crop_scale)


def build(config: Config, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The model, initialised from its own seeded stream and checked against the data."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "model-init"))
        try:
            model = build_model(config.model)
        except (RuntimeError, ValueError) as error:  # e.g. an image too small for the conv stack
            raise ConfigError(f"model {config.model}: {error}") from None
    fc = getattr(model, "fc", None)
    if not isinstance(fc, torch.nn.Linear):
        raise ConfigError(f"model {config.model.get('name')!r} has no nn.Linear named fc; "
                          f"meta-training zaps the rows of its output layer `fc`")
    if fc.out_features < num_classes:
        raise ConfigError(f"model has {fc.out_features} outputs but the training pool has "
                          f"{num_classes} classes; set model.num_classes >= {num_classes}")
    return model.to(device)


def check_input(model: torch.nn.Module, images: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            model(images[:1, 0])
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"model cannot read images of shape {tuple(images.shape[2:])}: {error}; "
                          f"set model.image_size / in_channels to match data.image_size") from None


def run(config: Config, run) -> dict:
    device = run.device
    train_images, val_images = load_pools(config, device)
    run.check_data({"dataset": config.data.dataset, "split": config.data.split,
                    "train_pool": list(train_images.shape), "content": tensor_digest(
                        train_images, *(() if val_images is None else (val_images,)))})
    num_classes, per_class = train_images.shape[:2]
    model = build(config, num_classes, device)
    check_input(model, train_images)
    episodic = config.algorithm != "iid"
    streams = {name: torch_generator(config.seed, name)
               for name in ("sample", "zap", "eval", "augment")}
    augment = augmenter(config, streams["augment"])
    if episodic:
        inner = list(select_parameters(model, config.train.inner_params))
        outer = list(select_parameters(model, config.train.outer_params))
        trainer = EpisodicTrainer(model, config.algorithm, inner, outer,
                                  inner_lr=config.train.inner_lr, outer_lr=config.train.outer_lr,
                                  train_cycles=config.train.train_cycles, zap=config.train.zap,
                                  max_grad_norm=config.train.max_grad_norm)
        sampler = EpisodeSampler(train_images, streams["sample"],
                                 sample_method=config.train.sample_method,
                                 batch_size=config.train.batch_size,
                                 num_batches=config.train.num_batches,
                                 remember_size=config.train.remember_size,
                                 remember_only=config.train.remember_only)
        total = config.train.episodes
    else:
        inner = ["fc.weight", "fc.bias"] if model.fc.bias is not None else ["fc.weight"]
        trainer = IIDTrainer(model, list(dict(model.named_parameters())), **{
            k: getattr(config.iid, k) for k in ("optimizer", "lr", "momentum", "weight_decay",
                                                "schedule", "max_steps", "step_size", "gamma",
                                                "max_grad_norm")})
        total = config.iid.max_steps
    trial_params = (list(select_parameters(model, config.eval.params)) if config.eval.params
                    else inner)
    trial_lr = config.eval.lr if config.eval.lr is not None else config.train.inner_lr
    flat_images = train_images.reshape(num_classes * per_class, *train_images.shape[2:])
    order = torch.empty(0, dtype=torch.long)
    window: list[dict[str, float]] = []  # metrics of the steps since the last train-table row

    step = 0
    state = run.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        for name, generator in streams.items():
            set_generator_state(generator, state["rng"][name])
        step, order, window = state["step"], state["order"], state["window"]

    def checkpoint(name: str = "last") -> None:
        rng = {name: generator_state(g) for name, g in streams.items()}
        run.save_checkpoint({"step": step, "model": model.state_dict(),
                             "optimizer": trainer.optimizer.state_dict(), "rng": rng,
                             "order": order, "window": window}, name)

    def evaluate() -> None:
        fmodel = FunctionalModel(model, trial_params)
        params = dict(model.named_parameters())
        was_training = model.training
        model.eval()
        for pool_name, pool in (("train", train_images), ("val", val_images)):
            if pool is None:
                continue
            n = min(config.eval.classes, pool.shape[0])
            classes = torch.randperm(pool.shape[0], generator=streams["eval"])[:n]
            acc = continual_trial(fmodel, params, trial_params, pool[classes.to(pool.device)],
                                  trial_lr, config.eval.train_per_class, streams["eval"])
            run.table("eval").append({"step": step, "pool": pool_name, "classes": n,
                                      "accuracy": acc})
            run.tracker.log({f"meta_train/{pool_name}_trial_acc": acc}, step)
        model.train(was_training)

    test_pool = functools.cache(lambda: load_test_pool(config, device))  # loaded at the first meta-test

    def meta_test() -> None:
        for split in config.meta_test.splits:
            images = val_images if split == "val" else test_pool()
            frame = evaluate_checkpoint(model, config.meta_test.protocol, images, seed=config.seed,
                                        split=split, model_name=f"{config.model.get('name')}@step-{step}",
                                        dataset=config.data.dataset, log=run.log.info)
            run.table("meta_test").append(frame.assign(step=step).to_dict("records"))
            for best in best_learning_rates(frame).itertuples():
                run.tracker.log({f"meta_test/{split}_{best.classes}_classes_best_lr_acc": float(best.test_acc)}, step)
                run.log.info("meta-test at step %d, %s split, %d classes: held-out image accuracy %.4f "
                             "at its best LR %g", step, split, best.classes, best.test_acc, best.lr)

    started = time.perf_counter()
    bar = progress(total=total, initial=step, desc=config.algorithm, quiet=config.quiet,
                   unit="ep" if episodic else "step")
    while step < total:
        if episodic:
            episode = sampler.sample()
            episode.images = augment(episode.images)
            metrics = trainer.step(episode, streams["zap"])
        else:
            if config.iid.zap_every and step % config.iid.zap_every == 0 and config.iid.zap_size:
                rows = torch.randperm(model.fc.out_features, generator=streams["zap"])
                zap_rows(model.fc.weight, rows[:config.iid.zap_size], streams["zap"])
            if len(order) < config.iid.batch_size:
                order = torch.cat([order, torch.randperm(len(flat_images),
                                                         generator=streams["sample"])])
            batch, order = order[:config.iid.batch_size], order[config.iid.batch_size:]
            batch = batch.to(device)
            metrics = trainer.step(augment(flat_images[batch]), batch // per_class, step)
        loss = metrics.get("meta_loss", metrics.get("loss"))
        if loss is not None and not math.isfinite(loss):
            bar.close()
            raise RunDiverged(f"the {'meta-' if episodic else ''}loss became {loss} at step {step + 1} "
                              f"(checkpoints before it are finite); lower the learning rate")
        step += 1
        bar.update()
        window.append(metrics)
        if step % config.log_every == 0 or step == total:
            row = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
            row["seconds_per_step"] = (time.perf_counter() - started) / len(window)
            run.table("train").append({"step": step, **row})
            run.tracker.log({f"meta_train/{k}": v for k, v in row.items()}, step)
            window, started = [], time.perf_counter()
        if config.eval.every and (step % config.eval.every == 0 or step == total):
            evaluate()
        if step in config.eval_steps:
            save_model(model, run.path / "models" / f"step-{step}.pt", step=step)
            meta_test()
            checkpoint(f"step-{step}")
        if step % config.checkpoint_every == 0 or step == total or run.stop_requested:
            checkpoint()
            if run.stop_requested and step < total:
                bar.close()
                raise RunInterrupted(f"stopped at step {step}; resume with --resume")
    bar.close()
    save_model(model, run.path / "model.pt", step=step)
    run.flush()
    final = run.table("train").frame().iloc[-1].to_dict()
    if "eval" in run.tables and len(run.tables["eval"]):
        evals = run.tables["eval"].frame()
        for pool_name in ("train", "val"):
            rows = evals[evals["pool"] == pool_name]
            if len(rows):
                final[f"{pool_name}_trial_acc"] = float(rows["accuracy"].iloc[-1])
    return {k: float(v) for k, v in final.items()}
