"""`python -m metacl.launch.worker RUN_CONFIG [key=value ...]`: execute one run, resuming.

Both launchers start runs through this entry point, one process per run, so a run that
crashes or is killed takes no other run with it. The run always starts in mode "resume": a
complete run returns at once, an unfinished one continues from its last checkpoint.

Exit codes: 0 complete, 1 failed (the error is in status.json), 2 bad config,
3 the run is already executing in another process, 130 interrupted (checkpoint written).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

EXIT_FAILED, EXIT_CONFIG, EXIT_BUSY, EXIT_INTERRUPTED = 1, 2, 3, 130
GPU_MEMORY_FRACTION_ENV = "METACL_GPU_MEMORY_FRACTION"
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metacl.launch.worker", description=__doc__)
    parser.add_argument("config", help="resolved run config (a sweep's .launch/<run>.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    # Under Slurm the preemption signal reaches every process of the job; the submitit parent
    # decides what to do (it stops this run with SIGTERM), so the run itself ignores it.
    preempt = getattr(signal, "SIG" + os.environ.get(PREEMPT_SIGNAL_ENV, "USR2"), None)
    if preempt is not None:
        signal.signal(preempt, signal.SIG_IGN)

    from ..core.errors import MetaclError, RunInterrupted
    from ..core.experiment import execute, load_experiment_config
    from ..core.rundir import RunInUse

    try:
        config = load_experiment_config(args.config, args.overrides)
        _cap_gpu_memory()
        path, final = execute(config, "resume")
    except RunInUse as error:  # the run directory's lock is held by another live process
        print(f"busy: {error}", file=sys.stderr)
        return EXIT_BUSY
    except RunInterrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except MetaclError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception:
        traceback.print_exc()
        return EXIT_FAILED
    print(f"run complete: {path}  {final}")
    return 0


def _cap_gpu_memory() -> None:
    fraction = os.environ.get(GPU_MEMORY_FRACTION_ENV)
    if fraction:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(float(fraction), 0)


if __name__ == "__main__":
    sys.exit(main())
