"""Speed of the meta-test sweep: the frozen-encoder LR x runs sweep and the unfrozen flavour.

    python benchmarks/bench_meta_eval.py                 # 12 LRs x 10 runs, ANML-sized head
    python benchmarks/bench_meta_eval.py --device cuda
    python benchmarks/bench_meta_eval.py --floor         # also compile and run adam_floor.c
    python benchmarks/bench_meta_eval.py --steps 15 --trajectories 12 --reference-steps 10 --skip-unfrozen  # smoke

Frozen: times `steps` sequential steps of all T trajectories of a 1000 x 2305 linear head (fc
plus bias) and one evaluation of every trajectory on 600 classes (12,000 images), then
extrapolates to the full 600-class sweep (9,000 steps + final evaluation). The dense Adam update
touches T x 1000 x 2305 parameters per step (read W, m, v; write W, m, v), so it is memory-bound:
the script prints the achieved ns per parameter update and GB/s. `adam_floor.c` beside it
measures the arithmetic alone (state held in cache), the floor under any exact implementation;
`--floor` compiles and runs it (gcc, as its header says) and prints the ratio to it, running it
again after the timing and in every repeat of `--groups`, since a shared machine's speed drifts.

Reference (timed in the same run unless --skip-reference): the reference design's meta-test step,
one full forward pass of the whole ANML model (28x28, one channel) per image and a
torch.optim.Adam step on `fc` alone (1000 x 2304 + bias), one trajectory at a time.
`--reference-steps` steps are timed after a short warm-up and projected to the full sweep
(9,000 steps x 120 trajectories); metacl's frozen sweep runs every trajectory's step at once on
features precomputed once (a `Features` stand-in for the frozen encoder), so the two are
compared per step of all T trajectories, with the arithmetic printed.

Groups (--groups 1,2,4,8,120): the same fused step on groups of G trajectories, each group
advanced on its own (as protocol.trajectory_group=G runs the sweep): a small group keeps its
weights and Adam moments (28 MB for one ANML head) in the last-level cache, a large one streams
them from DRAM every step. Sizes are measured interleaved, `--repeats` times, and the medians
printed with the load average, since the machine may be shared.

Unfrozen: ms per step of every parameter of a (random) ANML learning, for T trajectories as
`LRSweep` runs them (one by one on CPU, `SequentialEngine`; under vmap elsewhere; the 30 steps of
a 2-class sweep with its evaluations and set-up) and, as the reference does it, one trajectory
with torch.optim.Adam, both in this run; the reference on metacl's layers (its design alone) and
on higherANML's nn layers (as its users run it).

Saturated (--saturate S): the frozen sweep on features scaled by S (30 saturates the softmax at
the high learning rates, as a trained encoder's features do in the validation sweep), timed with
denormals flushed, as metacl runs the sweep, and without, alternating: on x86 the saturated
softmax's gradients make Adam's second moments denormal, which the fused step computes many times
slower. The plain sweep (random features in [0, 1)) never saturates and cannot show this.

Every figure printed is measured in this run; the first line names the hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from reference_layers import with_reference_layers
from torch import nn

from metacl.core.environment import hardware_summary
from metacl.meta.eval.adam import FusedLinearStep, linear_step, step_scalars
from metacl.meta.eval.linear_engine import LinearEngine
from metacl.meta.eval.protocol import REFERENCE_LRS, ProtocolConfig, draw_tasks
from metacl.meta.eval.sweep import LRSweep
from metacl.meta.eval.trajectories import Trajectories, trajectories_in_memory

FULL_SWEEP_UPDATES = 9000 * 120 * 1000 * 2305
"""Parameter updates of the full 600-class sweep: 9,000 steps x 120 trajectories x a 1000 x 2305 head."""
SWEEP_STEPS, SWEEP_TRAJECTORIES = 9000, 120
"""600 classes x 15 training images each; 12 learning rates x 10 runs."""
ADAM_FLOOR = Path(__file__).with_name("adam_floor.c")


class Features(nn.Module):
    """A frozen encoder whose "images" are already D-dimensional features: isolates the head sweep."""

    def __init__(self, features: int, outputs: int):
        super().__init__()
        self.fc = nn.Linear(features, outputs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))


def saturated(args: argparse.Namespace, device: torch.device, floor_ns: float | None) -> None:
    """The frozen sweep on saturating features, with and without the denormal flush (alternating)."""
    from metacl.meta.eval import sweep as sweep_module

    flushed = sweep_module.denormals_flushed
    protocol = ProtocolConfig(classes=[600], lrs=list(REFERENCE_LRS), runs=args.trajectories // len(REFERENCE_LRS))
    images = torch.rand(659, 20, args.features, device=device) * args.saturate
    classes = max(1, args.steps // 15)
    times: dict[bool, list[float]] = {True: [], False: []}
    for flush in (True, False) * 2:
        sweep_module.denormals_flushed = flushed if flush else (lambda _device: contextlib.nullcontext())
        try:
            sweep = LRSweep(Features(args.features, args.outputs).to(device), images, protocol, seed=0)
            sweep.run(1)  # warm-up, and the first class saturates the high learning rates
            start = time.perf_counter()
            sweep.run(classes)
            sync(device)
            times[flush].append((time.perf_counter() - start) / (classes * 15))
        finally:
            sweep_module.denormals_flushed = flushed
    params = protocol.runs * len(REFERENCE_LRS) * args.outputs * (args.features + 1)
    ns = {flush: statistics.median(t) / params * 1e9 for flush, t in times.items()}
    print(
        f"saturated frozen sweep (features x {args.saturate:g}), {classes * 15} steps, alternating, "
        f"load average {load()}: denormals flushed (as metacl runs it) {ns[True]:.2f} ns per update, "
        f"not flushed {ns[False]:.2f} ns per update = {ns[False] / ns[True]:.1f}x slower"
    )
    if floor_ns:
        print(f"  flushed: {ns[True] / floor_ns:.1f}x the floor; not flushed: {ns[False] / floor_ns:.1f}x")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def frozen(args: argparse.Namespace, device: torch.device, floor_ns: float | None) -> dict[str, float]:
    runs = args.trajectories // len(REFERENCE_LRS)
    protocol = ProtocolConfig(
        classes=[600],
        lrs=list(REFERENCE_LRS),
        runs=runs,
        compile=not args.eager,
        memory_gb=args.memory_gb,
        trajectory_group=args.trajectory_group,
    )
    images = torch.rand(659, 20, args.features, device=device)
    sweep = LRSweep(Features(args.features, args.outputs).to(device), images, protocol, seed=0)
    trajectories = len(REFERENCE_LRS) * runs
    start = time.perf_counter()
    sweep.run(1)  # warm-up: compilation, feature table
    sync(device)
    warm = time.perf_counter() - start
    classes = max(1, args.steps // 15)
    start = time.perf_counter()
    sweep.run(classes)
    sync(device)
    elapsed = time.perf_counter() - start
    steps = classes * 15
    per_step = elapsed / steps
    params = trajectories * args.outputs * (args.features + 1)
    print(
        f"frozen sweep: T={trajectories} trajectories in groups of {args.trajectory_group or 'all (memory)'}, "
        f"head {args.outputs} x {args.features + 1}, {'eager' if args.eager else 'compiled'}, "
        f"{torch.get_num_threads()} threads, device {device}, load average {load()}"
    )
    print(
        f"  warm-up (compile) {warm:.1f} s; {steps} steps in {elapsed:.1f} s = {per_step * 1e3:.1f} ms/step "
        f"for all trajectories, {per_step / params * 1e9:.2f} ns per parameter update "
        f"(~{28 * params / per_step / 1e9:.1f} GB/s at 28 bytes/parameter)"
    )
    ns = per_step / params * 1e9
    if floor_ns:
        print(
            f"  vs the arithmetic floor (adam_floor.c, this run): {ns:.2f} / {floor_ns:.3f} ns per "
            f"update = {ns / floor_ns:.1f}x the floor"
        )
    # one evaluation of every trajectory at 600 classes
    tasks = draw_tasks(659, 20, 600, 15, 5, runs, 0, "bench")
    engine = LinearEngine(*sweep.linear_head, sweep.features(), protocol, sweep.linear_step)
    chunk = trajectories_in_memory(protocol.memory_gb, 6 * args.outputs * (args.features + 1) * 4, trajectories)
    weight = torch.randn(chunk, args.outputs, args.features + 1, device=device) * 0.02
    group = Trajectories.grid(REFERENCE_LRS, runs)[:chunk]
    start = time.perf_counter()
    engine.measure(weight, tasks, group)
    sync(device)
    evaluation = (time.perf_counter() - start) * trajectories / chunk
    total = per_step * SWEEP_STEPS + evaluation
    print(f"  evaluation of all {trajectories} trajectories on 600 classes (12,000 images): {evaluation:.1f} s")
    print(
        f"  => full 600-class sweep ({trajectories} trajectories): {per_step * 1e3:.1f} ms/step x "
        f"{SWEEP_STEPS:,} steps + {evaluation:.1f} s evaluation = {total:.0f} s = {total / 60:.1f} min"
    )
    return {"per_step": per_step, "trajectories": trajectories, "evaluation": evaluation, "total": total, "ns": ns}


def reference(args: argparse.Namespace, device: torch.device) -> float:
    """Seconds per step of one trajectory in the reference design: whole-model forward, Adam on fc."""
    from metacl.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "anml", "num_classes": args.outputs}).to(device)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("fc."))  # only fc learns: backward stops at fc
    optimiser = torch.optim.Adam(model.fc.parameters(), lr=1e-3)
    warmup = min(10, args.reference_steps)
    total = warmup + args.reference_steps
    images = torch.rand(total, 1, 1, 28, 28, device=device)
    labels = torch.randint(0, min(600, args.outputs), (total, 1), device=device)

    def step(i: int) -> None:
        loss = nn.functional.cross_entropy(model(images[i]), labels[i])
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()

    for i in range(warmup):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(warmup, total):
        step(i)
    sync(device)
    per_step = (time.perf_counter() - start) / args.reference_steps
    fc = model.fc.weight.shape
    full = per_step * SWEEP_STEPS * SWEEP_TRAJECTORIES
    print(
        f"reference design (one trajectory at a time: whole ANML forward per image, torch.optim.Adam "
        f"on fc {fc[0]} x {fc[1]} + bias only), {args.reference_steps} steps after {warmup} warm-up, "
        f"{torch.get_num_threads()} threads, device {device}, load average {load()}"
    )
    print(
        f"  {per_step * 1e3:.2f} ms per step of one trajectory => full sweep {per_step * 1e3:.2f} ms x "
        f"{SWEEP_STEPS:,} steps x {SWEEP_TRAJECTORIES} trajectories = {full:.0f} s = {full / 3600:.2f} h "
        f"(steps only; its evaluation passes are not timed)"
    )
    return per_step


def compare(ours: dict[str, float], reference_step: float) -> None:
    """metacl's frozen sweep against the reference design, per step of all T trajectories."""
    t = ours["trajectories"]
    ref_all = reference_step * t
    ref_steps = ref_all * SWEEP_STEPS
    ours_steps = ours["per_step"] * SWEEP_STEPS
    print(
        f"comparison, same run and machine, per step of all T={t} trajectories "
        f"(metacl's encoder is frozen and precomputed once; the reference runs it every image):"
    )
    print(
        f"  reference {reference_step * 1e3:.2f} ms x {t} trajectories = {ref_all * 1e3:.1f} ms/step; "
        f"metacl {ours['per_step'] * 1e3:.1f} ms/step => metacl is {ref_all / ours['per_step']:.1f}x "
        f"the reference"
    )
    print(
        f"  steps of the 600-class sweep for T={t}: reference {ref_all * 1e3:.1f} ms x {SWEEP_STEPS:,} = "
        f"{ref_steps:.0f} s = {ref_steps / 3600:.2f} h; metacl {ours['per_step'] * 1e3:.1f} ms x "
        f"{SWEEP_STEPS:,} = {ours_steps:.0f} s = {ours_steps / 60:.1f} min "
        f"(+ {ours['evaluation']:.1f} s evaluation = {ours['total'] / 60:.1f} min in all)"
    )
    if t != SWEEP_TRAJECTORIES:
        print(
            f"  (T={t}, not the full sweep's {SWEEP_TRAJECTORIES}: run with --trajectories "
            f"{SWEEP_TRAJECTORIES} for the full sweep's figures)"
        )


