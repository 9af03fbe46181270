"""Omniglot loading speed: first (preprocessing) load vs cached load, and augmentation throughput.

    python benchmarks/bench_meta_data.py [--data-dir DIR] [--size 28] [--split background] [--workers 1 4]

DIR holds the Omniglot zips (default: ../shared/data/omniglot next to the repository, else metacl's
data dir). Caches go to a temporary folder, so every run measures a cold first load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from metacl.core.environment import hardware_summary
from metacl.core.seeding import torch_generator
from metacl.meta.data import load_dataset, random_resized_crop
from metacl.meta.data.decode import default_workers

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(SHARED) if SHARED.is_dir() else None)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--split", default="background", choices=("background", "evaluation"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, default_workers()])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(hardware_summary(args.device), flush=True)

    for workers in dict.fromkeys(args.workers):
        with tempfile.TemporaryDirectory() as cache:
            options = dict(size=args.size, data_dir=args.data_dir, cache_dir=cache, device=args.device, quiet=True)
            start = time.perf_counter()
            data = load_dataset("omniglot", args.split, workers=workers, **options)
            first = time.perf_counter() - start
            start = time.perf_counter()
            again = load_dataset("omniglot", args.split, **options)
            cached = time.perf_counter() - start
            cache_mb = sum(p.stat().st_size for p in Path(cache).iterdir()) / 2**20
        assert torch.equal(data.images, again.images)
        print(
            f"omniglot {args.split} {args.size}px {tuple(data.images.shape)}: first load {first:.2f}s "
            f"({workers} worker(s)), cached load {cached:.3f}s, cache file {cache_mb:.1f} MiB"
        )

    batch = data.images[:64, 0].to(args.device)
    generator = torch_generator(0, "bench", device=args.device)
    random_resized_crop(batch, generator)
    repeats = 50
    start = time.perf_counter()
    for _ in range(repeats):
        random_resized_crop(batch, generator)
    if batch.is_cuda:
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - start) / repeats
    print(f"random_resized_crop on {tuple(batch.shape)} ({args.device}): {per_call * 1e3:.2f} ms per batch")


if __name__ == "__main__":
    main()
