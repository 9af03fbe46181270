"""Time per epoch of the sequential-mastery paper preset, against the reference's data design.

metacl keeps the whole uint8 dataset on the device, builds each 1,500-trial batch by tensor
indexing, runs the model in channels_last memory order and, on CPU, tunes glibc malloc so that a
batch's gigabytes of activations are reused instead of page-faulted in again
(metacl/core/allocator.py); the reference read every trial from HDF5 through a torch
DataLoader and ran NCHW. This script times both on the same hardware and the same model (the
paper's 3.15M-parameter cnn-mlp at 120x160), timing a few batches and extrapolating to a
45,000-trial epoch plus its test pass.

The allocator setting is process-wide and cannot be undone, so every timing runs in its own
fresh subprocess (MALLOC_* variables removed from its environment): metacl as it runs (tuned)
and, for reference, with glibc's defaults; the reference as its users run it (glibc's
defaults) and with the same allocator setting as metacl. Both ratios are printed.

    python benchmarks/bench_mastery.py                     # CPU, or CUDA when available
    python benchmarks/bench_mastery.py --device cpu --batches 2 --reference-workers 0 2
    python benchmarks/bench_mastery.py --batches 1 --num-images 400 --reference-images 400 \
        --batch-size 100 --image-size 32 48 --reference-workers 0      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from metacl.core import allocator
from metacl.core.device import resolve_device
from metacl.core.environment import hardware_summary
from metacl.mastery.data import to_device
from metacl.mastery.experiment import evaluate
from metacl.models import build_model

EPOCH_TRIALS, TEST_IMAGES = 45_000, 5_000
BATCH = 1500  # set from --batch-size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_scenes(num_images: int, height: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, height, width, 3), dtype=torch.uint8, generator=generator)
    labels = (torch.rand(num_images, 30, generator=generator) < 0.45).to(torch.uint8)
    return images, labels


def paper_model(device: torch.device, height: int, width: int, channels_last: bool = False):
    model = build_model({"name": "cnn-mlp", "image_size": [height, width]}).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-4)
    return model, optimizer


def step(model, optimizer, x, query, target) -> None:
    loss = F.cross_entropy(model(x, query), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_resident(device, images, labels, batches: int) -> dict[str, float]:
    """metacl's design: resident uint8 tensors, batches by indexing."""
    height, width = images.shape[1:3]
    data = to_device(images, labels, 0.1, device)
    model, optimizer = paper_model(device, height, width, channels_last=True)  # as metacl.mastery runs it
    generator = torch.Generator().manual_seed(1)
    times, load_times = [], []
    for i in range(batches + 1):
        index = torch.randint(0, data.num_train, (BATCH,), generator=generator).to(device)
        task = torch.randint(0, 10, (BATCH,), generator=generator).to(device)
        sync(device)
        start = time.perf_counter()
        target = data.labels[index, task].long()
        x, query = data.batch(index), F.one_hot(task, 30).float()
        sync(device)
        loaded = time.perf_counter()
        step(model, optimizer, x, query, target)
        sync(device)
        if i:  # the first batch warms up kernels and allocator
            times.append(time.perf_counter() - start)
            load_times.append(loaded - start)
    per_batch = float(np.median(times))
    results = {
        "train_s_per_batch": per_batch,
        "load_s_per_batch": float(np.median(load_times)),
        "train_s_per_epoch": per_batch * EPOCH_TRIALS / BATCH,
    }
    for tasks in (1, 10):
        sync(device)
        start = time.perf_counter()
        evaluate(model, data, list(range(tasks)), 2500)
        sync(device)
        results[f"test_s_{tasks}_tasks"] = (time.perf_counter() - start) * TEST_IMAGES / data.num_test
    return results


class ReferenceDataset(torch.utils.data.Dataset):
    """The reference design: each item reads its image, query row and label from HDF5."""

    def __init__(self, path: Path, tasks: np.ndarray):
        self.path, self.tasks, self.file = path, tasks, None

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int):
        if self.file is None:  # one handle per worker process
            self.file = h5py.File(self.path, "r")
        task = int(self.tasks[i])
        image = torch.from_numpy(self.file["X"][i]).permute(2, 0, 1).float() / 255.0
        query = torch.from_numpy(self.file["Q"][i, task].astype(np.float32))
        label = int(self.file["y"][i, task])
        return image, query, label


def write_reference_file(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    n = images.shape[0]
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=images.numpy(), chunks=(1, *images.shape[1:]))
        f.create_dataset("y", data=labels.numpy())
        f.create_dataset("Q", data=np.broadcast_to(np.eye(30, dtype=np.uint8), (n, 30, 30)), chunks=(1, 30, 30))
        f.create_dataset("D", data=np.full((n, 5, 3), 255, np.uint8))


def time_reference(device, path: Path, num_items: int, batches: int, workers: int) -> dict[str, float]:
    """Per-item HDF5 reads through a DataLoader (shuffled), then the same model step."""
    tasks = np.random.default_rng(0).integers(0, 10, num_items)
    loader = torch.utils.data.DataLoader(
        ReferenceDataset(path, tasks),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )
    with h5py.File(path, "r") as f:
        height, width = f["X"].shape[1:3]
    model, optimizer = paper_model(device, height, width)
    times, load_times = [], []
    iterator = iter(loader)
    for i in range(batches + 1):
        start = time.perf_counter()
        image, query, label = next(iterator)
        loaded = time.perf_counter()
        step(model, optimizer, image.to(device), query.to(device), label.to(device))
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
            load_times.append(loaded - start)
    per_batch = float(np.median(times))
    return {
        "train_s_per_batch": per_batch,
        "load_s_per_batch": float(np.median(load_times)),
        "train_s_per_epoch": per_batch * EPOCH_TRIALS / BATCH,
    }


