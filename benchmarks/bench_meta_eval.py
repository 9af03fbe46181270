"""Speed of the meta-test sweep: the frozen-encoder LR x runs sweep and the unfrozen flavour.

    python benchmarks/bench_meta_eval.py                 # 12 LRs x 10 runs, ANML-sized head
    python benchmarks/bench_meta_eval.py --device cuda

Frozen: times `steps` sequential steps of all T trajectories of a 1000 x 2305 linear head (fc
plus bias) and one evaluation of every trajectory on 600 classes (12,000 images), then
extrapolates to the full 600-class sweep (9,000 steps + final evaluation). The dense Adam update
touches T x 1000 x 2305 parameters per step (read W, m, v; write W, m, v), so it is memory-bound:
the script prints the achieved ns per parameter update and GB/s.

Unfrozen: ms per step of every parameter of a (random) ANML learning, for T trajectories under
vmap and, as the reference does it, one trajectory with torch.optim.Adam.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from metacl.meta.eval.protocol import REFERENCE_LRS, ProtocolConfig, Sweep, draw_tasks


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
                              memory_gb=args.memory_gb)
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
    print(f"frozen sweep: T={trajectories} trajectories, head {args.outputs} x {args.features + 1}, "
          f"{'eager' if args.eager else 'compiled'}, {torch.get_num_threads()} threads, device {device}")
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
    parser.add_argument("--eager", action="store_true", help="no torch.compile fusion")
    parser.add_argument("--unfrozen-trajectories", type=int, default=4)
    parser.add_argument("--skip-unfrozen", action="store_true")
    parser.add_argument("--skip-frozen", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not args.skip_frozen:
        frozen(args, device)
    if not args.skip_unfrozen:
        unfrozen(args, device)


if __name__ == "__main__":
    main()
