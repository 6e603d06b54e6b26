"""Reward server throughput and latency, micro-batching on vs off.

LC-T on a tiny random CLIP, CPU. The server runs in a child process (this script with --serve) so the
load generator does not share its interpreter; the load is `concurrency` clients each sending one
POST /v1/score after another over loopback HTTP (one item each by default, so any batching is across
requests; --items-per-request 8 sends rollout-group-sized requests).

    .venv/bin/python bench/bench_reward_server.py [--trials 5] [--items-per-request 1] [--out results.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKEN = "bench-token-0123456789abcdef"


def serve(args) -> None:
    import torch

    from reward_server.app import create_app
    from reward_server.settings import RewardServerSettings
    from services.http import serve as serve_forever

    torch.set_num_threads(args.threads)
    settings = RewardServerSettings(
        token=TOKEN,
        port=args.port,
        rewards={args.reward: 1.0},
        models={"clip": args.clip},
        batching={"enabled": args.batching == "on", "max_batch_size": 32, "max_wait_ms": args.max_wait_ms},
    )
    serve_forever(create_app(settings), "127.0.0.1", args.port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_item() -> dict:
    from rcgrpo.data.shapes import generate_shapes_edit
    from services.schemas import make_score_item

    sample = generate_shapes_edit(1, seed=0)[0]
    item = make_score_item("bench", 0, 0, sample.source, sample.target, sample.mask, caption=sample.caption)
    return item.model_dump(mode="json", exclude_none=True)


async def load(
    url: str, item: dict, concurrency: int, requests_per_client: int, items_per_request: int = 1
) -> tuple[float, list[float]]:
    """`concurrency` keep-alive connections, each sending one request after another.

    The requests are prebuilt bytes sent over raw asyncio streams: a general HTTP client costs ~5 ms of
    CPU per request in Python, which on a 2-core machine would measure the load generator, not the
    server.
    """
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"items": [{**item, "candidate_index": i} for i in range(items_per_request)]}).encode()
    request = (
        f"POST /v1/score HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []

    async def one_client(count: int):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for _ in range(count):
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    raise RuntimeError(f"POST /v1/score answered {status}")
        finally:
            writer.close()

    await asyncio.gather(*[one_client(2) for _ in range(2)])  # warm-up
    latencies.clear()
    start = time.perf_counter()
    await asyncio.gather(*[one_client(requests_per_client) for _ in range(concurrency)])
    return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def start_server(batching: str, clip: Path, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable,
        __file__,
        "--serve",
        "--batching",
        batching,
        "--port",
        str(port),
        "--clip",
        str(clip),
    ]
    command += ["--threads", str(args.threads), "--max-wait-ms", str(args.max_wait_ms)]
    return subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}), f"http://127.0.0.1:{port}"


def wait_ready(server: subprocess.Popen, url: str) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the reward server at {url} did not become ready")
        time.sleep(0.1)


def run(args) -> str:
    from rcgrpo.clip_scores import build_tiny_clip

    clip = build_tiny_clip(Path(tempfile.mkdtemp(prefix="bench-clip-")) / "tiny")
    item = make_item()
    # Both servers run side by side and the trials alternate between them, so load from other
    # processes on the machine falls on both alike; each cell is the median trial.
    servers = {batching: start_server(batching, clip, args) for batching in ("off", "on")}
    trials: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    try:
        for server, url in servers.values():
            wait_ready(server, url)
        for trial in range(args.trials):
            for concurrency in (1, 8, 32):
                for batching, (_, url) in servers.items():
                    per_client = max(args.requests_per_client, 64 // concurrency)  # >= 64 samples for p99
                    wall, latencies = asyncio.run(
                        load(url, item, concurrency, per_client, args.items_per_request)
                    )
                    cell = (
                        len(latencies) * args.items_per_request / wall,
                        percentile(latencies, 50),
                        percentile(latencies, 99),
                    )
                    trials.setdefault((batching, concurrency), []).append(cell)
                    print(
                        f"trial {trial} batching {batching} concurrency {concurrency}: {cell[0]:.1f} items/s",
                        flush=True,
                    )
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(30)
    rows = {key: sorted(cells)[len(cells) // 2] for key, cells in trials.items()}
    lines = [
        "| concurrency | batching | items/s | p50 ms | p99 ms | items/s over trials |",
        "| ---: | :--- | ---: | ---: | ---: | :--- |",
    ]
    for concurrency in (1, 8, 32):
        for batching in ("off", "on"):
            throughput, p50, p99 = rows[(batching, concurrency)]
            spread = ", ".join(f"{t[0]:.0f}" for t in trials[(batching, concurrency)])
            lines.append(
                f"| {concurrency} | {batching} | {throughput:.1f} | {p50 * 1000:.1f} | {p99 * 1000:.1f} | {spread} |"
            )
    ratios = {c: rows[("on", c)][0] / rows[("off", c)][0] for c in (1, 8, 32)}
    lines.append("")
    lines.append(
        "Throughput ratio batching on / off (medians): "
        + ", ".join(f"concurrency {c}: {r:.2f}x" for c, r in ratios.items())
    )
    lines.append("")
    lines.append(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, load average "
        f"{os.getloadavg()[0]:.1f} at the end; server torch threads {args.threads}; {args.trials} trials; "
        f"{args.requests_per_client} requests per client (64 at concurrency 1) of {args.items_per_request} "
        "item(s); max_batch_size 32, "
        f"max_wait_ms {args.max_wait_ms}."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batching", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    parser.add_argument("--reward", default="lc_t", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--requests-per-client", type=int, default=12)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--items-per-request", type=int, default=1, help="8: one rollout group per request")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    table = run(args)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
