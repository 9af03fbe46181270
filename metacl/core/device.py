"""Resolve `device=auto|cpu|cuda|cuda:N` to a torch.device, with a clear error when unavailable."""

from __future__ import annotations

import torch

from .errors import ConfigError

VALID_DEVICES = "auto, cpu, cuda, cuda:N"


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={spec!r} but CUDA is not available here; use device=cpu or auto")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    raise ConfigError(f"unknown device {spec!r}; valid choices: {VALID_DEVICES}")
