"""Know before you launch: what a run of a given editor, group and image size costs, estimated from the
model's architecture (no weights are loaded) and from numbers measured on the editor at hand.

    weights         parameter counts of every pipeline component, by instantiating them on the meta device
    rollout worker  weights + the LoRA + the widest no-grad activations of G rows, or the VAE decode of G
                    images where that is larger (it runs after the transformer) + the kept states
    learner         weights + the LoRA with its gradient and AdamW moments (float32, 16 bytes a parameter)
                    + the activations autograd keeps for one micro-batch of rows and the backward's working
                    set (per token and block: measured on a small editor in place, else traced at the run's
                    width and dtype, `rcgrpo.trace.traced_calibration`)
    payloads        the training tensors of one group (the exact tensors `services.record` encodes) and the
                    bytes of one published policy version

The activation terms are estimates: per-token factors scaled by width, tokens and blocks.
`rcgrpo plan --trace` runs the real code at full size on the meta device and sets its peaks beside
these; docs/SCALE.md shows both.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 1024**3
MIB = 1024**2

# The published FLUX.1 [dev] / Kontext [dev] component configs (config.json of each subfolder), for
# planning a FLUX run on a machine that does not hold the model.
FLUX_KONTEXT_CONFIGS = {
    "transformer": {
        "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": True,
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "patch_size": 1,
        "pooled_projection_dim": 768,
    },
    "vae": {
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
    },
    "text_encoder": {  # CLIP ViT-L/14 text tower
        "model_type": "clip_text_model",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "projection_dim": 768,
    },
    "text_encoder_2": {  # T5 v1.1 XXL encoder
        "model_type": "t5",
        "d_model": 4096,
        "d_ff": 10240,
        "d_kv": 64,
        "num_heads": 64,
        "num_layers": 24,
        "vocab_size": 32128,
        "feed_forward_proj": "gated-gelu",
    },
    "max_sequence_length": 512,
}

# Live activation width of a no-grad transformer block at its widest, in units of dim per token: the
# residual, the normed input, q/k/v (3), the attention output and the MLP's hidden layer before and
# after its activation (2 x 4) -> 1 + 1 + 3 + 1 + 8 = 14.
INFERENCE_WIDTH = 14
# VAE decode of one image at full resolution: the tensors of the first block's channels per pixel live at
# its peak, 6 x C_0 x H x W (traced: `rcgrpo plan --trace`, 18.2 GiB for 12 images at 1024^2).
VAE_DECODE_TENSORS = 6
# CUDA context, allocator fragmentation and workspace: kept free on every GPU.
GPU_RESERVE_BYTES = 3 * GIB


@dataclass(frozen=True)
class Architecture:
    """The sizes that cost memory and bytes, from a pipeline's component configs."""

    source: str  # the editor directory, or "published FLUX.1 Kontext configs"
    transformer: dict
    params: dict[str, int]  # parameters per component
    lora_params: int
    vae_channels: int  # the VAE decoder's widest (full-resolution) channel count
    vae_scale_factor: int
    max_sequence_length: int

    @property
    def dim(self) -> int:
        return self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"]

    @property
    def blocks(self) -> int:
        return self.transformer["num_layers"] + self.transformer["num_single_layers"]

    @property
    def latent_channels(self) -> int:
        return self.transformer["in_channels"] // 4

    def tokens(self, height: int, width: int) -> int:
        """N: target-image tokens (2x2 latent patches); the context image has as many."""
        multiple = 2 * self.vae_scale_factor
        if height % multiple or width % multiple:
            raise ValueError(f"image size {height}x{width} must be a multiple of {multiple}")
        return (height // multiple) * (width // multiple)

    def sequence(self, height: int, width: int) -> int:
        """L = text tokens + target tokens + context tokens: one row's transformer sequence."""
        return self.max_sequence_length + 2 * self.tokens(height, width)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _lora_params(transformer, rank: int, targets: Sequence[str]) -> int:
    """r (in + out) per Linear whose name ends with a target (peft's suffix match)."""
    total = 0
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def editor_configs(
    editor_dir: str | Path | None, transformer_overrides: dict | None = None
) -> tuple[dict, int, str]:
    """(component configs, T5 sequence length, source) of a local FluxKontextPipeline directory, or of
    the published FLUX.1 Kontext configs where it is missing; `transformer_overrides` change the
    transformer's (a reduced depth, for the dry run's tests). Private keys ("_class_name") dropped."""
    path = None if editor_dir is None else Path(editor_dir)
    if path is not None and (path / "transformer" / "config.json").is_file():
        configs = {
            name: json.loads((path / name / "config.json").read_text())
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
        }
        sidecar = path / "rcgrpo_editor.json"
        max_len = json.loads(sidecar.read_text()).get("max_sequence_length", 512) if sidecar.exists() else 512
        source = str(path)
    else:
        configs, max_len = FLUX_KONTEXT_CONFIGS, FLUX_KONTEXT_CONFIGS["max_sequence_length"]
        source = "published FLUX.1 Kontext configs"
    configs = {
        name: {k: v for k, v in configs[name].items() if not k.startswith("_")}
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
    }
    if transformer_overrides:
        configs["transformer"] = {**configs["transformer"], **transformer_overrides}
        source += f" ({', '.join(f'{k}={v}' for k, v in transformer_overrides.items())})"
    return configs, max_len, source


def architecture(
    editor_dir: str | Path | None,
    lora_rank: int,
    lora_targets: Sequence[str],
    transformer_overrides: dict | None = None,
) -> Architecture:
    """The architecture of a local FluxKontextPipeline directory (configs only; None or a missing
    directory: the published FLUX.1 Kontext configs), its components instantiated on the meta device."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    configs, max_len, source = editor_configs(editor_dir, transformer_overrides)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(configs["transformer"])
        vae = AutoencoderKL.from_config(configs["vae"])
        clip = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        t5 = T5EncoderModel(T5Config(**configs["text_encoder_2"]))
    return Architecture(
        source=source,
        transformer=dict(transformer.config),
        params={
            "transformer": _count(transformer),
            "text_encoder": _count(clip),
            "text_encoder_2": _count(t5),
            "vae": _count(vae),
        },
        lora_params=_lora_params(transformer, lora_rank, lora_targets),
        vae_channels=vae.config.block_out_channels[0],
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        max_sequence_length=max_len,
    )


def train_tensor_layout(
    arch: Architecture,
    height: int,
    width: int,
    group_size: int,
    num_steps: int,
    num_states: int,
    dtype: torch.dtype,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the tensors one group's training blob holds (services.record's
    encode_train_tensors): the condition (batch 1), the sigma grid, the kept states, the weights."""
    n = arch.tokens(height, width)
    d = 4 * arch.latent_channels
    length = arch.max_sequence_length
    layout = {
        "cond.prompt_embeds": ((1, length, arch.transformer["joint_attention_dim"]), dtype),
        "cond.pooled_prompt_embeds": ((1, arch.transformer["pooled_projection_dim"]), dtype),
        "cond.text_ids": ((length, 3), dtype),
        "cond.text_mask": ((1, length), torch.bool),
        "cond.context_latents": ((1, n, d), dtype),
        "cond.image_ids": ((2 * n, 3), dtype),
        "sigmas": ((num_steps + 1,), torch.float32),
        "states": ((num_states, group_size, n, d), torch.float32),  # the ODE state is float32 (euler_step)
        "token_weights": ((n,), torch.float32),
        "background_weights": ((n,), torch.float32),
    }
    if arch.transformer.get("guidance_embeds"):
        layout["cond.guidance"] = ((1,), torch.float32)
    return layout


def layout_bytes(layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """The tensors' bytes (safetensors adds a header of a few hundred bytes)."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())


def image_bytes_bound(height: int, width: int, group_size: int, has_target: bool) -> int:
    """An upper bound of a record's PNG parts: source, G edits, target as raw RGB, mask as raw gray."""
    return (group_size + 1 + int(has_target)) * 3 * height * width + height * width


@dataclass
class Calibration:
    """Per-token numbers measured on one editor (or given from a GPU run)."""

    source: str
    # bytes autograd keeps per token per transformer block, in units of dim x element size
    saved_width: float
    # the backward's working set on top of what the forward keeps, per token, same units (0: not measured)
    backward_width: float = 0.0
    # seconds of one no-grad forward of one row of L tokens, per block (None: not measured)
    forward_s_per_row_block: float | None = None
    train_s_per_row_block: float | None = None  # forward + backward of one row with gradient
    times_source: str = "not measured for this editor: bench/gpu_flux.py measures them on a GPU"


def _saved_bytes(module: torch.nn.Module, fn) -> tuple[int, object]:
    """Bytes of the distinct tensors autograd saves while `fn` runs, `module`'s parameters (and views
    of them) left out; and what fn returned."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def calibrate(editor, height: int, width: int, rows: int = 2, repeats: int = 2) -> Calibration:
    """Measure `editor` (any device): autograd's saved bytes per token and block, and the forward and
    training seconds per row and block, on random inputs of one image size."""
    from rcgrpo.editor import EditCondition

    transformer = editor.transformer
    cfg = transformer.config
    h, w = editor.latent_size(height, width)
    n, d = (h // 2) * (w // 2), 4 * editor.latent_channels
    length = editor.max_sequence_length
    device, dtype = editor.device, editor.dtype
    generator = torch.Generator().manual_seed(0)
    cond = EditCondition(
        prompt_embeds=torch.randn(rows, length, cfg.joint_attention_dim, generator=generator).to(
            device, dtype
        ),
        pooled_prompt_embeds=torch.randn(rows, cfg.pooled_projection_dim, generator=generator).to(
            device, dtype
        ),
        text_ids=torch.zeros(length, 3, device=device, dtype=dtype),
        text_mask=torch.ones(rows, length, dtype=torch.bool, device=device),
        context_latents=torch.randn(rows, n, d, generator=generator).to(device, dtype),
        image_ids=torch.zeros(2 * n, 3, device=device, dtype=dtype),
        guidance=torch.full((rows,), 2.5, device=device) if cfg.guidance_embeds else None,
        height=height,
        width=width,
    )
    x = torch.randn(rows, n, d, generator=generator).to(device, dtype)
    sigma = torch.full((rows,), 0.5, device=device)
    blocks = cfg.num_layers + cfg.num_single_layers
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    tokens = rows * (length + 2 * n)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    saved, out = _saved_bytes(transformer, lambda: editor.velocity(x, sigma, cond))
    out.float().pow(2).mean().backward()
    with torch.no_grad():
        editor.velocity(x, sigma, cond)  # warm-up
        sync()
        started = time.perf_counter()
        for _ in range(repeats):
            editor.velocity(x, sigma, cond)
        sync()
        forward = (time.perf_counter() - started) / repeats
    started = time.perf_counter()
    for _ in range(repeats):
        editor.velocity(x, sigma, cond).float().pow(2).mean().backward()
    sync()
    train = (time.perf_counter() - started) / repeats
    transformer.zero_grad(set_to_none=True)
    return Calibration(
        source=f"measured on {editor.pipe.name_or_path or 'the editor'} at {height}x{width}",
        saved_width=saved / (tokens * blocks * dim * dtype.itemsize),
        forward_s_per_row_block=forward / (rows * blocks),
        train_s_per_row_block=train / (rows * blocks),
        times_source=f"per-block times measured here on {device.type}",
    )


@dataclass
class Plan:
    """What one run costs; every size in bytes, every time in seconds (None: not known)."""

    arch: Architecture
    calibration: Calibration
    height: int
    width: int
    group_size: int
    dtype: torch.dtype
    rollout_memory: dict[str, int]
    learner_memory: dict[int | None, dict[str, int]]  # micro-batch rows (None: all) -> parts
    train_blob_bytes: int
    image_bytes: int
    weight_version_bytes: int
    rollout_seconds: float | None  # one group's ODE rollout (transformer only)
    update_seconds: (
        float | None
    )  # one update: every row's forward and backward (the same for any micro-batch)

    @staticmethod
    def total(parts: dict[str, int]) -> int:
        return sum(parts.values())


def weight_bytes(arch: Architecture, dtype: torch.dtype, components: Sequence[str]) -> int:
    return sum(arch.params[c] for c in components) * dtype.itemsize


def expected_distinct_rows(
    group_size: int, trainable_steps: int, anchors: int, steps_per_anchor: int, epochs: int
) -> float:
    """The expected number of distinct (k, j) rows one group's update samples over its epochs: each epoch
    draws B of the G anchors and K of the J steps, so a row is drawn with probability BK / (GJ) per epoch,
    and the anchor's reference pass is made once per distinct row."""
    pool = group_size * trainable_steps
    return pool * (1 - (1 - anchors * steps_per_anchor / pool) ** epochs)


def make_plan(
    arch: Architecture,
    calibration: Calibration,
    *,
    height: int,
    width: int,
    dtype: torch.dtype,
    group_size: int,
    num_steps: int,
    num_states: int,
    trainable_steps: int,
    anchors: int,
    steps_per_anchor: int,
    groups_per_step: int,
    update_epochs: int,
    background_anchor: bool,
    gradient_checkpointing: bool,
    micro_batch_rows: Sequence[int | None],
    has_target: bool = False,
) -> Plan:
    """The plan of one run; `micro_batch_rows` lists the learner's micro-batch sizes to estimate."""
    elem = dtype.itemsize
    length, dim, blocks = arch.sequence(height, width), arch.dim, arch.blocks
    all_weights = weight_bytes(arch, dtype, ("transformer", "text_encoder", "text_encoder_2", "vae"))
    lora_fp32 = 4 * arch.lora_params  # add_lora keeps the LoRA in float32 everywhere
    layout = train_tensor_layout(arch, height, width, group_size, num_steps, num_states, dtype)
    blob = layout_bytes(layout)
    transformer_activations = group_size * length * dim * INFERENCE_WIDTH * elem
    vae_decode = group_size * VAE_DECODE_TENSORS * arch.vae_channels * height * width * elem
    rollout = {
        "weights": all_weights,
        "lora": lora_fp32,
        "activations": transformer_activations,
        # the decode runs once the transformer's activations are freed: it adds what it needs beyond them
        "vae_decode_beyond": max(0, vae_decode - transformer_activations),
        "kept_states": math.prod(layout["states"][0]) * 4,
    }
    rows_per_update = anchors * steps_per_anchor * groups_per_step
    anchor_rows = 0.0  # reference passes of one update: every group's distinct rows, once
    if background_anchor:
        distinct = expected_distinct_rows(
            group_size, trainable_steps, anchors, steps_per_anchor, update_epochs
        )
        anchor_rows = groups_per_step * distinct
    _, _, target_tokens, channels = layout["states"][0]
    learner = {}
    for rows in micro_batch_rows:
        r = rows_per_update if rows is None else min(rows, rows_per_update)
        per_row_token = length * dim * elem
        if gradient_checkpointing:  # every block's input, plus one block's activations while it recomputes
            saved = r * per_row_token * (blocks + calibration.saved_width + calibration.backward_width)
        else:
            saved = r * per_row_token * (blocks * calibration.saved_width + calibration.backward_width)
        learner[rows] = {
            "weights": all_weights,
            "lora_train_state": 4 * lora_fp32,  # parameter, gradient, AdamW's two moments
            "activations": int(saved),
            # the reference pass runs before the epochs, its no-grad activations freed before theirs
            "anchor_pass": max(0, int(r * per_row_token * INFERENCE_WIDTH - saved))
            if background_anchor
            else 0,
            # x_ref of every distinct row, kept through the epochs
            "anchor_references": int(anchor_rows * target_tokens * channels * 4),  # float32, as the states
            "groups": groups_per_step * blob,
        }
    rollout_s = update_s = None
    forward, train = calibration.forward_s_per_row_block, calibration.train_s_per_row_block
    if forward is not None:
        rollout_s = num_steps * group_size * blocks * forward
    if forward is not None and train is not None:
        # per row and epoch: forward + backward, one more forward with checkpointing; per distinct row:
        # the anchor's no-grad forward
        per_row = blocks * (train + forward * int(gradient_checkpointing))
        update_s = update_epochs * rows_per_update * per_row + anchor_rows * blocks * forward
    return Plan(
        arch=arch,
        calibration=calibration,
        height=height,
        width=width,
        group_size=group_size,
        dtype=dtype,
        rollout_memory=rollout,
        learner_memory=learner,
        train_blob_bytes=blob,
        image_bytes=image_bytes_bound(height, width, group_size, has_target),
        weight_version_bytes=lora_fp32,  # published as trained (rcgrpo.lora.lora_state_dict)
        rollout_seconds=rollout_s,
        update_seconds=update_s,
    )


def fit_problems(plan: Plan, gpu_memory_gb: float, micro_batch_rows: int | None) -> list[str]:
    """Why the run cannot fit on GPUs of `gpu_memory_gb` (empty: it fits)."""
    usable = gpu_memory_gb * GIB - GPU_RESERVE_BYTES
    problems = []
    rollout = plan.total(plan.rollout_memory)
    if rollout > usable:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in plan.rollout_memory.items())
        problems.append(
            f"a rollout worker needs ~{rollout / GIB:.1f} GiB ({parts}) of the {gpu_memory_gb:g} GiB GPU "
            f"({GPU_RESERVE_BYTES / GIB:.0f} GiB kept free): lower method.group_size or the image size"
        )
    learner = plan.total(plan.learner_memory[micro_batch_rows])
    if learner > usable:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in plan.learner_memory[micro_batch_rows].items())
        fits = [r for r, p in plan.learner_memory.items() if r is not None and plan.total(p) <= usable]
        hint = (
            f"learner.micro_batch_rows={max(fits)} fits"
            if fits
            else "no micro-batch size fits: set learner.gradient_checkpointing=true"
        )
        problems.append(
            f"the learner needs ~{learner / GIB:.1f} GiB ({parts}) at learner.micro_batch_rows="
            f"{micro_batch_rows} on the {gpu_memory_gb:g} GiB GPU: {hint}"
        )
    return problems


