"""Meta-training speed and memory: seconds per episode, episodes/s, peak memory, flatness.

    python benchmarks/bench_meta_train.py                    # ANML, second order, CPU
    python benchmarks/bench_meta_train.py --device cuda --episodes 200
    python benchmarks/bench_meta_train.py --model oml --algorithm sequential_episodic

    python benchmarks/bench_meta_train.py --episodes 2 --warmup 1 --reference-episodes 1  # smoke

Episodes are the paper's (20 inner steps of batch 1, 64 remember images) on Omniglot-sized
synthetic data (964 classes x 20 images; speed does not depend on the pixels). Memory must stay
flat across episodes: the script compares resident (CPU) or allocated (CUDA) memory after the
warm-up with the end. `--inner-grad func` times torch.func.grad for the inner gradients instead
of autograd.grad.

The reference design (higherANML's, built on the `higher` library) is timed in the same run, on
the same machine, with the same episodes (a second EpisodeSampler on the same seed) and a copy of
the same initial model: zap the inner class's output rows, `higher.innerloop_ctx(model,
SGD(inner parameters, lr=0.1), copy_initial_weights=False)`, one `diffopt.step(loss)` per
trajectory image, the meta-loss on all the episode's images through the final fast weights,
`.backward()`, an Adam step (lr 1e-3) on every parameter. The script prints both medians and
their ratio; the project's target is metacl at least 8x the reference's speed on CPU.

The reference is timed twice. First as its users run it: higherANML's layers (nn.Conv2d,
nn.InstanceNorm2d, ReLU, then the native max-pool; `with_reference_layers`) and, on CPU, glibc's
default allocator. Then the design alone: metacl's layers (the same function through faster
kernels) and metacl's CPU settings (its allocator, denormals flushed while it trains). On CPU,
metacl's meta-training tunes glibc malloc so that an episode's large activations are reused
instead of page-faulted in afresh (metacl/core/allocator.py); the setting is process-wide and
cannot be undone, so each reference runs in a process of its own, started first and warmed up
with one episode. The three then take turns: one episode of each reference, then a share of
metacl's episodes, round after round, so that a slow spell of the machine falls on all three
alike instead of on whichever was timed during it. The ratios compare medians. `--allocator
default` keeps glibc's defaults throughout. Only the `meta` algorithm has this reference
(`sequential_episodic` is printed alone), and it needs `higher` (`pip install higher`, or the
`dev` extra); `--skip-reference` leaves it out. Before timing, a check line compares the two
designs' meta-loss and meta-gradient on one episode from the same weights, in a process of its
own too (`--skip-check` leaves it out).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import multiprocessing
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from reference_layers import with_reference_layers

from metacl.core.allocator import tune_malloc
from metacl.core.denormals import denormals_flushed
from metacl.core.device import resolve_device
from metacl.core.environment import hardware_summary
from metacl.meta.train.algorithms import algorithm_class
from metacl.meta.train.algorithms.episodic import EpisodeConfig
from metacl.meta.train.episodes import Episode, EpisodeSampler
from metacl.meta.train.functional import FunctionalModel, meta_loss, zap_rows
from metacl.models import build_model, select_parameters

INNER_LR, OUTER_LR = EpisodeConfig.inner_lr, EpisodeConfig.outer_lr  # the defaults, used by both designs
MODELS = {  # spec, image size, inner parameters (as the configs in configs/meta/)
    "anml": ({"name": "anml"}, 28, ["rln", "fc"]),
    "sanml": ({"name": "sanml"}, 28, ["all"]),
    "oml": ({"name": "oml"}, 84, ["fc1", "fc"]),
}


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def memory_mb(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else resident_mb()


def use_func_inner_grads() -> None:
    """Swap autograd.grad for torch.func.grad in the inner loop (for the comparison only)."""
    from metacl.meta.train import functional

    def inner_loop(fmodel, params, inner_names, episode, lr, cycles, create_graph, shared):
        fast = dict(params)
        stats = functional.InnerStats([], [], 0)

        def step_loss(inner, rest, rows):
            logits = fmodel.logits({**rest, **inner}, episode.images, shared, rows)
            loss = F.cross_entropy(logits, episode.labels[rows])
            return loss, (loss.detach(), (logits.detach().argmax(1) == episode.labels[rows]).sum())

        grad = torch.func.grad(step_loss, has_aux=True)
        for rows in episode.inner_batches(cycles):
            inner = {n: fast[n] for n in inner_names}
            rest = {n: t for n, t in fast.items() if n not in inner}
            grads, (loss, correct) = grad(inner, rest, rows)
            fast.update({n: inner[n] - lr * grads[n] for n in inner_names})
            stats.losses.append(loss)
            stats.correct.append(correct)
            stats.count += rows.stop - rows.start
        return fast, stats

    functional.inner_loop = inner_loop


def load() -> str:
    """The load average: on a shared machine both timings below need a quiet one to compare."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_meta_loss(
    higher, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, episode: Episode
) -> torch.Tensor:
    """The reference (higherANML) episode up to `.backward()` of the meta-loss; returns the loss.

    One full forward pass per trajectory image and a differentiable SGD step through `higher`,
    then every image of the episode (trajectory and remember) through the final fast weights.
    """
    with higher.innerloop_ctx(model, inner_optimizer, copy_initial_weights=False) as (fmodel, diffopt):
        for rows in episode.inner_batches():
            diffopt.step(F.cross_entropy(fmodel(episode.images[rows]), episode.labels[rows]))
        rows = episode.meta_rows
        loss = F.cross_entropy(fmodel(episode.images[rows]), episode.labels[rows])
        loss.backward()
    return loss.detach()


