"""Time of one rollout group on the tiny editor, with and without text-attention capture (ACD).

A group of G = 8 candidates (RDP initial noise) at 64x64, 8 Euler steps, decoded to images, torch
threads = 2. Variants are run interleaved (round-robin) so that load from other processes on a shared
machine hits them alike; the median over the repeats is reported.

    .venv/bin/python bench/bench_rollout.py --repeats 20 --output /tmp/rollout.md   (then copy the table into BENCHMARKS.md)

`--flux-block` instead times one FLUX.1-Kontext-size dual-stream and single-stream block (dim 3072,
24 heads, 512 text + 4096 target + 4096 context tokens, i.e. 1024x1024) with and without capture,
with the peak extra memory and the output difference: the numbers that matter at training scale
(run it on a GPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rcgrpo.attention import (  # noqa: E402
    DEFAULT_ROWS_PER_CHUNK,
    TextAttentionCapture,
    TextAttentionCaptureProcessor,
    TextAttentionQuery,
    capture_text_attention,
)
from rcgrpo.config import MethodConfig  # noqa: E402
from rcgrpo.data.sample import EditSample  # noqa: E402
from rcgrpo.editor import load_editor  # noqa: E402
from rcgrpo.group import start_group  # noqa: E402
from rcgrpo.sampler import rollout  # noqa: E402
from rcgrpo.tiny_editor import build_tiny_editor  # noqa: E402

VARIANTS = {"no capture": None, "capture, layers=double (default)": "double", "capture, layers=all": "all"}


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def time_group(editor, cond, z, num_steps: int, layers: str | None) -> float:
    context = nullcontext() if layers is None else capture_text_attention(editor, layers)
    start = time.perf_counter()
    with context as cap:
        kwargs = None if cap is None else cap.attention_kwargs(cond)
        rollout(editor, cond, z, num_steps=num_steps, attention_kwargs=kwargs)
        if cap is not None:
            cap.attention_map()
    return time.perf_counter() - start


def flux_block_bench(batch: int, text: int, image: int, instruction: int, repeats: int) -> list[str]:
    """Time and peak memory of one FLUX-size block per kind, stock vs capturing processor."""
    from diffusers.models.transformers.transformer_flux import (
        FluxPosEmbed,
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dim, heads, head_dim = 3072, 24, 128
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, 2 * image, dim, generator=g, device=device, dtype=dtype)
    encoder = torch.randn(batch, text, dim, generator=g, device=device, dtype=dtype)
    temb = torch.randn(batch, dim, generator=g, device=device, dtype=dtype)
    ids = torch.zeros(text + 2 * image, 3, device=device)
    side = int(image**0.5)
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(
        -1, 2
    )
    ids[text:, 1:] = grid.repeat(2, 1).float().to(device)
    ids[text + image :, 0] = 1  # Kontext's context-image marker
    rotary = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    text_mask = torch.zeros(batch, text, dtype=torch.bool, device=device)
    text_mask[:, :instruction] = True
    kwargs = {"text_attention": TextAttentionQuery(text_mask=text_mask, num_target=image)}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    lines = [
        f"FLUX-size blocks on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, {dtype}, "
        f"batch {batch}, {text} text ({instruction} instruction) + {image} target + {image} context tokens, "
        f"median of {repeats}.",
        "",
        "| block | stock ms | capture ms | ratio | extra peak memory MiB | max abs output diff |",
        "|---|---|---|---|---|---|",
    ]
    torch.manual_seed(0)
    for name, block in (
        ("dual-stream", FluxTransformerBlock(dim, heads, head_dim)),
        ("single-stream", FluxSingleTransformerBlock(dim, heads, head_dim)),
    ):
        block = block.to(device, dtype).eval()
        stock = block.attn.processor
        results = {}
        for variant in ("stock", "capture"):
            capture = TextAttentionCapture([name], DEFAULT_ROWS_PER_CHUNK)
            if variant == "capture":
                block.attn.set_processor(TextAttentionCaptureProcessor(capture, stock))
            times, peak = [], 0
            with torch.no_grad():
                for i in range(repeats + 1):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                        before = torch.cuda.memory_allocated()
                    sync()
                    start = time.perf_counter()
                    out = block(
                        hidden,
                        encoder,
                        temb,
                        image_rotary_emb=rotary,
                        joint_attention_kwargs=kwargs if variant == "capture" else None,
                    )
                    sync()
                    if i:  # the first call is warm-up
                        times.append(time.perf_counter() - start)
                    if device.type == "cuda":
                        peak = max(peak, torch.cuda.max_memory_allocated() - before)
            results[variant] = (statistics.median(times), peak, out)
            block.attn.set_processor(stock)
        (stock_s, stock_peak, stock_out), (capture_s, capture_peak, capture_out) = results.values()
        diff = max(
            (a.float() - b.float()).abs().max().item() for a, b in zip(stock_out, capture_out, strict=True)
        )
        lines.append(
            f"| {name} | {stock_s * 1e3:.1f} | {capture_s * 1e3:.1f} | {capture_s / stock_s:.3f} | "
            f"{(capture_peak - stock_peak) / 2**20:.0f} | {diff:.1e} |"
        )
        del block
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="also write the markdown report to this file")
    parser.add_argument("--flux-block", action="store_true", help="time FLUX-size blocks instead (see above)")
    parser.add_argument("--flux-tokens", type=int, default=4096, help="target tokens (a square number)")
    parser.add_argument("--flux-batch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.flux_block:
        print("\n".join(flux_block_bench(args.flux_batch, 512, args.flux_tokens, 40, args.repeats)))
        return

    with tempfile.TemporaryDirectory() as directory:
        editor = load_editor(build_tiny_editor(os.path.join(directory, "tiny")))
    source = torch.rand(3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(args.size, args.size)
    mask[args.size // 4 : args.size * 3 // 4, args.size // 4 : args.size * 3 // 4] = 1
    sample = EditSample("bench", source, mask, "turn the blue circle red", caption="a red circle")
    cfg = MethodConfig(group_size=args.group_size, num_steps=args.steps)
    # the group's condition and RDP initial noise, as the rollout worker starts a group
    start = start_group(editor, cfg, sample, noise_seed=0)
    cond, z = start.cond, start.initial_latents
    h, w = start.mask_latent.shape

    seconds = {name: [] for name in VARIANTS}
    for i in range(args.warmup + args.repeats):
        for name, layers in VARIANTS.items():
            elapsed = time_group(editor, cond, z, args.steps, layers)
            if i >= args.warmup:
                seconds[name].append(elapsed)

    baseline = statistics.median(seconds["no capture"])
    tokens = (h // 2) * (w // 2)
    lines = [
        f"G={args.group_size}, {args.size}x{args.size} ({tokens} target + {tokens} context tokens, "
        f"{cond.text_mask.shape[1]} text tokens of which {int(cond.text_mask.sum())} instruction), "
        f"{args.steps} Euler steps + VAE decode, torch threads={args.threads}, "
        f"median of {args.repeats} runs (after {args.warmup} warm-up), variants interleaved.",
        "",
        "| variant | median ms / group | min ms | ratio to no capture |",
        "|---|---|---|---|",
    ]
    for name, values in seconds.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median * 1e3:.1f} | {min(values) * 1e3:.1f} | {median / baseline:.3f} |")
    lines += [
        "",
        f"Command: `.venv/bin/python {' '.join(sys.argv)}`",
        f"Machine: nproc={len(os.sched_getaffinity(0))}, CPU: {cpu_model()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]
    report = "\n".join(lines)
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(
                "# Rollout group: attention capture overhead (bench/bench_rollout.py)\n\n" + report + "\n"
            )


if __name__ == "__main__":
    main()
