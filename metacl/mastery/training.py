"""One pass of training trials, the held-out test, the model and its optimiser."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, RunDiverged, RunInterrupted
from ..core.seeding import derive_seed
from ..models import build_model
from ..models.mastery import NUM_QUERIES
from . import data as scene_data
from .config import Config


def one_hot(tasks: torch.Tensor) -> torch.Tensor:
    return F.one_hot(tasks, NUM_QUERIES).float()


def train_trials(
    model,
    optimizer,
    data: scene_data.SceneTensors,
    images: torch.Tensor,
    task_ids: torch.Tensor,
    tasks: list[int],
    batch_size: int,
    run,
    test_every: int | None = None,
    on_test=None,
) -> dict:
    """One pass over (image, task) trials; returns each task's mean train loss and accuracy.

    With `test_every`, `on_test(trials_done, task_trials)` is called after every batch that
    reaches or passes a multiple of `test_every` trials, except the last batch (the epoch's own
    test follows it); `task_trials` lists each task's trials so far in this pass. Testing does
    not change the training: the same weights come out with or without it."""
    device = data.device
    images, task_ids = images.to(device), task_ids.to(device)
    slot = torch.full((NUM_QUERIES,), -1, dtype=torch.long, device=device)
    slot[torch.tensor(tasks, device=device)] = torch.arange(len(tasks), device=device)
    loss_sum = torch.zeros(len(tasks), device=device)
    correct = torch.zeros(len(tasks), device=device)
    count = torch.zeros(len(tasks), device=device)
    total = images.shape[0]
    model.train()
    for start in range(0, total, batch_size):
        if run.stop_requested:
            raise RunInterrupted("stopped mid-epoch; the last epoch checkpoint is intact, resume with --resume")
        index, task = images[start : start + batch_size], task_ids[start : start + batch_size]
        target = data.labels[index, task].long()
        logits = model(data.batch(index), one_hot(task))
        losses = F.cross_entropy(logits, target, reduction="none")
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
        where = slot[task]
        loss_sum.index_add_(0, where, losses.detach())
        correct.index_add_(0, where, (logits.detach().argmax(1) == target).float())
        count.index_add_(0, where, torch.ones_like(losses))
        end = min(start + batch_size, total)
        crossed = test_every and end // test_every > start // test_every
        if on_test is not None and crossed and end < total:
            on_test(end, [int(c) for c in count.cpu().tolist()])
            model.train()
    count = count.cpu().clamp_min(1)
    return {"loss": (loss_sum.cpu() / count).tolist(), "acc": (correct.cpu() / count).tolist()}


def evaluation_rows(data: scene_data.SceneTensors, on_train_images: bool = False) -> tuple[int, int]:
    """[start, stop) rows the test pass uses: the held-out images, or with the reference's bug
    (`on_train_images`) the first num_test rows of the training range."""
    if on_train_images:
        return 0, min(data.num_test, data.num_train)
    return data.num_train, data.num_images


@torch.no_grad()
def evaluate(
    model,
    data: scene_data.SceneTensors,
    tasks: list[int],
    batch_size: int,
    *,
    on_train_images: bool = False,
    batchnorm_train: bool = False,
) -> dict:
    """Test accuracy and loss of every task in `tasks` on all held-out images, BatchNorm in eval
    mode. The reference's bugs, for comparison: `on_train_images` tests on the first num_test
    training images instead; `batchnorm_train` keeps BatchNorm in training mode (batch
    statistics; its running statistics, unused then, get updated)."""
    was_training = model.training
    model.eval()
    if batchnorm_train:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
    device = data.device
    first, stop = evaluation_rows(data, on_train_images)
    loss_sum = torch.zeros(len(tasks), device=device)
    correct = torch.zeros(len(tasks), device=device)
    queries = one_hot(torch.tensor(tasks, device=device))
    try:
        for start in range(first, stop, batch_size):
            index = torch.arange(start, min(start + batch_size, stop), device=device)
            x = data.batch(index)
            shared = None if model.query_dependent_features else model.features(x)
            for i, task in enumerate(tasks):
                query = queries[i].expand(index.shape[0], -1)
                logits = model(x, query) if shared is None else model.head(shared, query)
                target = data.labels[index, task].long()
                loss_sum[i] += F.cross_entropy(logits, target, reduction="sum")
                correct[i] += (logits.argmax(1) == target).sum()
    finally:
        model.train(was_training)
    return {"loss": (loss_sum.cpu() / (stop - first)).tolist(), "acc": (correct.cpu() / (stop - first)).tolist()}


def make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)


def build(config: Config, data: scene_data.SceneTensors, device: torch.device):
    spec = {
        "name": config.model.name,
        "channels": list(config.model.channels),
        "hidden": list(config.model.hidden),
        "image_size": list(data.image_size),
        "dropout": config.model.dropout,
    }
    if config.model.name == "query-modulated":
        spec["levels"] = list(config.model.levels)
    if config.model.name == "task-conditional":
        spec["conditioning"] = config.model.conditioning
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "model-init"))
        try:
            model = build_model(spec).to(device, memory_format=torch.channels_last)  # see SceneTensors.batch
        except ValueError as error:
            raise ConfigError(f"model: {error}") from None
    return model, make_optimizer(config, model)


def check_finite(losses: list[float], where: str) -> None:
    """Stop a run whose training loss is NaN or infinite (its last checkpoint stays finite)."""
    if not all(math.isfinite(loss) for loss in losses):
        raise RunDiverged(f"the training loss became {losses} at {where}; lower train.lr or check the data")
