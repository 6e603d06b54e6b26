"""Weight fan-out: the time from the learner's publish until the last of N workers holds the new policy
version, for a FLUX.1 Kontext-size LoRA (rank 32 on every attention projection, bf16, ~105 MB), through

    redis      LoraStore with its bytes in Redis (one redis-server thread serves every worker)
    directory  LoraStore with its bytes in a directory (learner.lora_store=directory; records in Redis)
    ray        ray.put once, every worker ray.get (Ray's object store; measured for comparison)

Workers are separate processes, started and waiting before the publish; each polls the latest version
(redis, directory) or receives the object ref (ray), fetches the bytes and verifies their sha256 (what
LoraStore.load does before decoding; decoding costs the same whichever store). --scale shrinks the
LoRA for the larger worker counts so the benchmark stays within a few GiB: the result is multiplied
back by 1 / scale (all three are bandwidth-bound) and says so.

    nice -n 10 .venv/bin/python bench/bench_weight_fanout.py --workers 1 16 64 --scale 1 0.25 0.0625
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import redis

from services.blobstore import DirectoryBlobStore
from services.lora_store import LoraStore
from services.redis_server import EmbeddedRedis

NAMESPACE = "fanout:lora"


def worker(url: str, store: str, directory: str, ready, done) -> None:
    client = redis.Redis.from_url(url)
    blobs = DirectoryBlobStore(directory) if store == "directory" else None
    lora = LoraStore(client, namespace=NAMESPACE, blobs=blobs)
    ready.put(os.getpid())
    while (version := lora.latest_version()) is None:
        time.sleep(0.005)
    record = lora.get(version)
    lora.blobs.get(record.blob)  # fetched and sha256-verified
    done.put(time.time())


def fanout_store(url: str, store: str, workers: int, payload: bytes) -> float:
    client = redis.Redis.from_url(url)
    client.flushall()
    with tempfile.TemporaryDirectory(prefix="fanout-") as directory:
        ctx = mp.get_context("fork")
        ready, done = ctx.Queue(), ctx.Queue()
        procs = [
            ctx.Process(target=worker, args=(url, store, directory, ready, done)) for _ in range(workers)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        blobs = DirectoryBlobStore(directory) if store == "directory" else None
        lora = LoraStore(client, namespace=NAMESPACE, blobs=blobs)
        started = time.time()
        record = lora.blobs.put(payload, name="v0")  # LoraStore.publish's blob, then its record
        with client.pipeline(transaction=True) as pipe:
            pipe.hset(
                f"{NAMESPACE}:version:0",
                mapping={
                    "policy_version": "0",
                    "created_at": repr(started),
                    **{k: str(v) for k, v in record.to_dict().items()},
                },
            )
            pipe.zadd(f"{NAMESPACE}:versions", {"0": 0})
            pipe.set(f"{NAMESPACE}:latest", 0)
            pipe.execute()
        last = max(done.get(timeout=600) for _ in procs)
        for p in procs:
            p.join()
    return last - started


def fanout_ray(workers: int, payload: bytes) -> float:
    import hashlib

    import ray

    @ray.remote(num_cpus=0)
    class Worker:
        def hold(self, data) -> float:
            hashlib.sha256(data).hexdigest()
            return time.time()

    actors = [Worker.remote() for _ in range(workers)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    started = time.time()
    ref = ray.put(payload)
    last = max(ray.get([a.hold.remote(ref) for a in actors]))
    for a in actors:
        ray.kill(a)
    return last - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--scale", type=float, nargs="+", default=[1.0, 0.25, 0.0625], help="LoRA size per worker count"
    )
    parser.add_argument("--stores", nargs="+", default=["redis", "directory", "ray"])
    parser.add_argument("--ray-max-workers", type=int, default=16, help="Ray workers cost ~100 MB each")
    parser.add_argument("--json")
    args = parser.parse_args()
    from bench_lora_store import flux_lora  # this script's directory is on sys.path

    from services.codec import encode_tensors

    full = encode_tensors(flux_lora(rank=32, seed=0))
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "lora_bytes": len(full),
        "rows": [],
    }
    print(f"LoRA: {len(full) / 1e6:.1f} MB")
    if "ray" in args.stores:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=600 * 1024**2)
    with EmbeddedRedis() as server:
        for workers, scale in zip(args.workers, args.scale, strict=True):
            payload = full[: int(len(full) * scale)]
            for store in args.stores:
                if store == "ray" and workers > args.ray_max_workers:
                    continue
                seconds = (
                    fanout_ray(workers, payload)
                    if store == "ray"
                    else fanout_store(server.url, store, workers, payload)
                )
                row = {
                    "store": store,
                    "workers": workers,
                    "scale": scale,
                    "mb": len(payload) / 1e6,
                    "seconds": seconds,
                    "seconds_full_size": seconds / scale,
                }
                results["rows"].append(row)
                print(
                    json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
