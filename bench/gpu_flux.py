"""One-call GPU benchmark at FLUX.1 Kontext scale, no downloads: a randomly initialised full-size
FluxTransformer2DModel (19 + 38 blocks, dim 3072, the published config) in bf16. The text encoders
and the VAE would need weights, so the condition is random tensors of the real shapes (T5 512 x 4096,
CLIP pooled 768, context latents) and images are not decoded: every number is the transformer's.

    rollout   images/s of one group (G = 12, 8 Euler steps) at 512^2 and 1024^2, without and with the
              whole-model text-attention capture that R_ACD needs (its overhead)
    training  one RC-GRPO update of one group (B = 4 anchors x K = 4 steps = 16 rows) by micro-batch
              size, with and without gradient checkpointing: seconds, peak GPU memory, MFU
    peak      a bf16 8192^3 matmul: the card's measured peak, the MFU denominator
    plan      the activation factor and per-block times `rcgrpo plan --calibration` reads

    python bench/gpu_flux.py --out results/            # on a GPU, <= 8 minutes (--budget-s)
    python bench/gpu_flux.py --reduced --out /tmp/x    # the CPU path: a 1 + 1 block model (the tests)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rcgrpo.attention import capture_text_attention
from rcgrpo.config import MethodConfig
from rcgrpo.editor import EditCondition, Editor
from rcgrpo.lora import add_lora
from rcgrpo.plan import FLUX_KONTEXT_CONFIGS, calibrate
from rcgrpo.sampler import rollout
from rcgrpo.tiny_editor import TinyEditorSpec, build_tiny_pipeline
from rcgrpo.train_step import TrainGroup, make_optimizer, rc_grpo_step

REDUCED_TRANSFORMER = {  # the CPU path: FLUX's layout at toy width
    **FLUX_KONTEXT_CONFIGS["transformer"],
    "num_layers": 1,
    "num_single_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 6, 6],
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn):
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - started


def build_editor(reduced: bool, device: torch.device, dtype: torch.dtype) -> Editor:
    """The full-size (or reduced) transformer, randomly initialised in `dtype` on `device`, in a pipeline
    whose scheduler and VAE geometry (8x, 16 latent channels) are FLUX's; encoders and VAE are tiny
    stand-ins that nothing here calls."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    max_len = 32 if reduced else FLUX_KONTEXT_CONFIGS["max_sequence_length"]
    spec = TinyEditorSpec(
        latent_channels=16, vae_block_out_channels=(8, 8, 8, 8), max_sequence_length=max_len
    )
    stand_ins = build_tiny_pipeline(spec)
    config = REDUCED_TRANSFORMER if reduced else FLUX_KONTEXT_CONFIGS["transformer"]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype, directly on the device
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(default)
    transformer.eval().requires_grad_(False)
    pipe = FluxKontextPipeline(
        scheduler=stand_ins.scheduler,
        vae=stand_ins.vae.to(device),
        text_encoder=stand_ins.text_encoder,
        tokenizer=stand_ins.tokenizer,
        text_encoder_2=stand_ins.text_encoder_2,
        tokenizer_2=stand_ins.tokenizer_2,
        transformer=transformer,
    )
    return Editor(pipe, max_sequence_length=max_len)


def random_condition(editor: Editor, size: int, generator: torch.Generator) -> EditCondition:
    """A batch-1 condition of the real shapes: T5 tokens, CLIP pooled, context latents, ids, guidance."""
    cfg = editor.transformer.config
    h, w = editor.latent_size(size, size)
    n, d, length = (h // 2) * (w // 2), 4 * editor.latent_channels, editor.max_sequence_length
    device, dtype = editor.device, editor.dtype
    ids = editor.pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
    context_ids = ids.clone()
    context_ids[..., 0] = 1
    text_mask = torch.zeros(1, length, dtype=torch.bool, device=device)
    text_mask[:, :24] = True  # an instruction of 24 tokens
    return EditCondition(
        prompt_embeds=torch.randn(1, length, cfg.joint_attention_dim, generator=generator).to(device, dtype),
        pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=generator).to(device, dtype),
        text_ids=torch.zeros(length, 3, device=device, dtype=dtype),
        text_mask=text_mask,
        context_latents=torch.randn(1, n, d, generator=generator).to(device, dtype),
        image_ids=torch.cat([ids, context_ids]),
        guidance=torch.full((1,), 2.5, device=device),
        height=size,
        width=size,
    )


