"""Publish-and-load time of a FLUX.1 Kontext-size LoRA through the LoraStore.

The LoRA: rank 32 on every attention projection of FLUX.1 Kontext (19 dual-stream blocks: to_q, to_k,
to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out; 38 single-stream blocks: to_q, to_k,
to_v; all 3072x3072), synthetic bf16 tensors, on the embedded redis-server with AOF (or REDIS_URL).

    .venv/bin/python bench/bench_lora_store.py --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import redis
import torch

from services.blobstore import sha256_hex
from services.codec import decode_tensors, encode_tensors
from services.lora_store import LoraStore
from services.redis_server import redis_url_or_embedded

HIDDEN = 3072
DUAL_BLOCKS, SINGLE_BLOCKS = 19, 38
DUAL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
SINGLE_TARGETS = ["to_q", "to_k", "to_v"]


def flux_lora(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    modules = [f"transformer_blocks.{b}.attn.{t}" for b in range(DUAL_BLOCKS) for t in DUAL_TARGETS]
    modules += [
        f"single_transformer_blocks.{b}.attn.{t}" for b in range(SINGLE_BLOCKS) for t in SINGLE_TARGETS
    ]
    tensors = {}
    for module in modules:
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=g).bfloat16()
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(HIDDEN, rank, generator=g).bfloat16()
    return tensors


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def bench_store(store: LoraStore, lora: dict[str, torch.Tensor], repeats: int) -> dict:
    publish_s, load_s = [], []
    for i in range(repeats):
        # Perturb one element so every version is a distinct blob, as in training.
        lora[next(iter(lora))][0, 0] = float(i)
        record, seconds = timed(store.publish, lora)
        publish_s.append(seconds)
        loaded, seconds = timed(store.load, record.policy_version)
        load_s.append(seconds)
        assert all(torch.equal(loaded[k], v) for k, v in lora.items()), "round trip is not bit-exact"
    return {
        "size_mb": record.blob.size / 1e6,
        "publish_ms": 1000 * statistics.median(publish_s),
        "load_ms": 1000 * statistics.median(load_s),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lora = flux_lora(args.rank, seed=0)
    params = sum(t.numel() for t in lora.values())
    encoded, encode_s = timed(encode_tensors, lora)
    _, decode_s = timed(decode_tensors, encoded)
    _, sha_s = timed(sha256_hex, encoded)

    url, server = redis_url_or_embedded()
    try:
        client = redis.Redis.from_url(url)
        row = bench_store(LoraStore(client, "bench:lora"), lora, args.repeats)
        for key in client.scan_iter("bench:lora:*"):
            client.delete(key)
    finally:
        if server is not None:
            server.stop()

    print(f"LoRA: {len(lora)} tensors, {params / 1e6:.1f} M params (rank {args.rank}, bf16)")
    print(f"redis: {'embedded redis-server 6.2 (AOF everysec)' if server else url}")
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {args.threads}")
    print(
        f"parts: safetensors encode {1000 * encode_s:.0f} ms, decode {1000 * decode_s:.0f} ms, sha256 {1000 * sha_s:.0f} ms"
    )
    print()
    print("| size (MB) | publish median (ms) | load median (ms) |")
    print("|---:|---:|---:|")
    print(f"| {row['size_mb']:.1f} | {row['publish_ms']:.0f} | {row['load_ms']:.0f} |")


if __name__ == "__main__":
    main()
