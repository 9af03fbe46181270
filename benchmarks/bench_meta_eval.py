"""Speed of the meta-test sweep: the frozen-encoder LR x runs sweep and the unfrozen flavour.

    python benchmarks/bench_meta_eval.py                 # 12 LRs x 10 runs, ANML-sized head
    python benchmarks/bench_meta_eval.py --device cuda

Frozen: times `steps` sequential steps of all T trajectories of a 1000 x 2305 linear head (fc
plus bias) and one evaluation of every trajectory on 600 classes (12,000 images), then
extrapolates to the full 600-class sweep (9,000 steps + final evaluation). The dense Adam update
touches T x 1000 x 2305 parameters per step (read W, m, v; write W, m, v), so it is memory-bound:
the script prints the achieved ns per parameter update and GB/s. `adam_floor.c` beside it
measures the arithmetic alone (state held in cache), the floor under any exact implementation.

Groups (--groups 1,2,4,8,120): the same fused step on groups of G trajectories, each group
advanced on its own (as protocol.trajectory_group=G runs the sweep): a small group keeps its
weights and Adam moments (28 MB for one ANML head) in the last-level cache, a large one streams
them from DRAM every step. Sizes are measured interleaved, `--repeats` times, and the medians
printed with the load average, since the machine may be shared.

Unfrozen: ms per step of every parameter of a (random) ANML learning, for T trajectories under
vmap and, as the reference does it, one trajectory with torch.optim.Adam.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from metacl.meta.eval.adam import FusedLinearStep, linear_step, step_scalars
from metacl.meta.eval.protocol import REFERENCE_LRS, ProtocolConfig, Sweep, draw_tasks

FULL_SWEEP_UPDATES = 9000 * 120 * 1000 * 2305
"""Parameter updates of the full 600-class sweep: 9,000 steps x 120 trajectories x a 1000 x 2305 head."""


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def frozen(args: argparse.Namespace, device: torch.device) -> None:
    runs = args.trajectories // len(REFERENCE_LRS)
    protocol = ProtocolConfig(classes=[600], lrs=list(REFERENCE_LRS), runs=runs, compile=not args.eager,
                              memory_gb=args.memory_gb, trajectory_group=args.trajectory_group)
    images = torch.rand(659, 20, args.features, device=device)
    sweep = Sweep(Features(args.features, args.outputs).to(device), images, protocol, seed=0)
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
    print(f"frozen sweep: T={trajectories} trajectories in groups of {args.trajectory_group or 'all (memory)'}, "
          f"head {args.outputs} x {args.features + 1}, {'eager' if args.eager else 'compiled'}, "
          f"{torch.get_num_threads()} threads, device {device}, load average {load()}")
    print(f"  warm-up (compile) {warm:.1f} s; {steps} steps in {elapsed:.1f} s = {per_step * 1e3:.1f} ms/step "
          f"for all trajectories, {per_step / params * 1e9:.2f} ns per parameter update "
          f"(~{28 * params / per_step / 1e9:.1f} GB/s at 28 bytes/parameter)")
    # one evaluation of every trajectory at 600 classes
    tasks = draw_tasks(659, 20, 600, 15, 5, runs, 0, "bench")
    table = torch.cat([sweep.features(), torch.ones(len(sweep.features()), 1, device=device)], 1)
    chunk = min(trajectories, sweep._chunk(6 * args.outputs * (args.features + 1) * 4, trajectories))
    weight = torch.randn(chunk, args.outputs, args.features + 1, device=device) * 0.02
    index = torch.arange(chunk)
    acc = {k: torch.zeros(1, chunk, 600).numpy() for k in ("train", "test", "train5", "test5")}
    start = time.perf_counter()
    sweep._record_linear(acc, 0, index, weight, table, tasks, index // len(REFERENCE_LRS),
                         tasks.class_ids.to(device))
    sync(device)
    evaluation = (time.perf_counter() - start) * trajectories / chunk
    total = per_step * 9000 + evaluation
    print(f"  evaluation of all {trajectories} trajectories on 600 classes (12,000 images): {evaluation:.1f} s")
    print(f"  => full 600-class sweep ({trajectories} trajectories, 9,000 steps, final evaluation): "
          f"{total:.0f} s = {total / 60:.1f} min (reference design: 19 ms/step x 9,000 x 120 = 5.7 h)")


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def groups(args: argparse.Namespace, device: torch.device) -> None:
    """ns per parameter update of the fused step for each group size, interleaved and repeated."""
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
            logits = s["step"](*s["tensors"], logits, table[order[:, k]], targets[:, k], table[order[:, k + 1]],
                               neg_step.to(device), torch.tensor(bc2_sqrt, dtype=torch.float64))
        sync(device)
        s["done"] += steps
        return (time.perf_counter() - start) / steps / (g * args.outputs * width) * 1e9

    start = time.perf_counter()
    for g in sizes:
        advance(g, 2)
    print(f"group sizes {sizes}: warm-up (compile) {time.perf_counter() - start:.0f} s, "
          f"{torch.get_num_threads()} threads, device {device}")
    measured = {g: [] for g in sizes}
    for repeat in range(args.repeats):
        for g in sizes if repeat % 2 == 0 else sizes[::-1]:  # alternate the order against drifting load
            measured[g].append(advance(g, max(3, int(args.group_updates // (g * args.outputs * width)))))
        print(f"  repeat {repeat}: load {load()}: " +
              ", ".join(f"G={g} {measured[g][-1]:.2f}" for g in sizes) + " ns/update", flush=True)
    for g in sizes:
        ns = statistics.median(measured[g])
        print(f"  G={g:4d}: median {ns:.2f} ns/update (min {min(measured[g]):.2f}) => full sweep "
              f"{ns * FULL_SWEEP_UPDATES / 1e9 / 60:.0f} min of steps")
    print(f"  load average after: {load()}")


def unfrozen(args: argparse.Namespace, device: torch.device) -> None:
    from metacl.models import build_model
    model = build_model({"name": "anml"}).to(device)
    images = torch.rand(20, 20, 1, 28, 28, device=device)
    lrs = list(REFERENCE_LRS[:args.unfrozen_trajectories])
    protocol = ProtocolConfig(classes=[1], lrs=lrs, runs=1, opt_params=["all"], memory_gb=args.memory_gb)
    sweep = Sweep(model, images, protocol, seed=0)
    sweep.run(1)
    sync(device)
    start = time.perf_counter()
    sweep.run(2)
    sync(device)
    vmapped = (time.perf_counter() - start) / 30
    net = build_model({"name": "anml"}).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = images[0, :1], torch.zeros(1, dtype=torch.long, device=device)
    for _ in range(3):
        optimiser.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimiser.step()
    sync(device)
    start = time.perf_counter()
    for _ in range(20):
        optimiser.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimiser.step()
    sync(device)
    single = (time.perf_counter() - start) / 20
    print(f"unfrozen ANML: {len(lrs)} trajectories under vmap {vmapped * 1e3:.0f} ms/step "
          f"({vmapped / len(lrs) * 1e3:.0f} ms per trajectory-step, incl. evaluations); one trajectory with "
          f"torch.optim.Adam {single * 1e3:.0f} ms/step")
    print(f"  => 600 classes x 120 trajectories: {min(vmapped / len(lrs), single) * 9000 * 120 / 3600:.1f} h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trajectories", type=int, default=120, help="multiple of 12 (the reference LRs)")
    parser.add_argument("--outputs", type=int, default=1000)
    parser.add_argument("--features", type=int, default=2304)
    parser.add_argument("--steps", type=int, default=150, help="steps to time (whole classes of 15)")
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument("--trajectory-group", type=int, default=0,
                        help="protocol.trajectory_group of the timed sweep (0 = as many as memory allows)")
    parser.add_argument("--groups", default="", help="comma-separated group sizes to compare, e.g. 1,2,4,8,120")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the group comparison")
    parser.add_argument("--group-updates", type=float, default=1.5e9,
                        help="parameter updates per group measurement (steps = this / group parameters)")
    parser.add_argument("--eager", action="store_true", help="no torch.compile fusion")
    parser.add_argument("--unfrozen-trajectories", type=int, default=4)
    parser.add_argument("--skip-unfrozen", action="store_true")
    parser.add_argument("--skip-frozen", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.groups:
        groups(args, device)
    if not args.skip_frozen:
        frozen(args, device)
    if not args.skip_unfrozen:
        unfrozen(args, device)


if __name__ == "__main__":
    main()
