"""`rcgrpo plan --config F`: what the run will cost before it starts (rcgrpo.plan): the peak GPU memory of
a rollout worker and of the learner per micro-batch size, the bytes per group and per weight version,
and the rollout / update time where per-block times are measured. With `gpu_memory_gb` set, a run that
cannot fit fails here, and in the driver before anything starts, with the reason."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rcgrpo.editor import DTYPES
from rcgrpo.plan import (
    Calibration,
    Plan,
    architecture,
    calibrate,
    fit_problems,
    format_bytes,
    format_plan,
    make_plan,
)
from rcgrpo.tiny_editor import SHIPPED_EDITOR_DIR
from services.config import DEFAULT_RUN_CONFIG, RunConfig, add_run_arguments, load_run_config

SHAPES_IMAGE_SIZE = 64  # ShapesEdit's images
KONTEXT_IMAGE_SIZE = 1024  # CompBench / jsonl edits are planned at Kontext's native resolution
MAX_CALIBRATED_PARAMS = 100_000_000  # editors up to this size are measured in place (the tiny ones)


def run_dtype(cfg: RunConfig) -> torch.dtype:
    """The run's dtype as load_editor picks it: bfloat16 on GPUs, float32 on CPU, unless set."""
    if cfg.dtype is not None:
        return DTYPES[cfg.dtype]
    on_gpu = cfg.rollout.gpus_per_worker > 0 or cfg.learner.num_gpus > 0
    return torch.bfloat16 if on_gpu else torch.float32


def default_image_size(cfg: RunConfig) -> int:
    return SHAPES_IMAGE_SIZE if cfg.data.source == "shapes" else KONTEXT_IMAGE_SIZE


def run_calibration(cfg: RunConfig, image_size: int, calibration_file: Path | None) -> Calibration:
    """Given (bench/gpu_flux.py's JSON), else measured: on the run's editor if it is small enough to
    load here, else the activation factor of the shipped tiny editor (no times for the run's editor)."""
    from rcgrpo.editor import load_editor
    from rcgrpo.lora import add_lora

    if calibration_file is not None:
        return Calibration(**json.loads(Path(calibration_file).read_text()))
    method = cfg.method
    arch = architecture(cfg.editor, method.lora_rank, method.lora_targets)
    in_place = arch.source != "published FLUX.1 Kontext configs" and (
        sum(arch.params.values()) <= MAX_CALIBRATED_PARAMS
    )
    editor = load_editor(cfg.editor if in_place else SHIPPED_EDITOR_DIR, device="cpu")
    # the LoRA at the run's rank relative to the width (its rank-r activations scale with r / dim);
    # measured without checkpointing: the factor is what one block keeps (make_plan models checkpointing)
    tiny = editor.transformer.config
    rank = (
        method.lora_rank
        if in_place
        else max(1, round(method.lora_rank * tiny.num_attention_heads * tiny.attention_head_dim / arch.dim))
    )
    add_lora(editor.transformer, rank, method.lora_alpha * rank / method.lora_rank, method.lora_targets)
    size = image_size if in_place else SHAPES_IMAGE_SIZE
    measured = calibrate(editor, size, size)
    return measured if in_place else measured.without_times()


def build_plan(
    cfg: RunConfig, image_size: int | None = None, calibration_file: Path | None = None
) -> tuple[Plan, list[int | None]]:
    """The run's plan, and the micro-batch sizes it lists (the configured one included)."""
    method, learner = cfg.method, cfg.learner
    size = image_size or default_image_size(cfg)
    arch = architecture(cfg.editor, method.lora_rank, method.lora_targets)
    kept = cfg.kept_states
    rows_per_update = method.anchors * method.timesteps_per_anchor * learner.groups_per_step
    sizes = sorted({r for r in (1, 2, 4, 8, 16) if r < rows_per_update} | {learner.micro_batch_rows or 1})
    sizes = [*sizes, None]
    plan = make_plan(
        arch,
        run_calibration(cfg, size, calibration_file),
        height=size,
        width=size,
        dtype=run_dtype(cfg),
        group_size=method.group_size,
        num_steps=method.num_steps,
        num_states=len(kept),
        trainable_steps=len(cfg.trained_steps),
        anchors=method.anchors,
        timesteps_per_anchor=method.timesteps_per_anchor,
        groups_per_step=learner.groups_per_step,
        update_epochs=method.update_epochs,
        background_anchor=method.background_anchor > 0,
        gradient_checkpointing=learner.gradient_checkpointing,
        micro_batch_rows=sizes,
    )
    return plan, sizes


def payload_line(cfg: RunConfig, plan: Plan) -> str:
    """Where the groups' payloads wait, and how many bytes of training blobs a checkpoint frees at most."""
    waiting = cfg.learner.checkpoint_every * cfg.learner.groups_per_step
    where = (
        f"files in {cfg.payload_path} (payload_store directory)"
        if cfg.payload_store == "directory"
        else "the run's Redis (payload_store redis): size its memory for them"
    )
    return (
        f"payloads: up to checkpoint_every x groups_per_step = {waiting} training blobs "
        f"({format_bytes(waiting * plan.train_blob_bytes)}) wait for a checkpoint, plus the groups in "
        f"flight, in {where}"
    )


def check_fits(cfg: RunConfig, image_size: int | None = None) -> None:
    """Refuse a run whose estimated peak GPU memory exceeds gpu_memory_gb (no-op when it is unset)."""
    if cfg.gpu_memory_gb is None:
        return
    plan, _ = build_plan(cfg, image_size)
    problems = fit_problems(plan, cfg.gpu_memory_gb, cfg.learner.micro_batch_rows)
    if problems:
        raise ValueError(
            "the run does not fit its GPUs (gpu_memory_gb; `rcgrpo plan` shows the estimate): "
            + "; ".join(problems)
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, redis_url=False, default_config=DEFAULT_RUN_CONFIG)
    parser.add_argument(
        "--image-size",
        type=int,
        help=f"edit size in pixels (default: {SHAPES_IMAGE_SIZE} for shapes, {KONTEXT_IMAGE_SIZE} otherwise)",
    )
    parser.add_argument(
        "--calibration", type=Path, help="activation factor and per-block times from bench/gpu_flux.py (JSON)"
    )


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    cfg = load_run_config(args.config, args.overrides)
    plan, _ = build_plan(cfg, args.image_size, args.calibration)
    print(f"run {cfg.name!r}")
    print(format_plan(plan))
    print(payload_line(cfg, plan))
    if cfg.gpu_memory_gb is None:
        print("gpu_memory_gb is not set: no fit check")
        return 0
    problems = fit_problems(plan, cfg.gpu_memory_gb, cfg.learner.micro_batch_rows)
    for problem in problems:
        print(f"does not fit: {problem}")
    if not problems:
        print(
            f"fits GPUs of {cfg.gpu_memory_gb:g} GiB at learner.micro_batch_rows={cfg.learner.micro_batch_rows}"
        )
    return 3 if problems else 0
