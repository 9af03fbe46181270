"""Model registry: configs name a model, checkpoints store (name, kwargs) and never pickled code.

@register_model("cnn-mlp")
class CnnMlp(nn.Module): ...

model = build_model({"name": "cnn-mlp", "width": 2})
save_model(model, path); model = load_model(path)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.checkpoint import load_checkpoint, save_checkpoint
from ..core.errors import ConfigError

MODEL_MODULES = (
    "metacl.models.mastery",
    "metacl.models.anml",
    "metacl.models.oml",
    "metacl.models.convnet",
    "metacl.models.resnet",
)
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_models() -> list[str]:
    for module in MODEL_MODULES:
        importlib.import_module(module)
    return sorted(_REGISTRY)


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Build from {"name": registered name, **constructor kwargs}; the spec is kept on the model."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in available_models():
        raise ConfigError(f"unknown model {name!r}; valid choices: {', '.join(available_models())}")
    try:
        model = _REGISTRY[name](**spec)
    except TypeError as error:
        import inspect

        valid = [p for p in inspect.signature(_REGISTRY[name]).parameters if p != "self"]
        raise ConfigError(f"model {name!r}: {error}; valid arguments: {', '.join(valid)}") from None
    setattr(model, "metacl_spec", {"name": name, **spec})  # noqa: B010 (not a Parameter or Module)
    return model


def check_model_spec(spec: Mapping[str, Any], key: str = "model") -> None:
    """Refuse a spec whose model cannot be built (unknown or bad constructor arguments), before
    any run starts: the model is built on the `meta` device, which allocates nothing."""
    import warnings

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(spec)
    except ConfigError as error:
        raise ConfigError(f"{key}: {error}") from None
    except Exception as error:  # a constructor's own checks, or arithmetic on impossible sizes
        raise ConfigError(f"{key} {dict(spec)}: cannot be built ({type(error).__name__}: {error})") from None
    empty = [name for name, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise ConfigError(
            f"{key} {dict(spec)}: layers with no units ({', '.join(empty[:3])}); every "
            f"channel and width must be at least 1"
        )


def model_spec(model: nn.Module) -> dict[str, Any]:
    spec = getattr(model, "metacl_spec", None)
    if spec is None:
        raise ValueError("model was not built by build_model, so it has no spec to save")
    return dict(spec)


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    return save_checkpoint({"model_spec": model_spec(model), "state_dict": model.state_dict(), **extra}, path)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    state = load_checkpoint(path, map_location)
    if "model_spec" not in state or "state_dict" not in state:
        raise ConfigError(f"{path} is not a metacl model checkpoint (no model_spec/state_dict)")
    model = build_model(state["model_spec"])
    model.load_state_dict(state["state_dict"])
    return model.to(map_location)


def select_parameters(model: nn.Module, prefixes: str | list[str]) -> dict[str, nn.Parameter]:
    """Parameters whose names start with any of `prefixes`; "all" (or ["all"]) selects every one."""
    prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
    named = dict(model.named_parameters())
    if "all" in prefixes:
        return named
    chosen = {n: p for n, p in named.items() if any(n.startswith(pre) for pre in prefixes)}
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in named):
            roots = sorted({n.split(".")[0] for n in named})
            raise ConfigError(
                f"parameter prefix {prefix!r} matches nothing; valid prefixes: all, "
                f"{', '.join(roots)} (or any longer dotted name)"
            )
    return chosen
