"""The sequential meta-test protocol, batched LR sweeps and reports.

- `evaluate_checkpoint(model, protocol, images, ...)`: meta-test a model in memory (e.g. from
  meta-training at its eval steps) and get the tidy results table.
- `Sweep`: one protocol on one split; `Sweep.run(classes)` runs every (LR, run) trajectory at once.
- `report.write_report(results, out)`: summaries, LR selection, plots (`metacl meta report`).
"""
from .experiment import Config, evaluate_checkpoint, load_eval_model, resolve_checkpoint
from .protocol import REFERENCE_CLASSES, REFERENCE_LRS, ProtocolConfig, Sweep, SweepResult

__all__ = ["Config", "ProtocolConfig", "REFERENCE_CLASSES", "REFERENCE_LRS", "Sweep", "SweepResult",
           "evaluate_checkpoint", "load_eval_model", "resolve_checkpoint"]