def check_equivalence(higher, model: torch.nn.Module, inner_names: list[str], episode: Episode) -> str:
    """Meta-loss and meta-gradient of both designs on one episode from the same weights."""
    ours, ref = copy.deepcopy(model), with_reference_layers(model)
    params = dict(ours.named_parameters())
    loss, _, _ = meta_loss(
        FunctionalModel(ours, inner_names), params, inner_names, episode, INNER_LR, 1, create_graph=True
    )
    grads = torch.autograd.grad(loss, list(params.values()), materialize_grads=True)
    ref_params = dict(ref.named_parameters())
    inner = torch.optim.SGD([ref_params[n] for n in inner_names], lr=INNER_LR)
    ref_loss = reference_meta_loss(higher, ref, inner, episode)
    ref_grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in ref_params.values()]
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(grads, ref_grads))
    grad_scale = max(float(b.abs().max()) for b in ref_grads)
    loss = loss.detach()
    loss_diff = abs(float(loss) - float(ref_loss))
    ok = loss_diff <= 1e-4 * max(1.0, abs(float(ref_loss))) and grad_diff <= 1e-3 * grad_scale
    return (
        f"check (one episode, same weights, not timed): meta-loss metacl {float(loss):.6f} vs "
        f"higher {float(ref_loss):.6f} (|diff| {loss_diff:.1e}); meta-gradient max |diff| "
        f"{grad_diff:.1e} (max |grad| {grad_scale:.1e}) -> {'agree' if ok else 'DIFFER'}"
    )


def checked_episode(model_name: str, device: str, threads: int | None) -> str:
    """`check_equivalence` on the benchmark's initial model and one episode of another seed."""
    import higher

    if threads:
        torch.set_num_threads(threads)
    model, images = setup(model_name, torch.device(device))
    inner_names = list(select_parameters(model, MODELS[model_name][2]))
    episode = EpisodeSampler(images, torch.Generator().manual_seed(1)).sample()
    return check_equivalence(higher, model, inner_names, episode)


