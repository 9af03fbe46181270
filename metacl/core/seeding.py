"""One seed drives every random choice.

`seed_everything` seeds the global generators of Python, numpy and torch, for library code we do
not control. metacl's own code never draws from them: it derives an independent, named stream
per purpose (`torch_generator(seed, "sampler")`), so adding a draw in one place never shifts the
random numbers of another, and each stream's state can go into a checkpoint.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A stable 63-bit seed for the stream named by `keys` (same on every platform and run)."""
    digest = hashlib.sha256(repr((int(seed), *map(str, keys))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(derive_seed(seed, "numpy-global") % 2**32)
    torch.manual_seed(derive_seed(seed, "torch-global"))


def torch_generator(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *keys))
    return generator


def numpy_rng(seed: int, *keys: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(seed, *keys)))


def generator_state(generator: torch.Generator | np.random.Generator) -> object:
    """A checkpointable snapshot of a generator (restore with `set_generator_state`)."""
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    return generator.bit_generator.state


def set_generator_state(generator: torch.Generator | np.random.Generator, state: object) -> None:
    if isinstance(generator, torch.Generator):
        assert isinstance(state, torch.Tensor), "a torch generator's state is a byte tensor"
        generator.set_state(state)
    else:
        assert isinstance(state, dict), "a numpy generator's state is a mapping"
        generator.bit_generator.state = state
