"""The meta-training loop, the same for every algorithm: step, log, evaluate, meta-test, checkpoint.

`state()` is everything a checkpoint needs to resume exactly (the model, the algorithm's own
state, every random stream, the step and the metrics window not yet logged); `restore()` puts it
back. The algorithm's state sits at the top level of the checkpoint (`optimizer`, `order`), so
checkpoints written before algorithms had their own modules still resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.denormals import denormals_flushed
from ...core.errors import RunDiverged, RunInterrupted
from ...core.progress import progress
from ...core.seeding import generator_state, set_generator_state


class TrainingLoop:
    def __init__(
        self,
        model: nn.Module,
        algorithm: Any,
        streams: dict[str, torch.Generator],
        run,
        config,
        *,
        evaluate: Callable[[int], None],
        meta_test: Callable[[int], None],
        save_model: Callable[[Path, int], None],
    ):
        self.model, self.algorithm, self.streams, self.run, self.config = model, algorithm, streams, run, config
        self.evaluate, self.meta_test, self.save_model = evaluate, meta_test, save_model
        self.step = 0
        self.window: list[dict[str, float]] = []  # metrics of the steps since the last train-table row

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "window": self.window,
            "rng": {name: generator_state(g) for name, g in self.streams.items()},
            **self.algorithm.state_dict(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.algorithm.load_state_dict(state)
        for name, generator in self.streams.items():
            set_generator_state(generator, state["rng"][name])
        self.step, self.window = int(state["step"]), list(state["window"])

    def checkpoint(self, name: str = "last") -> None:
        self.run.save_checkpoint(self.state(), name)

    def train(self) -> dict[str, float]:
        # a saturated softmax makes denormal floats, many times slower on x86 (SANML's second-order
        # episode 20% slower from its first episodes); flushed, they change values below 1e-38 only
        with denormals_flushed(next(self.model.parameters()).device):
            self.run_steps()
        self.save_model(self.run.path / "model.pt", self.step)
        self.run.flush()
        return self.final_metrics()

    def run_steps(self) -> None:
        config, run, total = self.config, self.run, self.algorithm.steps
        started, cpu_started = time.perf_counter(), time.process_time()
        bar = progress(total=total, initial=self.step, desc=config.algorithm, quiet=config.quiet, unit="step")
        try:
            if self.step in config.eval_steps and not self.saved(self.step):
                self.at_eval_step(self.step)  # a run extended from here: what a longer run did here
            while self.step < total:
                metrics = self.algorithm.step(self.step)
                loss = metrics.get("meta_loss", metrics.get("loss"))
                if loss is not None and not math.isfinite(loss):
                    raise RunDiverged(
                        f"the loss became {loss} at step {self.step + 1} (checkpoints "
                        f"before it are finite); lower the learning rate"
                    )
                self.step += 1
                bar.update()
                self.window.append(metrics)
                step = self.step
                if step % config.log_every == 0 or step == total:
                    row = {k: sum(m[k] for m in self.window) / len(self.window) for k in self.window[0]}
                    row["seconds_per_step"] = (time.perf_counter() - started) / len(self.window)
                    row["cpu_seconds_per_step"] = (time.process_time() - cpu_started) / len(self.window)
                    run.table("train").append({"step": step, **row})
                    run.tracker.log({f"meta_train/{k}": v for k, v in row.items()}, step)
                    self.window, started, cpu_started = [], time.perf_counter(), time.process_time()
                if config.eval.every and (step % config.eval.every == 0 or step == total):
                    self.evaluate(step)
                if step in config.eval_steps:
                    self.at_eval_step(step)
                if step % config.checkpoint_every == 0 or step == total or run.stop_requested:
                    self.checkpoint()
                    if run.stop_requested and step < total:
                        raise RunInterrupted(f"stopped at step {step}; resume with --resume")
        finally:
            bar.close()

    def saved(self, step: int) -> bool:
        return (self.run.path / "models" / f"step-{step}.pt").exists()

    def at_eval_step(self, step: int) -> None:
        self.save_model(self.run.path / "models" / f"step-{step}.pt", step)
        self.meta_test(step)
        self.checkpoint(f"step-{step}")

    def final_metrics(self) -> dict[str, float]:
        final = self.run.table("train").frame().iloc[-1].to_dict()
        if "eval" in self.run.tables and len(self.run.tables["eval"]):
            evals = self.run.tables["eval"].frame()
            for pool_name in ("train", "val"):
                rows = evals[evals["pool"] == pool_name]
                if len(rows):
                    final[f"{pool_name}_trial_acc"] = float(rows["accuracy"].iloc[-1])
        return {k: float(v) for k, v in final.items()}