def forward_flops(editor: Editor, size: int) -> float:
    """FLOPs of one transformer forward of one row: 2 x linear parameters x L + attention 4 L^2 dim per block."""
    cfg = editor.transformer.config
    h, w = editor.latent_size(size, size)
    length = editor.max_sequence_length + 2 * (h // 2) * (w // 2)
    linear = sum(m.weight.numel() for m in editor.transformer.modules() if isinstance(m, torch.nn.Linear))
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    return 2 * linear * length + 4 * length**2 * dim * (cfg.num_layers + cfg.num_single_layers)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _, seconds = timed(device, lambda: [a @ b for _ in range(repeats)])
    return 2 * n**3 * repeats / seconds / 1e12


def bench_rollout(editor, size, group_size, steps, generator) -> tuple[dict, TrainGroup]:
    cond = random_condition(editor, size, generator)
    h, w = editor.latent_size(size, size)
    initial = torch.randn(group_size, editor.latent_channels, h, w, generator=generator)
    result, plain = timed(editor.device, lambda: rollout(editor, cond, initial, steps, decode=False))
    group_cond = cond.repeat(group_size)

    def captured():
        with capture_text_attention(editor, "double") as capture:
            rollout(
                editor, group_cond, initial, steps, None, capture.attention_kwargs(group_cond), decode=False
            )
            return capture.attention_map()

    _, with_capture = timed(editor.device, captured)
    n = (h // 2) * (w // 2)
    weights = torch.zeros(n)
    weights[n // 4 : n // 2] = 1.0  # a mask over a quarter of the tokens
    group = TrainGroup(
        cond=cond,
        sigmas=result.sigmas,
        kept_states=result.kept_states,
        states=result.states,
        token_weights=weights.to(editor.device),
        advantages=torch.linspace(-1.5, 1.5, group_size).to(editor.device),
    )
    row = {
        "size": size,
        "group_size": group_size,
        "steps": steps,
        "seconds_per_group": plain,
        "images_per_s": group_size / plain,
        "seconds_with_acd_capture": with_capture,
        "acd_capture_overhead": with_capture / plain - 1,
        "mfu": steps * group_size * forward_flops(editor, size) / plain,  # FLOP/s here, divided by peak below
    }
    return row, group


def bench_train(editor, group, method, micro_batch_rows, checkpointing, size) -> dict:
    device = editor.device
    if checkpointing:
        editor.transformer.enable_gradient_checkpointing()
    else:
        editor.transformer.disable_gradient_checkpointing()
    optimizer = make_optimizer(editor.transformer, method)
    row = {"size": size, "micro_batch_rows": micro_batch_rows, "checkpointing": checkpointing}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        _, seconds = timed(
            device,
            lambda: rc_grpo_step(
                editor, optimizer, [group], method, torch.Generator().manual_seed(0), micro_batch_rows
            ),
        )
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return row
    rows = method.anchors * method.steps_per_anchor
    row |= {
        "seconds": seconds,
        "rows": rows,
        "peak_gib": torch.cuda.max_memory_allocated() / 1024**3 if device.type == "cuda" else None,
        "mfu": 3 * rows * forward_flops(editor, size) / seconds,  # FLOP/s (model FLOPs: no recompute)
    }
    optimizer.zero_grad(set_to_none=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="a 1 + 1 block toy-width model (CPU, tests)")
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for gpu_flux.json and calibration.json"
    )
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--anchors", type=int)
    parser.add_argument("--steps-per-anchor", type=int)
    parser.add_argument("--micro-batch-rows", type=int, nargs="+")
    parser.add_argument("--train-size", type=int, help="image size of the training measurements")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.reduced else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = args.sizes or ([64, 128] if args.reduced else [512, 1024])
    group_size = args.group_size or (4 if args.reduced else 12)
    anchors = args.anchors or (2 if args.reduced else 4)
    k = args.steps_per_anchor or (2 if args.reduced else 4)
    micro = args.micro_batch_rows or ([1, 2] if args.reduced else [1, 4, 16])
    train_size = args.train_size or sizes[0]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "reduced": args.reduced,
    }
    peak = matmul_peak_tflops(
        device, dtype, 8192 if device.type == "cuda" else 256, 20 if device.type == "cuda" else 2
    )
    results["matmul_peak_tflops"] = peak
    editor, seconds = timed(device, lambda: build_editor(args.reduced, device, dtype))
    results["build_seconds"] = seconds
    results["transformer_params"] = sum(p.numel() for p in editor.transformer.parameters())
    generator = torch.Generator().manual_seed(0)

    results["rollout"], groups = [], {}
    for size in sizes:
        if time.perf_counter() - started > args.budget_s:
            results["rollout"].append({"size": size, "skipped": "budget"})
            continue
        row, groups[size] = bench_rollout(editor, size, group_size, args.steps, generator)
        row["mfu"] /= peak * 1e12
        results["rollout"].append(row)
        print(json.dumps(row), flush=True)

    method = MethodConfig(
        group_size=group_size,
        num_steps=args.steps,
        anchors=anchors,
        steps_per_anchor=k,
        lora_rank=32,
        lora_alpha=64,
        learning_rate=1e-5,
    )
    add_lora(editor.transformer, method.lora_rank, method.lora_alpha, method.lora_targets)
    results["train"] = []
    for checkpointing in (False, True):
        for rows in micro:
            if time.perf_counter() - started > args.budget_s or train_size not in groups:
                results["train"].append(
                    {"micro_batch_rows": rows, "checkpointing": checkpointing, "skipped": "budget"}
                )
                continue
            row = bench_train(editor, groups[train_size], method, rows, checkpointing, train_size)
            if "mfu" in row:
                row["mfu"] /= peak * 1e12
            results["train"].append(row)
            print(json.dumps(row), flush=True)
    editor.transformer.disable_gradient_checkpointing()
    calibration = calibrate(editor, train_size, train_size, rows=1, repeats=1)
    calibration.source = f"measured by bench/gpu_flux.py on {results['device']} at {train_size}x{train_size}"
    calibration.times_source = f"per-block times from bench/gpu_flux.py on {results['device']}"
    results["calibration"] = asdict(calibration)
    results["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_flux.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "calibration.json").write_text(json.dumps(asdict(calibration), indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("rollout", "train")}), flush=True)
    return results


if __name__ == "__main__":
    main()