def setup(model_name: str, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """The benchmark's initial model and images, the same in every process of the run (one seed)."""
    spec, size, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = build_model(spec).to(device)
    return model, torch.rand(964, 20, 1, size, size, device=device)


class ReferenceEpisodes:
    """The reference design's episodes on metacl's episode stream (the same seed, so the same
    episodes and zaps as metacl), each call one episode, returning its seconds."""

    def __init__(self, higher, model: torch.nn.Module, inner_prefixes: list[str], images: torch.Tensor, device):
        self.higher, self.model, self.device = higher, model, device
        self.generator = torch.Generator().manual_seed(0)
        self.sampler = EpisodeSampler(images, self.generator)
        self.inner = torch.optim.SGD(list(select_parameters(model, inner_prefixes).values()), lr=INNER_LR)
        self.outer = torch.optim.Adam(model.parameters(), lr=OUTER_LR)

    def __call__(self) -> float:
        t0 = time.perf_counter()
        sample = self.sampler.sample()
        zap_rows(self.model.fc.weight, sample.inner_classes, self.generator)
        reference_meta_loss(self.higher, self.model, self.inner, sample)
        self.outer.step()
        self.outer.zero_grad()
        sync(self.device)
        return time.perf_counter() - t0


def reference_worker(connection, model_name: str, device: str, threads: int | None, layers: str, tuned: bool) -> None:
    """A process that runs one reference episode whenever the benchmark asks, and sends back its
    seconds. Its own process, because the allocator setting cannot be undone: the reference as
    its users run it keeps glibc's defaults while metacl, in the parent, runs tuned."""
    import higher

    if threads:
        torch.set_num_threads(threads)
    if tuned:
        tune_malloc(huge_pages=True)
    device_ = torch.device(device)
    model, images = setup(model_name, device_)
    if layers == "reference":
        model = with_reference_layers(model)
    episodes = ReferenceEpisodes(higher, model, MODELS[model_name][2], images, device_)
    flush = denormals_flushed(device_) if layers == "metacl" else contextlib.nullcontext()
    with flush:
        episodes()  # warm-up
        connection.send("ready")
        while connection.recv() == "episode":
            connection.send(episodes())


class ReferenceProcess:
    """The parent's handle on a `reference_worker`: `episode()` runs one there and keeps its time."""

    def __init__(self, label: str, args: argparse.Namespace, device: torch.device, layers: str, tuned: bool):
        self.label, self.times = label, []
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(
            target=reference_worker, args=(child, args.model, str(device), args.threads, layers, tuned), daemon=True
        )
        self.process.start()
        if self.connection.recv() != "ready":
            raise RuntimeError(f"the reference process ({label}) did not start")

    def episode(self) -> None:
        self.connection.send("episode")
        self.times.append(self.connection.recv())

    def close(self) -> None:
        self.connection.send("stop")
        self.process.join(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="anml")
    parser.add_argument("--algorithm", choices=["meta", "sequential_episodic"], default="meta")
    parser.add_argument("--episodes", type=int, default=20, help="timed episodes")
    parser.add_argument("--warmup", type=int, default=3, help="untimed episodes first")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--inner-grad", choices=["autograd", "func"], default="autograd")
    parser.add_argument(
        "--reference-episodes",
        type=int,
        default=5,
        help="timed episodes of the reference design (higher), after 1 warm-up",
    )
    parser.add_argument("--skip-reference", action="store_true", help="do not time the reference design")
    parser.add_argument(
        "--allocator",
        choices=["tuned", "default"],
        default="tuned",
        help="tuned: as metacl meta train runs on CPU (glibc defaults for the reference's first timing)",
    )
    parser.add_argument(
        "--skip-check",
        action="store_true",
        help="do not compare the two designs' meta-loss and gradient on one episode",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.inner_grad == "func":
        use_func_inner_grads()
    device = resolve_device(args.device)
    print(hardware_summary(device), flush=True)
    model, images = setup(args.model, device)
    generator = torch.Generator().manual_seed(0)
    # one generator draws the episodes and zaps, as the reference design replays it
    trainer = algorithm_class(args.algorithm)(
        model,
        images,
        algorithm_class(args.algorithm).Config(inner_params=MODELS[args.model][2], outer_params=["all"]),
        {"sample": generator, "zap": generator},
    )

    higher, reference_note = None, None
    if args.skip_reference:
        reference_note = "reference not timed (--skip-reference)"
    elif args.algorithm != "meta":
        reference_note = (
            f"no reference design is timed for {args.algorithm} (the higher "
            "reference covers the second-order `meta` algorithm only)"
        )
    else:
        try:
            import higher
        except ImportError:
            reference_note = "reference not timed: the `higher` library is not installed (pip install higher)"
    if higher is not None and not args.skip_check:  # in its own process: metacl's heap stays as a training run's
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            print(pool.apply(checked_episode, (args.model, str(device), args.threads)), flush=True)

    tune = args.allocator == "tuned" and device.type == "cpu"
    references: list[ReferenceProcess] = []
    if higher is not None:
        glibc = ", glibc's default allocator" if device.type == "cpu" else ""
        settings = f", {'tuned' if tune else 'default'} allocator, denormals flushed" if device.type == "cpu" else ""
        references = [
            ReferenceProcess(f"higherANML's layers{glibc}: as its users run it", args, device, "reference", False),
            ReferenceProcess(f"metacl's layers{settings}: the design alone", args, device, "metacl", tune),
        ]
        print(f"  reference processes ready (one warm-up episode each), load average {load()}", flush=True)
    allocator = tune_malloc(huge_pages=True).detail if tune else "glibc defaults (not tuned)"
    print(f"allocator: {allocator}", flush=True)

    def episode() -> None:
        with denormals_flushed(device):  # as metacl meta train runs its steps
            trainer.step(0)
        sync(device)

    for _ in range(args.warmup):
        episode()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_memory = memory_mb(device)
    wall, cpu, memory = [], [], []
    rounds = max(1, args.reference_episodes) if references else 1
    for index in range(args.episodes):
        if references and index * rounds % args.episodes < rounds:  # a reference turn every episodes / rounds
            for reference in references:
                reference.episode()
        t0, c0 = time.perf_counter(), time.process_time()
        episode()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        memory.append(memory_mb(device))
    for reference in references:
        reference.close()
    median = statistics.median(wall)
    print(
        f"{args.model} {args.algorithm} on {device} ({torch.get_num_threads()} threads, "
        f"inner grads: {args.inner_grad}), {args.episodes} episodes after {args.warmup} warm-up"
        f"{', taking turns with the references' if references else ''}, load average {load()}"
    )
    print(
        f"  seconds/episode: median {median:.3f}  mean {statistics.mean(wall):.3f}  "
        f"min {min(wall):.3f}  (CPU time {statistics.median(cpu):.3f})"
    )
    print(f"  episodes/s: {1 / median:.2f}")
    if device.type == "cuda":
        print(f"  peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
        print(f"  25,000 episodes: {25000 * median / 60:.1f} min")
    print(f"  peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    # a leak (higher kept every episode's graph) grows by the graph size, hundreds of MiB, per
    # episode; allocator noise moves resident memory by tens of MiB either way
    half = len(memory) // 2
    growth = statistics.median(memory[half:]) - statistics.median(memory[:half] or memory)
    flat = growth < max(50.0, 0.05 * start_memory)
    print(
        f"  memory after warm-up {start_memory:.0f} MiB, over {args.episodes} episodes "
        f"{min(memory):.0f}-{max(memory):.0f} MiB: growth (median of the second half minus "
        f"the first) {growth:+.1f} MiB -> {'flat' if flat else 'GROWING'}",
        flush=True,
    )
    if not references:
        print(reference_note)
        return
    for reference in references:
        reference_median = statistics.median(reference.times)
        print(
            f"reference design (higher, higherANML's) with {reference.label}: {args.model} meta on "
            f"{device}, {len(reference.times)} episodes after 1 warm-up, in its own process, "
            "taking turns with metacl's"
        )
        print(
            f"  seconds/episode: median {reference_median:.3f}  mean {statistics.mean(reference.times):.3f}  "
            f"min {min(reference.times):.3f}"
        )
        print(
            f"metacl is {reference_median / median:.1f}x this reference on this machine: median "
            f"{reference_median:.3f} s/episode (higher) / {median:.3f} s/episode (metacl)"
        )


if __name__ == "__main__":
    main()
