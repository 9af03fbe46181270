"""Scenes generator throughput: images per second on CPU (and GPU when present), and the
projected time for the 50,000-image dataset. Target: 50k images at 160x120 in <= 10 minutes on
2 CPU cores (>= 84 images/s).

    python benchmarks/bench_scenes.py [--images 2048] [--threads 2] [--height 120 --width 160]

Measures the whole pipeline (layout sampling, visibility resampling, rendering) but not the HDF5
write; the one-off sprite-atlas build is timed separately since it is paid once per process.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from metacl.core.environment import hardware_summary
from metacl.scenes.generate import DEFAULT_BATCH_SIZE, render_images
from metacl.scenes.render import SceneRenderer

FULL_DATASET = 50_000
TARGET_SECONDS = 600


def measure(device: str, images: int, height: int, width: int, batch_size: int) -> None:
    start = time.perf_counter()
    renderer = SceneRenderer(height, width, device)
    atlas_s = time.perf_counter() - start
    render_images(0, np.arange(batch_size), renderer)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for first in range(0, images, batch_size):
        render_images(0, np.arange(first, min(images, first + batch_size)), renderer)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    rate = images / wall
    projected = FULL_DATASET / rate + atlas_s
    verdict = "meets" if projected <= TARGET_SECONDS else "MISSES"
    print(
        f"{device}: {rate:.1f} images/s ({images} images at {height}x{width}, batch {batch_size}, "
        f"{torch.get_num_threads()} threads, CPU time {cpu:.1f}s for {wall:.1f}s wall); "
        f"atlas build {atlas_s:.1f}s; projected 50k: {projected / 60:.1f} min ({verdict} the 10 min target)"
    )
    if device == "cpu":
        # On a shared machine wall time includes other users' load; CPU time does not.
        print(
            f"cpu: {images / cpu:.1f} images per CPU-second "
            f"(projected 50k on {torch.get_num_threads()} dedicated thread(s) at perfect scaling: "
            f"{FULL_DATASET * cpu / images / torch.get_num_threads() / 60:.1f} min)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(hardware_summary("cpu"), flush=True)
    if torch.cuda.is_available():
        print(hardware_summary("cuda"), flush=True)
    measure("cpu", args.images, args.height, args.width, args.batch_size)
    if torch.cuda.is_available():
        measure("cuda", max(args.images, 8192), args.height, args.width, 1024)


if __name__ == "__main__":
    main()
