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
    load here, else traced at the run's full width in bf16 on the meta device (no times for the run's
    editor). A bf16 run's float32 upcasts (peft's LoRA inputs, RoPE) and its backward's working set
    are only seen at its own width and dtype: the tiny editor's float32 factor put the flagship's
    learner at 46.5 GiB where the traced update needs 50.8 GiB."""
    from rcgrpo.editor import load_editor
    from rcgrpo.lora import add_lora
    from rcgrpo.trace import traced_calibration

    if calibration_file is not None:
        return Calibration(**json.loads(Path(calibration_file).read_text()))
    method = cfg.method
    arch = architecture(cfg.editor, method.lora_rank, method.lora_targets)
    in_place = arch.source != "published FLUX.1 Kontext configs" and (
        sum(arch.params.values()) <= MAX_CALIBRATED_PARAMS
    )
    if not in_place:
        return traced_calibration(cfg.editor, image_size, method)
    editor = load_editor(cfg.editor, device="cpu")
    add_lora(editor.transformer, method.lora_rank, method.lora_alpha, method.lora_targets)
    return calibrate(editor, image_size, image_size)


def build_plan(
    cfg: RunConfig,
    image_size: int | None = None,
    calibration_file: Path | None = None,
    transformer_overrides: dict | None = None,
) -> tuple[Plan, list[int | None]]:
    """The run's plan, and the micro-batch sizes it lists (the configured one included)."""
    method, learner = cfg.method, cfg.learner
    size = image_size or default_image_size(cfg)
    arch = architecture(cfg.editor, method.lora_rank, method.lora_targets, transformer_overrides)
    kept = cfg.kept_states
    rows_per_update = method.anchors * method.steps_per_anchor * learner.groups_per_step
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
        steps_per_anchor=method.steps_per_anchor,
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
        f"files in {cfg.blob_path} (blob_store directory)"
        if cfg.blob_store == "directory"
        else "the run's Redis (blob_store redis): size its memory for them"
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
    parser.add_argument(
        "--trace",
        action="store_true",
        help="also run the real rollout and update on the meta device (no memory, no arithmetic) and set "
        "the traced peak memory and FLOPs beside the estimate (default sizes: 1024 and 512 for Kontext)",
    )
    parser.add_argument("--json", action="store_true", help="with --trace: print the comparison as JSON")
    parser.add_argument(
        "--trace-depth",
        metavar="DUAL,SINGLE",
        help="with --trace: that many dual- and single-stream blocks instead of the editor's (a quick check)",
    )


def _depth(spec: str | None) -> dict | None:
    if spec is None:
        return None
    try:
        dual, single = (int(n) for n in spec.split(","))
    except ValueError:
        raise SystemExit(
            f"rcgrpo plan: error: --trace-depth must be DUAL,SINGLE (two integers), got {spec!r}"
        ) from None
    return {"num_layers": dual, "num_single_layers": single}


def trace_run(cfg: RunConfig, size: int, transformer_overrides: dict | None = None) -> dict:
    """The traced rollout worker and learner of `cfg` at `size`, beside the plan's estimate: per
    component the JSON of `rcgrpo.trace.ComponentTrace.to_json`."""
    from rcgrpo.lora import add_lora
    from rcgrpo.trace import build_meta_editor, trace_rollout, trace_update

    method, learner = cfg.method, cfg.learner
    plan, _ = build_plan(cfg, size, transformer_overrides=transformer_overrides)
    editor = build_meta_editor(cfg.editor, transformer_overrides)
    add_lora(editor.transformer, method.lora_rank, method.lora_alpha, method.lora_targets)
    rollout = trace_rollout(editor, method, size, cfg.kept_states)
    if learner.gradient_checkpointing:
        editor.transformer.enable_gradient_checkpointing()
    update = trace_update(
        editor, method, size, cfg.kept_states, learner.groups_per_step, learner.micro_batch_rows, learner.seed
    )
    return {
        "rollout_worker": rollout.to_json(plan.total(plan.rollout_memory)),
        "learner": update.to_json(plan.total(plan.learner_memory[learner.micro_batch_rows])),
    }


def format_trace(size: int, traced: dict) -> list[str]:
    """The lines `rcgrpo plan --trace` prints for one image size."""
    from rcgrpo.trace import H100_DENSE_BF16_FLOPS

    lines = [f"traced at {size}x{size} on the meta device (the real code, bf16, no memory held):"]
    for component, t in traced.items():
        traced_peak, analytic = t["traced_peak_bytes"], t["analytic_peak_bytes"]
        gap = traced_peak / analytic - 1
        flag = "  DIFFERS by more than 15%" if abs(gap) > 0.15 else ""
        parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in t["breakdown"].items())
        lines.append(
            f"  {component.replace('_', ' ')}: traced peak {format_bytes(traced_peak)} (in {t['peak_phase']}), "
            f"plan {format_bytes(analytic)} ({gap:+.0%}){flag}"
        )
        lines.append(f"    {parts}")
        for name, phase in t["phases"].items():
            lines.append(
                f"    {name}: {phase['flops'] / 1e12:,.0f} TFLOP = {phase['roofline_s']:.2f} s at the roofline "
                f"(H100 dense bf16, {H100_DENSE_BF16_FLOPS / 1e12:.0f} TFLOP/s); peak {format_bytes(phase['peak_bytes'])}"
                + (
                    f", the ACD capture holding up to {format_bytes(phase['captured_attention_peak_bytes'])}"
                    if phase["captured_attention_peak_bytes"]
                    else ""
                )
            )
        syncs = sum(t["host_syncs"].values())
        lines.append(f"    host syncs: {syncs} ({len(t['host_syncs'])} places; --json lists them)")
    return lines


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    cfg = load_run_config(args.config, args.overrides)
    if args.trace:
        depth = _depth(args.trace_depth)
        sizes = (
            [args.image_size]
            if args.image_size
            else (
                [SHAPES_IMAGE_SIZE]
                if cfg.data.source == "shapes"
                else [KONTEXT_IMAGE_SIZE, KONTEXT_IMAGE_SIZE // 2]
            )
        )
        traced = {str(size): trace_run(cfg, size, depth) for size in sizes}
        if args.json:
            print(json.dumps({"run": cfg.name, "device": "meta", "image_sizes": traced}, indent=2))
            return 0
        print(f"run {cfg.name!r}")
        for size, t in traced.items():
            print("\n".join(format_trace(int(size), t)))
        return 0
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
