"""Sustained load on the real reward server: throughput, latency over time, resident memory, 5xx count.

The server is `rcgrpo reward-server` in a child process (uvicorn over loopback HTTP, the tiny run's
rewards: region adherence, background PSNR and SSIM, ACD). `concurrency` keep-alive clients each send
one POST /v1/score after another for `duration` seconds; every request is one rollout group: 8 edits
of one ShapesEdit sample at the tiny run's 64 x 64, each with source, target, mask and its ACD value,
the groups drawn from 64 samples so the server does not see one body again and again. Reported per
window (a minute by default): requests and edits per second, p50 and p99 latency, the server's RSS; and
in all: RSS after warm-up and at the end, responses by status. The exit status is 1 if any answer was a
5xx or the connection failed.

    .venv/bin/python bench/soak_reward_server.py                           # 10 minutes at concurrency 32
    nice -n 19 .venv/bin/python bench/soak_reward_server.py --duration 60  # the reduced form
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "soak-token-0123456789abcdef"
GROUP_SIZE = 8
IMAGE_SIZE = 64  # ShapesEdit's default size: the tiny run's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_bodies(groups: int) -> list[bytes]:
    """One POST /v1/score body per rollout group: GROUP_SIZE edits (the group's own sample's target and
    the next samples' targets: a good edit and poor ones) with the group's source, target and mask."""
    import torch

    from rcgrpo.data.shapes import ShapesEditConfig, generate_shapes_edit
    from services.schemas import make_score_item

    samples = generate_shapes_edit(groups + GROUP_SIZE, seed=0, config=ShapesEditConfig(size=IMAGE_SIZE))
    generator = torch.Generator().manual_seed(0)
    bodies = []
    for g, sample in enumerate(samples[:groups]):
        items = []
        for i in range(GROUP_SIZE):
            edit = sample.target if i == 0 else samples[g + i].target
            items.append(
                make_score_item(
                    f"soak-{g}",
                    i,
                    0,
                    sample.source,
                    edit,
                    sample.mask,
                    caption=sample.caption,
                    target=sample.target,
                    acd=float(torch.rand((), generator=generator)),
                ).model_dump(mode="json", exclude_none=True)
            )
        bodies.append(json.dumps({"items": items}).encode())
    return bodies


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    from services.auth import TOKEN_ENV
    from services.config import RunConfig

    port = free_port()
    settings = workdir / "reward_server.yaml"
    settings.write_text(
        yaml.safe_dump({"host": "127.0.0.1", "port": port, "rewards": RunConfig().rewards}, sort_keys=False)
    )
    command = [sys.executable, "-m", "deploy.cli", "reward-server", "--config", str(settings)]
    env = {**os.environ, TOKEN_ENV: TOKEN, "HF_HUB_OFFLINE": "1"}
    log = (workdir / "reward_server.log").open("ab")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), (
        f"http://127.0.0.1:{port}"
    )


async def soak(url: str, bodies: list[bytes], concurrency: int, duration_s: float) -> list[tuple]:
    """(finished at, latency s, status) of every request; status 0: the connection failed.

    The requests are prebuilt bytes on raw asyncio streams (as bench_reward_server.py): a general HTTP
    client's CPU per request would load the 2-core machine more than the server does."""
    host, port = url.removeprefix("http://").split(":")
    requests = [
        (
            f"POST /v1/score HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    results: list[tuple] = []
    end = time.monotonic() + duration_s

    async def client(index: int) -> None:
        sent = index
        reader = writer = None
        while time.monotonic() < end:
            start = time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(requests[sent % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                await reader.readexactly(content_length(head))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                status, writer = 0, None  # reconnect for the next request
            results.append((time.monotonic(), time.monotonic() - start, status))
            sent += concurrency
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return results


def content_length(head: bytes) -> int:
    found = re.search(rb"(?i)content-length: *(\d+)", head)
    if found is None:
        raise ValueError(f"a response without Content-Length: {head[:200]!r}")
    return int(found.group(1))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 10 min)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--window", type=float, default=60.0, help="seconds per reported row")
    parser.add_argument("--groups", type=int, default=64, help="distinct request bodies")
    args = parser.parse_args()

    from bench_reward_server import wait_ready  # this script's folder is on sys.path

    bodies = request_bodies(args.groups)
    workdir = Path(tempfile.mkdtemp(prefix="rcgrpo-soak-"))
    server, url = start_server(workdir)
    try:
        wait_ready(server, url)
        memory = psutil.Process(server.pid)
        asyncio.run(soak(url, bodies, args.concurrency, 5.0))  # warm-up: imports, first allocations
        rss_start = memory.memory_info().rss
        rss_windows: list[int] = []
        started = time.monotonic()

        async def sample_rss() -> list[tuple]:
            async def sampler():
                while True:
                    await asyncio.sleep(args.window)
                    rss_windows.append(memory.memory_info().rss)

            task = asyncio.create_task(sampler())
            try:
                return await soak(url, bodies, args.concurrency, args.duration)
            finally:
                task.cancel()

        results = asyncio.run(sample_rss())
        rss_end = memory.memory_info().rss
    finally:
        server.terminate()
        server.wait(30)

    print(f"reward server soak: {args.duration:.0f} s at concurrency {args.concurrency}, {GROUP_SIZE} edits "
          f"of {IMAGE_SIZE}x{IMAGE_SIZE} per request; server log {workdir / 'reward_server.log'}")  # fmt: skip
    print("\n| window | requests/s | edits/s | p50 ms | p99 ms | server RSS MiB | 5xx |")
    print("|---|---|---|---|---|---|---|")
    windows = int(-(-args.duration // args.window))
    for w in range(windows):
        rows = [r for r in results if w * args.window <= r[0] - started < (w + 1) * args.window]
        span = min(args.window, args.duration - w * args.window)
        latencies = [r[1] for r in rows]
        rss = rss_windows[w] if w < len(rss_windows) else rss_end
        print(
            f"| {w * args.window:.0f}-{w * args.window + span:.0f} s | {len(rows) / span:.1f} | "
            f"{len(rows) * GROUP_SIZE / span:.0f} | {percentile(latencies, 50) * 1000:.0f} | "
            f"{percentile(latencies, 99) * 1000:.0f} | {rss / 2**20:.0f} | "
            f"{sum(500 <= r[2] < 600 for r in rows)} |"
        )
    statuses = Counter(r[2] for r in results)
    latencies = [r[1] for r in results]
    failed = sum(n for status, n in statuses.items() if status == 0 or status >= 500)
    print(
        f"\n{len(results)} requests ({len(results) * GROUP_SIZE} edits), {len(results) / args.duration:.1f}/s; "
        f"p50 {percentile(latencies, 50) * 1000:.0f} ms, p99 {percentile(latencies, 99) * 1000:.0f} ms; "
        f"statuses {dict(sorted(statuses.items()))} (0: connection failed); server RSS "
        f"{rss_start / 2**20:.0f} MiB after warm-up, {rss_end / 2**20:.0f} MiB at the end"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
