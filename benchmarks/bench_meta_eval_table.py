"""Wall time of the honest meta-test table for one checkpoint, as `metacl meta eval` runs it.

    python benchmarks/bench_meta_eval_table.py                      # a fresh (random) ANML, real Omniglot
    python benchmarks/bench_meta_eval_table.py --checkpoint runs/<meta-train run>/model.pt

    python benchmarks/bench_meta_eval_table.py protocol.class_draws=independent   # the reference's draws

The default protocol: 12 learning rates x 10 runs on the 100 validation classes held out of
meta-training (10, 50, 75, 100 classes), then the test split at the chosen learning rate only
(10 runs at 10 ... 600 classes), with nested class draws: each run learns its largest count's
classes once and is measured after each smaller count's first classes (one trajectory per run
and distinct chosen LR instead of one per count). Speed does not depend on the weights, so
without --checkpoint a randomly initialised ANML stands in, with the data record of
`configs/meta/anml.yaml`. The reference design runs the full 12 x 10 sweep on test at every
count; `bench_meta_eval.py` times that design side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from metacl.core.environment import hardware_summary
from metacl.core.experiment import execute, load_experiment_config
from metacl.meta.eval.experiment import draws
from metacl.meta.eval.report import write_report
from metacl.models import build_model, save_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a meta-trained model.pt (default: a random ANML)")
    parser.add_argument("--data-dir", default=str(SHARED) if SHARED.is_dir() else None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="meta-eval overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(hardware_summary(args.device), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            torch.manual_seed(0)
            checkpoint = str(Path(tmp) / "anml.pt")
            data = {
                "dataset": "omniglot",
                "split": "background",
                "image_size": 28,
                "val_classes": 100,
                "split_seed": 1,
                "first_963": False,
                "data_dir": args.data_dir,
            }
            save_model(build_model({"name": "anml"}), checkpoint, step=0, data=data)
        overrides = [
            f"checkpoint={checkpoint}",
            f"out_dir={tmp}",
            "name=eval",
            "quiet=true",
            f"device={args.device}",
            f"threads={args.threads}",
            *args.overrides,
        ]
        if args.data_dir:
            overrides.append(f"data_dir={args.data_dir}")
        config = load_experiment_config(None, overrides, "meta-eval")
        start = time.perf_counter()
        path, _ = execute(config)
        elapsed = time.perf_counter() - start
        write_report([path], Path(tmp) / "report", echo=print)
        print(
            f"the honest table for one checkpoint ({', '.join(map(str, config.protocol.classes))} classes, "
            f"{len(config.protocol.lrs)} LRs x {config.protocol.runs} runs on val, the chosen LR x "
            f"{config.protocol.runs} runs on test, class draws {draws(config)}): {elapsed:.0f} s = "
            f"{elapsed / 60:.1f} min (target: at most 10 min on the 2-core CPU)"
        )


if __name__ == "__main__":
    main()