def format_bytes(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / MIB:.2f} MiB"


def format_plan(plan: Plan) -> str:
    """The plan as the lines `rcgrpo plan` prints."""
    gib = format_bytes

    def count(n: int) -> str:
        return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"

    def seconds(s: float | None) -> str:
        return "not measured" if s is None else f"{s:.3g} s"

    arch = plan.arch
    lines = [
        f"editor: {arch.source}",
        f"  transformer {count(arch.params['transformer'])} params ({arch.transformer['num_layers']} + "
        f"{arch.transformer['num_single_layers']} blocks, dim {arch.dim}), text encoders "
        f"{count(arch.params['text_encoder'] + arch.params['text_encoder_2'])}, VAE "
        f"{count(arch.params['vae'])}, LoRA {count(arch.lora_params)}",
        f"  {plan.height}x{plan.width}: {arch.tokens(plan.height, plan.width)} image tokens, sequence "
        f"{arch.sequence(plan.height, plan.width)}, {str(plan.dtype).removeprefix('torch.')}",
        f"activation factors: {plan.calibration.source} (saved width {plan.calibration.saved_width:.1f} x dim)",
        "",
        f"rollout worker peak GPU memory (G = {plan.group_size}): {gib(plan.total(plan.rollout_memory))}",
        "  " + ", ".join(f"{k} {gib(v)}" for k, v in plan.rollout_memory.items()),
        "learner peak GPU memory per micro-batch (rows):",
    ]
    for rows, parts in plan.learner_memory.items():
        detail = ", ".join(f"{k} {gib(v)}" for k, v in parts.items())
        lines.append(
            f"  {'all' if rows is None else rows:>4} rows: {gib(plan.total(parts)):>10}   ({detail})"
        )
    lines += [
        "",
        f"bytes per group: training blob {gib(plan.train_blob_bytes)}, images (PNG, at most) "
        f"{gib(plan.image_bytes)}",
        f"bytes per weight version (LoRA in float32): {gib(plan.weight_version_bytes)}",
        f"time: rollout of one group {seconds(plan.rollout_seconds)} (transformer), one update "
        f"{seconds(plan.update_seconds)} ({plan.calibration.times_source})",
    ]
    return "\n".join(lines)