class AdamFloor:
    """adam_floor.c, compiled once as its header says, run as often as asked (ns per update)."""

    def __init__(self, threads: int, directory: str):
        self.threads, self.binary = threads, None
        gcc = shutil.which("gcc")
        if gcc is None:
            print("arithmetic floor skipped: gcc not found")
            return
        binary = Path(directory) / "adam_floor"
        build = subprocess.run(
            [gcc, "-O3", "-march=native", "-fno-math-errno", "-fopenmp", str(ADAM_FLOOR), "-o", str(binary), "-lm"],
            capture_output=True,
            text=True,
        )
        if build.returncode != 0:
            errors = [line for line in build.stderr.splitlines() if "error" in line] or [f"exit {build.returncode}"]
            print(f"arithmetic floor skipped: gcc failed to build {ADAM_FLOOR.name}: {errors[0].strip()}")
            return
        self.binary = binary

    def run(self, echo: bool = False) -> float | None:
        """One run's ns per parameter update (None: not built, or it printed no figure)."""
        if self.binary is None:
            return None
        run = subprocess.run(
            [str(self.binary)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        )
        match = re.search(r"([0-9.]+) ns per parameter update", run.stdout)
        if run.returncode != 0 or match is None:
            print(f"arithmetic floor skipped: {ADAM_FLOOR.name} printed no figure (exit {run.returncode})")
            return None
        if echo:
            print(
                f"arithmetic floor (adam_floor.c, gcc -O3 -march=native -fopenmp, "
                f"OMP_NUM_THREADS={self.threads}, this run):"
            )
            for line in run.stdout.strip().splitlines():
                print(f"  {line.strip()}")
        return float(match.group(1))


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def groups(args: argparse.Namespace, device: torch.device, floor: AdamFloor | None) -> None:
    """ns per parameter update of the fused step for each group size, interleaved and repeated;
    with the floor, it runs in every repeat too, and each size's ratio to it is taken within the
    repeat (a shared machine's speed drifts between repeats more than within one)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64  # one compilation per group size (and output strides)
    sizes = [int(g) for g in args.groups.split(",")]
    width = args.features + 1
    table = torch.randn(4096, width, device=device)
    table[:, -1] = 1
    generator = torch.Generator().manual_seed(0)
    state = {}
    for g in sizes:
        weight = torch.randn(g, args.outputs, width, device=device) * 0.02
        step = linear_step if args.eager else FusedLinearStep(log=print)
        state[g] = dict(tensors=(weight, torch.zeros_like(weight), torch.zeros_like(weight)), step=step, done=0)

    def advance(g: int, steps: int) -> float:
        s = state[g]
        order = torch.randint(0, len(table), (g, steps + 1), generator=generator).to(device)
        targets = torch.randint(0, args.outputs, (g, steps), generator=generator).to(device)
        lrs = torch.full((g,), 1e-3, dtype=torch.float64)
        weight = s["tensors"][0]
        logits = torch.bmm(weight, table[order[:, 0]].unsqueeze(2)).squeeze(2)
        sync(device)
        start = time.perf_counter()
        for k in range(steps):
            neg_step, bc2_sqrt = step_scalars(lrs, s["done"] + k + 1, (0.9, 0.999))
            logits = s["step"](
                *s["tensors"],
                logits,
                table[order[:, k]],
                targets[:, k],
                table[order[:, k + 1]],
                neg_step.to(device),
                torch.tensor(bc2_sqrt, dtype=torch.float64),
            )
        sync(device)
        s["done"] += steps
        return (time.perf_counter() - start) / steps / (g * args.outputs * width) * 1e9

    start = time.perf_counter()
    for g in sizes:
        advance(g, 2)
    print(
        f"group sizes {sizes}: warm-up (compile) {time.perf_counter() - start:.0f} s, "
        f"{torch.get_num_threads()} threads, device {device}"
    )
    measured: dict[int, list[float]] = {g: [] for g in sizes}
    ratios: dict[int, list[float]] = {g: [] for g in sizes}
    for repeat in range(args.repeats):
        floor_ns = floor.run() if floor else None
        for g in sizes if repeat % 2 == 0 else sizes[::-1]:  # alternate the order against drifting load
            measured[g].append(advance(g, max(3, int(args.group_updates // (g * args.outputs * width)))))
            if floor_ns:
                ratios[g].append(measured[g][-1] / floor_ns)
        print(
            f"  repeat {repeat}: load {load()}: "
            + ", ".join(f"G={g} {measured[g][-1]:.2f}" for g in sizes)
            + " ns/update"
            + (f"; floor {floor_ns:.3f} ns/update" if floor_ns else ""),
            flush=True,
        )
    for g in sizes:
        ns = statistics.median(measured[g])
        print(
            f"  G={g:4d}: median {ns:.2f} ns/update (min {min(measured[g]):.2f}) => full sweep "
            f"{ns * FULL_SWEEP_UPDATES / 1e9 / 60:.0f} min of steps"
            + (
                f"; {statistics.median(ratios[g]):.1f}x the arithmetic floor (median of the repeats' ratios, "
                f"{min(ratios[g]):.1f}-{max(ratios[g]):.1f})"
                if ratios[g]
                else ""
            )
        )
    print(f"  load average after: {load()}")


def unfrozen(args: argparse.Namespace, device: torch.device) -> None:
    from metacl.models import build_model

    model = build_model({"name": "anml"}).to(device)
    images = torch.rand(20, 20, 1, 28, 28, device=device)
    lrs = list(REFERENCE_LRS[: args.unfrozen_trajectories])
    protocol = ProtocolConfig(classes=[1], lrs=lrs, runs=1, opt_params=["all"], memory_gb=args.memory_gb)
    sweep = LRSweep(model, images, protocol, seed=0)
    sweep.run(1)
    sync(device)
    start = time.perf_counter()
    sweep.run(2)
    sync(device)
    sweep_step = (time.perf_counter() - start) / 30
    x, y = images[0, :1], torch.zeros(1, dtype=torch.long, device=device)

    def reference_step(net: nn.Module) -> float:
        """Seconds per step of one trajectory: forward, backward, torch.optim.Adam on every parameter."""
        optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
        for count in (3, 20):  # warm-up, then timed
            sync(device)
            start = time.perf_counter()
            for _ in range(count):
                optimiser.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                optimiser.step()
            sync(device)
        return (time.perf_counter() - start) / 20

    users = reference_step(with_reference_layers(build_model({"name": "anml"}).to(device)))
    single = reference_step(build_model({"name": "anml"}).to(device))
    per_trajectory = sweep_step / len(lrs)
    print(
        f"unfrozen ANML (every parameter learns), same run: {len(lrs)} trajectories, {sweep.engine_name} engine, "
        f"{sweep_step * 1e3:.0f} ms/step ({per_trajectory * 1e3:.0f} ms per trajectory-step, incl. evaluations); "
        f"reference design, one trajectory with torch.optim.Adam on metacl's layers, {single * 1e3:.0f} ms/step"
    )
    print(
        f"  per trajectory-step: metacl ({sweep.engine_name}) is {single / per_trajectory:.1f}x the reference "
        f"({single * 1e3:.0f} / {per_trajectory * 1e3:.0f} ms); {users / per_trajectory:.1f}x the reference "
        f"on higherANML's layers, as its users run it ({users * 1e3:.0f} ms/step)"
    )
    print(
        f"  => 600 classes x 120 trajectories: metacl {per_trajectory * 1e3:.0f} ms x {SWEEP_STEPS:,} x "
        f"{SWEEP_TRAJECTORIES} = {per_trajectory * SWEEP_STEPS * SWEEP_TRAJECTORIES / 3600:.1f} h; reference "
        f"{single * 1e3:.0f} ms x {SWEEP_STEPS:,} x {SWEEP_TRAJECTORIES} = "
        f"{single * SWEEP_STEPS * SWEEP_TRAJECTORIES / 3600:.1f} h"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trajectories", type=int, default=120, help="multiple of 12 (the reference LRs)")
    parser.add_argument("--outputs", type=int, default=1000)
    parser.add_argument("--features", type=int, default=2304)
    parser.add_argument("--steps", type=int, default=150, help="steps to time (whole classes of 15)")
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument(
        "--trajectory-group",
        type=int,
        default=0,
        help="protocol.trajectory_group of the timed sweep (0 = as many as memory allows)",
    )
    parser.add_argument("--groups", default="", help="comma-separated group sizes to compare, e.g. 1,2,4,8,120")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the group comparison")
    parser.add_argument(
        "--group-updates",
        type=float,
        default=1.5e9,
        help="parameter updates per group measurement (steps = this / group parameters)",
    )
    parser.add_argument("--eager", action="store_true", help="no torch.compile fusion")
    parser.add_argument(
        "--saturate",
        type=float,
        default=0.0,
        help="also time the sweep on features scaled by this (30 saturates), denormals flushed and not",
    )
    parser.add_argument("--unfrozen-trajectories", type=int, default=4)
    parser.add_argument("--skip-unfrozen", action="store_true")
    parser.add_argument("--skip-frozen", action="store_true")
    parser.add_argument(
        "--reference-steps",
        type=int,
        default=200,
        help="timed steps of the reference design (after up to 10 warm-up steps)",
    )
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--floor", action="store_true", help="compile adam_floor.c with gcc, run it, print the ratio to its ns/update"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(hardware_summary(device), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        floor = AdamFloor(args.threads, tmp) if args.floor else None
        floor_ns = floor.run(echo=True) if floor else None
        if args.groups:
            groups(args, device, floor)
        ours = None if args.skip_frozen else frozen(args, device, floor_ns)
        if args.saturate and device.type == "cpu":
            saturated(args, device, floor_ns)
        after = floor.run() if floor and ours else None
        if after and ours:  # the machine may have changed speed while the sweep was timed
            print(
                f"  the floor again, right after: {after:.3f} ns per update; the sweep is "
                f"{ours['ns'] / after:.1f}x that"
            )
    if not args.skip_reference:
        reference_step = reference(args, device)
        if ours is not None:
            compare(ours, reference_step)
    if not args.skip_unfrozen:
        unfrozen(args, device)


if __name__ == "__main__":
    main()
