"""Generation time of ShapesEdit samples (rendering, masks, instructions), per split and size.

Single process, single thread. Reports the best of --repeats runs (the least disturbed by other
processes on a shared machine) and the median.

    .venv/bin/python bench/bench_shapes.py --samples 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from rcgrpo.data.shapes import ShapesEditConfig, generate_shapes_edit


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}"
    )
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    print("| size | split | samples | best s | median s | samples/s (best) |")
    print("|---:|---|---:|---:|---:|---:|")
    for size in args.sizes:
        config = ShapesEditConfig(size=size)
        for split in ("train", "test"):
            times = []
            for repeat in range(args.repeats):
                start = time.perf_counter()
                generate_shapes_edit(args.samples, split, seed=repeat, config=config)
                times.append(time.perf_counter() - start)
            best = min(times)
            print(
                f"| {size} | {split} | {args.samples} | {best:.2f} | {statistics.median(times):.2f} "
                f"| {args.samples / best:.0f} |"
            )


if __name__ == "__main__":
    main()
