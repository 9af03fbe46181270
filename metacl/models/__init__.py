"""Neural network architectures, built by name through the registry."""

from .registry import (
    available_models,
    build_model,
    load_model,
    model_spec,
    register_model,
    save_model,
    select_parameters,
)

__all__ = [
    "available_models",
    "build_model",
    "load_model",
    "model_spec",
    "register_model",
    "save_model",
    "select_parameters",
]