def child(args) -> dict:
    """One timing in this (fresh) process, with the allocator as asked (set, as a mastery run
    does, once the data is in memory)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    height, width = args.image_size
    if args.child == "metacl":
        images, labels = synthetic_scenes(args.num_images, height, width)
    if args.allocator == "tuned":
        tuning = allocator.tune_malloc()
        if not tuning.tuned:
            raise SystemExit(f"allocator not tuned: {tuning.detail}")
    if args.child == "metacl":
        return time_resident(device, images, labels, args.batches)
    return time_reference(device, Path(args.reference_file), args.reference_images, args.batches, args.workers)


def run_child(args, kind: str, alloc: str, workers: int = 0, reference_file: str = "") -> dict:
    """Run `child` in a fresh interpreter: MALLOC_* variables removed, METACL_MALLOC_TUNING as
    the allocator setting asks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env[allocator.ENV_VAR] = "1" if alloc == "tuned" else "0"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        kind,
        "--allocator",
        alloc,
        "--workers",
        str(workers),
        "--reference-file",
        reference_file,
        "--device",
        args.device,
        "--batches",
        str(args.batches),
        "--num-images",
        str(args.num_images),
        "--reference-images",
        str(args.reference_images),
        "--batch-size",
        str(args.batch_size),
        "--image-size",
        *map(str, args.image_size),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} ({alloc} allocator) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batches", type=int, default=3, help="timed batches (after one warm-up)")
    parser.add_argument(
        "--num-images",
        type=int,
        default=50_000,
        help="resident images (50,000 is the paper's; fewer saves memory, not time)",
    )
    parser.add_argument(
        "--reference-images",
        type=int,
        default=1500 * 4,
        help="images in the reference-layout HDF5 file for the DataLoader timing",
    )
    parser.add_argument(
        "--reference-workers",
        type=int,
        nargs="+",
        default=[0, 2],
        help="DataLoader worker counts to time for the reference design",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=1500, help="trials per batch (the paper's 1,500)")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=[120, 160],
        metavar=("H", "W"),
        help="image height and width (the paper's 120 160)",
    )
    parser.add_argument("--child", choices=["metacl", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=["default", "tuned"], help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--reference-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    BATCH = args.batch_size
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    height, width = args.image_size
    epoch = f"{EPOCH_TRIALS:,}-trial epoch"
    print(hardware_summary(device), flush=True)
    cpu = device.type == "cpu"
    allocations = ["tuned", "default"] if cpu else ["default"]
    ours = {alloc: run_child(args, "metacl", alloc) for alloc in allocations}
    for alloc, result in ours.items():
        label = "as metacl runs it" if alloc == allocations[0] else "glibc's default allocator"
        print(
            f"metacl resident tensors, {label}: {result['train_s_per_batch']:.3f} s/batch "
            f"(batch assembly {result['load_s_per_batch']:.3f} s) -> "
            f"{result['train_s_per_epoch']:.1f} s per {epoch}; test pass on 5,000 images: "
            f"{result['test_s_1_tasks']:.2f} s for 1 task, {result['test_s_10_tasks']:.2f} s "
            f"for 10 tasks",
            flush=True,
        )
    metacl = ours[allocations[0]]["train_s_per_epoch"]
    images, labels = synthetic_scenes(args.reference_images, height, width)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference.h5"
        write_reference_file(path, images, labels)
        for workers in args.reference_workers:
            ref = {
                alloc: run_child(args, "reference", alloc, workers, str(path))
                for alloc in ("default", "tuned" if cpu else "default")
            }
            for alloc, result in ref.items():
                label = (
                    "glibc's default allocator, as its users run it"
                    if alloc == "default"
                    else "the same allocator setting as metacl"
                )
                print(
                    f"reference per-item HDF5 + DataLoader ({workers} workers), {label}: "
                    f"{result['train_s_per_batch']:.3f} s/batch (loading "
                    f"{result['load_s_per_batch']:.3f} s) -> {result['train_s_per_epoch']:.1f} s "
                    f"per epoch",
                    flush=True,
                )
            as_run = ref["default"]["train_s_per_epoch"]
            print(
                f"  metacl is {as_run / metacl:.1f}x the reference ({workers} workers) as its "
                f"users run it: {as_run:.1f} s (reference, default allocator) / {metacl:.1f} s "
                f"(metacl) per epoch on this machine",
                flush=True,
            )
            if "tuned" in ref:
                same = ref["tuned"]["train_s_per_epoch"]
                print(
                    f"  metacl is {same / metacl:.1f}x the reference ({workers} workers) with the "
                    f"same allocator setting: {same:.1f} s (reference, tuned allocator) / "
                    f"{metacl:.1f} s (metacl) per epoch",
                    flush=True,
                )


if __name__ == "__main__":
    main()
