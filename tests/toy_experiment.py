"""A tiny, fast, checkpointing experiment used to test the run plumbing and the launchers.

It draws a seeded random walk, one step per `step_seconds`, checkpointing every
`checkpoint_every` steps, exactly as a real experiment uses the `Run` contract.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from metacl.core.errors import RunInterrupted
from metacl.core.experiment import ExperimentConfig
from metacl.core.seeding import generator_state, set_generator_state, torch_generator


@dataclass
class WalkConfig:
    steps: int = 20
    """Number of steps."""
    scale: float = 1.0
    """Step size."""
    step_seconds: float = 0.0
    """Sleep per step (to give kill tests time)."""
    checkpoint_every: int = 5
    """Checkpoint period in steps."""
    fail_at: int | None = None
    """Raise an error at this step (to test failure reporting). A crash that a resume should get
    past comes from outside the config instead: $TOY_CRASH_AT (a resumed run keeps its config)."""


@dataclass
class Config(ExperimentConfig):
    walk: WalkConfig = field(default_factory=WalkConfig)
    """The walk."""


def run(config: Config, run) -> dict:
    run.check_data({"source": os.environ.get("TOY_DATA", "v1")})  # what a real run fingerprints
    rng = torch_generator(config.seed, "walk")
    position, step = 0.0, 0
    state = run.load_checkpoint()
    if state is not None:
        position, step = state["position"], state["step"]
        set_generator_state(rng, state["rng"])
    table = run.table("metrics")
    while step < config.walk.steps:
        if step in (config.walk.fail_at, int(os.environ.get("TOY_CRASH_AT", -1))):
            raise ValueError(f"planned failure at step {step}")
        position += config.walk.scale * float(torch.randn((), generator=rng))
        step += 1
        table.append({"step": step, "position": position})
        run.tracker.log({"walk/position": position}, step)
        time.sleep(config.walk.step_seconds)
        if step % config.walk.checkpoint_every == 0 or run.stop_requested:
            run.save_checkpoint({"position": position, "step": step, "rng": generator_state(rng)})
            if run.stop_requested:
                raise RunInterrupted(f"stopped at step {step}; resume with --resume")
    run.flush()
    return {"position": position, "steps": step}
