"""Median wall time of one rc_grpo_step (G=8, B=4, K=4, 64x64, tiny editor).

    .venv/bin/python bench/bench_train_step.py [--threads 2] [--repeats 20] [--device cpu]

The tiny editor is built into a temporary directory; one scored group is rolled out once and reused, so
the timing covers exactly one training step: B*K one-step predictions with gradient, the surrogate
loss, backward, gradient clipping and the AdamW step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from rcgrpo.advantages import group_advantages
    from rcgrpo.config import MethodConfig
    from rcgrpo.data.sample import EditSample
    from rcgrpo.editor import load_editor
    from rcgrpo.group import sample_group
    from rcgrpo.lora import add_lora
    from rcgrpo.tiny_editor import build_tiny_editor
    from rcgrpo.train_step import make_optimizer, rc_grpo_step

    cfg = MethodConfig(group_size=8, anchors=4, steps_per_anchor=4, num_steps=8)
    size = args.size
    with tempfile.TemporaryDirectory() as tmp:
        editor = load_editor(build_tiny_editor(f"{tmp}/tiny"), device=args.device, dtype="float32")
    add_lora(editor.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    optimizer = make_optimizer(editor.transformer, cfg)
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(3, size, size, generator=generator)
    mask = torch.zeros(size, size)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    sample = EditSample("bench", source, mask, "make the square red", caption="a red square")
    group = sample_group(editor, cfg, sample, noise_seed=0)  # every grid state kept
    rewards = group.rollout.images.mean(dim=(1, 2, 3)).cpu()
    train_group = group.train_group(group_advantages(rewards))

    times = []
    for i in range(args.warmup + args.repeats):
        if editor.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        stats = rc_grpo_step(editor, optimizer, [train_group], cfg, generator)
        if editor.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    tokens = group.rollout.states.shape[2]
    print(
        f"rc_grpo_step G={cfg.group_size} B={cfg.anchors} K={cfg.steps_per_anchor} {size}x{size} "
        f"({tokens} target + {tokens} context tokens) device={editor.device} threads={args.threads} "
        f"torch={torch.__version__} cpu={platform.processor() or platform.machine()}"
    )
    print(
        f"median {statistics.median(times) * 1e3:.1f} ms  min {min(times) * 1e3:.1f} ms  "
        f"max {max(times) * 1e3:.1f} ms  over {len(times)} steps (last loss {stats.loss:.3g}, "
        f"grad_norm {stats.grad_norm:.3g})"
    )


if __name__ == "__main__":
    main()
