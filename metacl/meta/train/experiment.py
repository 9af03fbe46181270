"""`metacl meta train`: meta-train (ANML, OML), train sequential-episodically, or pre-train i.i.d.

Tables in the run directory:
    train.parquet   every `log_every` steps: means over the window of inner/meta loss and
                    accuracy and gradient norm (episodic), or loss/accuracy/lr (iid), and
                    the wall-clock and CPU (all threads) seconds per step
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

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch

from ...core.allocator import tune_malloc
from ...core.config import NonNegative, Positive, PositiveFloat, Range, from_dict, to_dict
from ...core.errors import ConfigError
from ...core.experiment import ExperimentConfig
from ...core.run import tensor_digest
from ...core.seeding import derive_seed, torch_generator
from ...models import build_model, save_model, select_parameters
from ...models.registry import check_model_spec
from ..eval.experiment import SPLITS, meta_test_model
from ..eval.protocol import ProtocolConfig
from ..eval.results import best_learning_rates
from .algorithms import algorithm_class
from .functional import FunctionalModel, continual_trial
from .loop import TrainingLoop


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
    images_per_class: Positive | None = None
    """Train on the first N drawings of each training class (None: all 20); the reference's i.i.d.
    baseline used 15. Validation classes keep all their drawings."""
    augment: bool = False
    """Random-resized-crop augmentation of each episode's (or batch's) images."""
    crop_scale: tuple[Annotated[float, Range(0, 1, low_open=True)], Annotated[float, Range(0, 1, low_open=True)]] = (
        0.8,
        1.0,
    )
    """Area range of the random-resized crop."""


@dataclass
class EvalConfig:
    every: NonNegative = 1000
    """Steps between continual trials on the training and validation pools (0: never)."""
    classes: Positive = 10
    """Classes learned, one after another, in each trial."""
    train_per_class: Positive = 15
    """Images per class learned (one SGD step each); the class's other images test it."""
    lr: PositiveFloat | None = None
    """Trial SGD learning rate; None uses the algorithm's (train.inner_lr, or train.trial_lr for iid)."""
    params: list[str] | None = None
    """Prefixes adapted in the trial; None uses the algorithm's (train.inner_params, fc for iid)."""


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
    algorithm: str = "meta"
    """A registered algorithm (metacl/meta/train/algorithms/): meta (second order),
    sequential_episodic (first order), iid (minibatch pre-training), or one you add."""
    model: dict[str, Any] = field(default_factory=lambda: {"name": "anml"})
    """Registry spec: {name: anml|sanml|oml|convnet|resnet18, **constructor arguments}."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: Any = field(default_factory=dict)
    """The algorithm's own settings, validated against its Config (`metacl config describe
    meta-train algorithm=NAME` lists them)."""
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

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Before algorithms had their own sections, iid's settings lived under `iid:` beside an
        unused `train:`."""
        if "iid" not in data:
            return data
        data = dict(data)
        legacy = data.pop("iid")
        if data.get("algorithm") == "iid":
            data["train"] = legacy
        return data

    def length_keys(self) -> tuple[str, ...]:
        field = getattr(algorithm_class(self.algorithm), "length_field", None)
        return () if field is None else (f"train.{field}", "eval_steps")

    def check_extension(self, stored: dict[str, Any]) -> None:
        """A longer run is the same run up to its old end when the algorithm's length only counts
        steps, the old end lies on the log (and eval) grid, and no eval step before it changes."""
        field = getattr(algorithm_class(self.algorithm), "length_field", None)
        if field is None:
            raise ConfigError(
                f"algorithm {self.algorithm!r} cannot be extended: its length shapes the whole run "
                f"(a schedule over it); start a new run with another name="
            )
        key, before, after = f"train.{field}", int(stored["train"][field]), int(getattr(self.train, field))
        if after < before:
            raise ConfigError(f"{key}: {after} is shorter than the run's {before}; --extend only lengthens a run")
        for name, every in (("log_every", self.log_every), ("eval.every", self.eval.every)):
            if after > before and every and before % every:
                raise ConfigError(
                    f"{key}: the run ended at step {before}, which is not a multiple of {name}={every}: "
                    f"its tables hold a row there that a run of {after} steps would not; start a new run"
                )
        done = sorted(s for s in stored.get("eval_steps") or [] if s <= before)
        now = sorted(s for s in self.eval_steps if s < before)
        if now != [s for s in done if s < before]:
            raise ConfigError(
                f"eval_steps: an extension may only add steps from {before} on (the run's end) to the stored {done}"
            )
        if after > before and before not in self.eval_steps:
            raise ConfigError(
                f"eval_steps: add {before} (the run's end) so that its final model is kept as "
                f"models/step-{before}.pt; model.pt will hold the model at step {after}"
            )

    def __post_init__(self) -> None:
        settings = algorithm_class(self.algorithm).Config
        if not isinstance(self.train, settings):
            train = to_dict(self.train) if dataclasses.is_dataclass(self.train) else self.train
            self.train = from_dict(settings, train or {}, "train.")
        check_model_spec(self.model)
        unknown = set(self.meta_test.splits) - set(SPLITS)
        if unknown:
            raise ConfigError(f"meta_test.splits has {sorted(unknown)}: valid splits are {' and '.join(SPLITS)}")
        if "val" in self.meta_test.splits and not self.data.val_classes:
            raise ConfigError(
                "meta_test.splits includes val, but data.val_classes is 0: hold out "
                "validation classes (e.g. data.val_classes=100) or drop val"
            )


def load_pools(config: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training and (optional) validation class images, resident on `device`."""
    from ..data import load_dataset, split_classes

    data = load_dataset(
        config.data.dataset,
        config.data.split,
        size=config.data.image_size,
        data_dir=config.data_dir,
        device=device,
        first_963=config.data.first_963,
        quiet=config.quiet,
    )
    train, val = (
        (data, None) if config.data.val_classes <= 0 else split_classes(data, config.data.val_classes, config.seed)
    )
    images = train.images
    keep = config.data.images_per_class
    if keep is not None:
        if keep > images.shape[1]:
            raise ConfigError(f"data.images_per_class {keep} exceeds the {images.shape[1]} drawings per class")
        images = images[:, :keep]
    return images, None if val is None else val.images


def load_test_pool(config: Config, device: torch.device) -> torch.Tensor:
    """The meta-test classes' images (`meta_test.test_split`), resident on `device`."""
    from ..data import load_dataset

    return load_dataset(
        config.data.dataset,
        config.meta_test.test_split,
        size=config.data.image_size,
        data_dir=config.data_dir,
        device=device,
        quiet=config.quiet,
    ).images


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
        raise ConfigError(
            f"model {config.model.get('name')!r} has no nn.Linear named fc; "
            f"meta-training zaps the rows of its output layer `fc`"
        )
    if fc.out_features < num_classes:
        raise ConfigError(
            f"model has {fc.out_features} outputs but the training pool has "
            f"{num_classes} classes; set model.num_classes >= {num_classes}"
        )
    return model.to(device)


def check_input(model: torch.nn.Module, images: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            model(images[:1, 0])
    except (RuntimeError, ValueError) as error:
        raise ConfigError(
            f"model cannot read images of shape {tuple(images.shape[2:])}: {error}; "
            f"set model.image_size / in_channels to match data.image_size"
        ) from None


def run(config: Config, run) -> dict:
    device = run.device
    train_images, val_images = load_pools(config, device)
    run.check_data(
        {
            "dataset": config.data.dataset,
            "split": config.data.split,
            "train_pool": list(train_images.shape),
            "content": tensor_digest(train_images, *(() if val_images is None else (val_images,))),
        }
    )
    if device.type == "cpu":  # after loading: the data's own temporaries go back to the OS
        run.log.info("allocator: %s", tune_malloc(huge_pages=True).detail)
    model = build(config, train_images.shape[0], device)
    check_input(model, train_images)
    streams = {name: torch_generator(config.seed, name) for name in ("sample", "zap", "eval", "augment")}
    algorithm = algorithm_class(config.algorithm)(
        model, train_images, config.train, streams, augmenter(config, streams["augment"])
    )
    trial_params = list(select_parameters(model, config.eval.params)) if config.eval.params else algorithm.trial_params
    trial_lr = config.eval.lr if config.eval.lr is not None else algorithm.trial_lr

    def evaluate(step: int) -> None:
        fmodel = FunctionalModel(model, trial_params)
        params = dict(model.named_parameters())
        was_training = model.training
        model.eval()
        for pool_name, pool in (("train", train_images), ("val", val_images)):
            if pool is None:
                continue
            n = min(config.eval.classes, pool.shape[0])
            classes = torch.randperm(pool.shape[0], generator=streams["eval"])[:n]
            acc = continual_trial(
                fmodel,
                params,
                trial_params,
                pool[classes.to(pool.device)],
                trial_lr,
                config.eval.train_per_class,
                streams["eval"],
            )
            run.table("eval").append({"step": step, "pool": pool_name, "classes": n, "accuracy": acc})
            run.tracker.log({f"meta_train/{pool_name}_trial_acc": acc}, step)
        model.train(was_training)

    test_pool = functools.cache(lambda: load_test_pool(config, device))  # loaded at the first meta-test

    def meta_test(step: int) -> None:
        for split in config.meta_test.splits:
            images = val_images if split == "val" else test_pool()
            frame = meta_test_model(
                model,
                config.meta_test.protocol,
                images,
                seed=config.seed,
                split=split,
                model_name=f"{config.model.get('name')}@step-{step}",
                dataset=config.data.dataset,
                log=run.log.info,
            )
            run.table("meta_test").append(frame.assign(step=step).to_dict("records"))
            for best in best_learning_rates(frame).itertuples():
                run.tracker.log({f"meta_test/{split}_{best.classes}_classes_best_lr_acc": float(best.test_acc)}, step)
                run.log.info(
                    "meta-test at step %d, %s split, %d classes: held-out image accuracy %.4f at its best LR %g",
                    step,
                    split,
                    best.classes,
                    best.test_acc,
                    best.lr,
                )

    def save(path, step: int) -> None:
        save_model(model, path, step=step, data=training_data_record(config))

    loop = TrainingLoop(model, algorithm, streams, run, config, evaluate=evaluate, meta_test=meta_test, save_model=save)
    state = run.load_checkpoint()
    if state is not None:
        loop.restore(state)
    return loop.train()


def training_data_record(config: Config) -> dict[str, Any]:
    """What `metacl meta eval` needs to rebuild this run's validation split from a saved model."""
    from ...core.paths import data_dir

    return {
        "dataset": config.data.dataset,
        "split": config.data.split,
        "image_size": config.data.image_size,
        "val_classes": config.data.val_classes,
        "split_seed": config.seed,
        "first_963": config.data.first_963,
        "data_dir": str(data_dir(config.data_dir).resolve()),
    }
