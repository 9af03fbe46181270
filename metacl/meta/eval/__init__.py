"""The sequential meta-test: protocol, batched LR sweeps, the honest LR choice, reports.

- `meta_test_model(model, protocol, images, ...)`: meta-test a model in memory (e.g. from
  meta-training at its eval steps) and get the tidy results table (`results.py`).
- `LRSweep`: one protocol on one split; `LRSweep.run(classes, trajectories)` runs (LR, run)
  trajectories (`Trajectories`) at once, on the linear or the vmap engine.
- `results.py`: the results table and the choice of learning rate (validation, best-on-test).
- `report.write_report(results, out)`: the final table, summaries and plots (`metacl meta report`).

Modules: protocol (settings, task draws, result type), trajectories, schedule, reinit,
linear_engine, vmap_engine, sweep, adam, results, report, checkpoints, experiment.
"""

from __future__ import annotations

from .checkpoints import load_eval_model, resolve_checkpoint
from .experiment import SPLITS, Config, meta_test_model
from .protocol import REFERENCE_CLASSES, REFERENCE_LRS, MetaTestResult, ProtocolConfig
from .results import best_learning_rates, select_learning_rates
from .sweep import LRSweep
from .trajectories import Trajectories

__all__ = [
    "Config",
    "LRSweep",
    "MetaTestResult",
    "ProtocolConfig",
    "REFERENCE_CLASSES",
    "REFERENCE_LRS",
    "SPLITS",
    "Trajectories",
    "best_learning_rates",
    "load_eval_model",
    "meta_test_model",
    "resolve_checkpoint",
    "select_learning_rates",
]
