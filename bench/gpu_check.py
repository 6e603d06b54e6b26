"""The device half of scripts/gpu-check.sh: real RC-GRPO updates of the shipped tiny editor in bf16 on the
device, checked the way tests/test_bf16.py checks them on CPU, and measured peaks set beside the dry run's.

    updates   the tiny editor (bf16 base, float32 LoRA) samples groups with the ACD capture, takes
              `--updates` rc_grpo_steps with micro-batches, checkpointing and the background anchor, and
              hands its LoRA to a second ("worker") editor after each: per update pi_old's prediction
              against the stored state, the first epoch's |r - 1|, the LoRA round trip, peak memory
    traced    the same update traced on the meta device (rcgrpo.trace): its peak beside the measured one
    flux      with --flux-train JSON (bench/gpu_flux.py's output): its measured training peaks beside
              the same configurations traced on meta at full size (checkpointing, 4 and 16 rows)

    python bench/gpu_check.py --out DIR [--flux-train DIR/gpu_flux.json] [--trace-flux-only]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rcgrpo.config import MethodConfig
from rcgrpo.data.shapes import generate_shapes_edit
from rcgrpo.editor import EditCondition, load_editor
from rcgrpo.group import sample_group
from rcgrpo.lora import add_lora, load_lora_state_dict, lora_state_dict
from rcgrpo.surrogate import one_step_prediction
from rcgrpo.tiny_editor import SHIPPED_EDITOR_DIR
from rcgrpo.trace import DEVICE, DeviceTracker, build_meta_editor, fused_attention, trace_update
from rcgrpo.train_step import make_optimizer, rc_grpo_step

GIB = 1024**3
CFG = MethodConfig(group_size=6, num_steps=4, anchors=3, steps_per_anchor=2, background_anchor=1.0)
STATES = [0, 1, 2, 3, 4]
GROUPS, MICRO_BATCH_ROWS = 2, 4
FLUX_TRACED = [(True, 4), (True, 16)]  # (checkpointing, micro-batch rows) of gpu_flux's training runs


def tiny_updates(device: torch.device, updates: int) -> dict:
    """`updates` bf16 RC-GRPO steps of the tiny editor on `device`, each on fresh groups."""
    torch.manual_seed(0)
    learner = load_editor(SHIPPED_EDITOR_DIR, dtype="bfloat16", device=device)
    worker = load_editor(SHIPPED_EDITOR_DIR, dtype="bfloat16", device=device)
    for editor in (learner, worker):
        add_lora(editor.transformer, CFG.lora_rank, CFG.lora_alpha, CFG.lora_targets)
    learner.transformer.enable_gradient_checkpointing()
    load_lora_state_dict(worker.transformer, lora_state_dict(learner.transformer))  # policy version 0
    optimizer = make_optimizer(learner.transformer, MethodConfig(**{**CFG.__dict__, "learning_rate": 1e-3}))
    samples = generate_shapes_edit(GROUPS * updates, split="test", seed=3)
    rows, peak = [], 0
    for step in range(updates):
        sampled = [
            sample_group(worker, CFG, s, noise_seed=step * GROUPS + i, kept_states=STATES)
            for i, s in enumerate(samples[step * GROUPS : (step + 1) * GROUPS])
        ]
        first = sampled[0]
        with torch.no_grad():  # theta_old's one-step prediction against the stored states, whole group
            k = torch.arange(CFG.group_size)
            states, sigmas = first.rollout.states.to(device), first.rollout.sigmas
            x_theta = one_step_prediction(
                learner,
                states[0],
                sigmas[0].expand(len(k)).to(device),
                sigmas[1].expand(len(k)).to(device),
                EditCondition.cat([first.cond] * len(k)),
            )
        groups = [
            g.train_group(torch.linspace(-1.5, 1.5, CFG.group_size).roll(i)) for i, g in enumerate(sampled)
        ]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        stats = rc_grpo_step(
            learner, optimizer, groups, CFG, torch.Generator().manual_seed(step), MICRO_BATCH_ROWS
        )
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated())
        load_lora_state_dict(worker.transformer, lora_state_dict(learner.transformer))
        trained = {n: p for n, p in learner.transformer.named_parameters() if p.requires_grad}
        loaded = dict(worker.transformer.named_parameters())
        rows.append(
            {
                "update": step,
                "x_theta_minus_stored_max": (x_theta - states[1]).abs().max().item(),
                "first_epoch_ratio_deviation_max": stats.ratio_deviation_max,
                "grad_norm": stats.grad_norm,
                "lora_round_trip_equal": all(torch.equal(loaded[n], p) for n, p in trained.items()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"updates": rows, "measured_peak_bytes": peak if device.type == "cuda" else None}


def tiny_traced_peak() -> int:
    """The same update (one of `tiny_updates`) traced on the meta device."""
    editor = build_meta_editor(SHIPPED_EDITOR_DIR)
    add_lora(editor.transformer, CFG.lora_rank, CFG.lora_alpha, CFG.lora_targets)
    editor.transformer.enable_gradient_checkpointing()
    size = generate_shapes_edit(1, split="test", seed=3)[0].source.shape[-1]
    return trace_update(editor, CFG, size, STATES, GROUPS, MICRO_BATCH_ROWS).peak_bytes


def flux_traced_peaks(size: int) -> dict[str, int]:
    """bench/gpu_flux.py's training runs at full size (one group, B = 4 x K = 4 rows, by micro-batch),
    traced on the meta device: the same editor, group and step, no memory."""
    from bench.gpu_flux import bench_train, build_editor, random_condition
    from rcgrpo.train_step import TrainGroup

    editor = build_editor(False, DEVICE, torch.bfloat16)
    method = MethodConfig(
        group_size=12, num_steps=8, anchors=4, steps_per_anchor=4, lora_rank=32, lora_alpha=64
    )
    add_lora(editor.transformer, method.lora_rank, method.lora_alpha, method.lora_targets)
    h, w = editor.latent_size(size, size)
    n = (h // 2) * (w // 2)
    peaks = {}
    for checkpointing, rows in FLUX_TRACED:
        tracker = DeviceTracker()
        with fused_attention(), tracker:
            tracker.track([*editor.transformer.parameters(), *editor.vae.parameters()])
            group = TrainGroup(
                cond=random_condition(editor, size, torch.Generator().manual_seed(0)),
                sigmas=editor.sigmas(method.num_steps, size, size).to(DEVICE),
                kept_states=list(range(method.num_steps + 1)),
                states=torch.empty(method.num_steps + 1, method.group_size, n, 64, device=DEVICE),
                token_weights=torch.empty(n, device=DEVICE),
                advantages=torch.empty(method.group_size, device=DEVICE),
            )
            bench_train(editor, group, method, rows, checkpointing, size)
        peaks[f"checkpointing={checkpointing},rows={rows}"] = tracker.peak
        print(
            json.dumps(
                {"traced": f"checkpointing={checkpointing},rows={rows}", "peak_gib": tracker.peak / GIB}
            )
        )
    return peaks


def compare_flux(measured_json: Path, traced: dict[str, int]) -> list[dict]:
    """gpu_flux.json's measured training peaks beside the traced ones (the traced configurations only)."""
    measured = json.loads(measured_json.read_text())
    out = []
    for row in measured.get("train", []):
        key = f"checkpointing={row['checkpointing']},rows={row['micro_batch_rows']}"
        if key in traced and row.get("peak_gib"):
            out.append(
                {
                    "config": key,
                    "measured_gib": row["peak_gib"],
                    "traced_gib": traced[key] / GIB,
                    "measured_over_traced": row["peak_gib"] * GIB / traced[key],
                }
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--flux-train", type=Path, help="bench/gpu_flux.py's gpu_flux.json to compare")
    parser.add_argument("--flux-traced", type=Path, help="flux_traced.json (from --trace-flux-only)")
    parser.add_argument("--flux-size", type=int, default=512, help="gpu_flux.py's training image size")
    parser.add_argument(
        "--trace-flux-only",
        action="store_true",
        help="only trace gpu_flux's training runs on meta (CPU) into OUT/flux_traced.json",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.trace_flux_only:
        traced = flux_traced_peaks(args.flux_size)
        (args.out / "flux_traced.json").write_text(json.dumps(traced, indent=2) + "\n")
        return traced
    device = torch.device(args.device)
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tiny": tiny_updates(device, args.updates),
    }
    results["tiny"]["traced_peak_bytes"] = tiny_traced_peak()
    measured = results["tiny"]["measured_peak_bytes"]
    if measured:
        results["tiny"]["measured_over_traced"] = measured / results["tiny"]["traced_peak_bytes"]
    if args.flux_train is not None and args.flux_traced is not None and args.flux_traced.is_file():
        traced = json.loads(args.flux_traced.read_text())
        results["flux_train_peaks"] = compare_flux(args.flux_train, traced)
    updates = results["tiny"]["updates"]
    results["ok"] = all(
        u["x_theta_minus_stored_max"] == 0.0
        and u["first_epoch_ratio_deviation_max"] < 1e-5
        and u["lora_round_trip_equal"]
        for u in updates
    )
    results["seconds"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "tiny"}), flush=True)
    return results


if __name__ == "__main__":
    main()
