"""What meta-eval reads from a meta-trained model: the model, and how its data was split.

A model checkpoint written by meta-training (`model.pt`, `models/step-N.pt`; metacl.models.save_model)
carries a `data` record: {dataset, split, image_size, val_classes, split_seed, first_963, data_dir}.
From it meta-eval rebuilds the validation classes held out of meta-training, on the data folder
the training used. Checkpoints without the record (older runs, or a training state
`checkpoints/last.pt`) fall back to the meta-train run's config.yaml found next to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ...core.checkpoint import load_checkpoint
from ...core.errors import ConfigError

MODEL_FILES = ("model.pt", "checkpoints/model.pt", "checkpoints/last.pt")
"""Where a run directory's final model is looked for, in this order."""
DATA_RECORD_KEYS = ("dataset", "split", "image_size", "val_classes", "split_seed", "first_963", "data_dir")
"""The keys of a checkpoint's `data` record (others are ignored)."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The model file for a checkpoint path or a meta-train run directory."""
    path = Path(path).expanduser()
    if not str(path) or str(path) == ".":
        raise ConfigError("no checkpoint given: pass a model checkpoint file or a meta-train run directory")
    if path.is_file():
        return path
    if path.is_dir():
        for name in MODEL_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in (path / "checkpoints").glob("*.pt")) if (path / "checkpoints").is_dir() else []
        raise ConfigError(
            f"{path} holds no model checkpoint (looked for {', '.join(MODEL_FILES)}; "
            f"checkpoints/ has: {', '.join(found) or 'nothing'})"
        )
    raise ConfigError(f"checkpoint {path} does not exist; pass a model .pt file or a meta-train run directory")


def checkpoint_fingerprint(path: str | Path) -> dict[str, str]:
    """What a meta-eval run records about its model (data.json): a hash of its weights and spec
    (not of the file's bytes, which differ between two saves of one model), so that a resume, or
    a reproduction, never mixes results of two different models."""
    import hashlib
    import json

    file = resolve_checkpoint(path)
    state = load_checkpoint(file, "cpu")
    weights = state.get("state_dict", state.get("model")) or {}
    digest = hashlib.sha256(json.dumps(state.get("model_spec"), sort_keys=True, default=str).encode())
    for name in sorted(weights):
        tensor = weights[name].detach().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return {"model_sha256": digest.hexdigest()}  # the path is in config.yaml; a moved file is the same model


def load_eval_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model of a checkpoint: {model_spec, state_dict}, or a training state {model} whose
    spec comes from the meta-train run's config.yaml (`checkpoints/last.pt` of an unfinished run)."""
    from ...models import build_model

    file = resolve_checkpoint(path)
    state = load_checkpoint(file, "cpu")
    weights = state.get("state_dict", state.get("model"))
    spec = state.get("model_spec") or training_config(file).get("model")
    if not isinstance(spec, dict) or not isinstance(weights, dict):
        raise ConfigError(
            f"{file} is not a metacl model checkpoint: it needs model_spec and state_dict "
            f"(or model, next to a meta-train config.yaml); it has keys {', '.join(sorted(state))}"
        )
    model = build_model(spec)
    model.load_state_dict(weights)
    return model.to(device).eval()


def training_config(path: str | Path) -> dict[str, Any]:
    """The meta-training run's config.yaml next to a run directory or its checkpoints ({} if none)."""
    path = Path(path).expanduser()
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file() and folder.is_dir():
            data = yaml.safe_load((folder / "config.yaml").read_text()) or {}
            if data.get("experiment") == "meta-train":
                return data
    return {}


@dataclass(frozen=True)
class TrainingData:
    """How meta-training split its data, as far as meta-eval needs it (None: not known)."""

    val_classes: int | float = 0
    """Classes (count or fraction) held out of meta-training as validation classes; 0: none."""
    split_seed: int | None = None
    """Seed of that hold-out (metacl.meta.data.split_classes)."""
    first_963: bool = False
    """Whether training used only the first 963 background classes."""
    dataset: str | None = None
    """The dataset meta-trained on."""
    split: str | None = None
    """Its split meta-trained on (whose classes the validation classes are held out of)."""
    image_size: int | None = None
    """Image side in pixels."""
    data_dir: str | None = None
    """The data folder the training read (None: the default)."""
    source: str = "defaults (no data record in the checkpoint, no meta-train config.yaml beside it)"
    """Where this came from, for the log."""
    recorded: bool = False
    """Whether it is the checkpoint's own data record (dataset, split and image_size known)."""


def training_data(checkpoint: str | Path) -> TrainingData:
    """The data record of a checkpoint, or, for older checkpoints, what the meta-train run's
    config.yaml next to it says (val_classes, seed, first_963), or nothing."""
    state = load_checkpoint(resolve_checkpoint(checkpoint), "cpu")
    record = state.get("data")
    if isinstance(record, dict):
        return TrainingData(
            val_classes=record.get("val_classes") or 0,
            split_seed=record.get("split_seed"),
            first_963=bool(record.get("first_963", False)),
            dataset=record.get("dataset"),
            split=record.get("split"),
            image_size=record.get("image_size"),
            data_dir=record.get("data_dir"),
            source="the checkpoint's data record",
            recorded=True,
        )
    trained = training_config(checkpoint)
    if not trained:
        return TrainingData()
    data = trained.get("data", {}) if isinstance(trained.get("data"), dict) else {}
    return TrainingData(
        val_classes=data.get("val_classes", 0) or 0,
        split_seed=data.get("split_seed", trained.get("seed")),
        first_963=bool(data.get("first_963", False)),
        source="the meta-train run's config.yaml (the checkpoint has no data record)",
    )
