"""The end of a run: the base editor and the base editor + trained LoRA on held-out samples, printed
side by side, saved as JSON and as a PNG grid of before/after edits."""

from __future__ import annotations

import json
import math

import torch
from rich.table import Table

from deploy.report import save_before_after
from rcgrpo.data.loading import load_samples
from rcgrpo.drift import velocity_drift
from rcgrpo.editor import load_editor
from rcgrpo.evaluate import HEADLINE, evaluate
from rcgrpo.lora import load_trained_lora
from services.config import RunConfig

# what the run's summary.json keeps of eval.json (which also holds per-task means and per-sample rows)
SUMMARY = ("base", "trained", "change", "change_standard_error")
DRIFT_SAMPLES = 16  # held-out samples the velocity drift is measured on


def paired_change(base_rows: list[dict], trained_rows: list[dict], metric: str) -> tuple[float, float]:
    """Mean per-sample change trained - base of a metric and its standard error (paired: the same
    samples and initial noise), over the samples where both are finite; NaN when fewer than two."""
    diffs = [
        t[metric] - b[metric]
        for b, t in zip(base_rows, trained_rows, strict=True)
        if math.isfinite(b[metric]) and math.isfinite(t[metric])
    ]
    if len(diffs) < 2:
        return math.nan, math.nan
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


def evaluate_base_vs_trained(cfg: RunConfig, lora_dir, console) -> dict:
    # one thread: a second one only spins on 2-core machines shared with other jobs (20x slower, measured)
    torch.set_num_threads(cfg.rollout.torch_threads)
    samples = load_samples(
        cfg.data.source, split=cfg.eval.split, limit=cfg.eval.num_samples, seed=cfg.data.seed
    )
    editor = load_editor(cfg.editor, dtype=cfg.dtype)
    results, rows, edits = {}, {}, {}
    for name in ("base", "trained"):
        if name == "trained":
            load_trained_lora(editor.pipe, lora_dir)
        result = evaluate(
            editor,
            samples,
            cfg.method,
            seed=cfg.eval.seed,
            compbench=False,
            batch_size=8,
            keep_edits=True,
            progress=True,
        )
        results[name], rows[name], edits[name] = result.overall, result.rows, result.edits
        results.setdefault("tasks", {})[name] = result.tasks
    table = Table(title=f"held-out evaluation ({len(samples)} {cfg.data.source} {cfg.eval.split} samples)")
    table.add_column("metric")
    for name in ("base", "trained", "change ± s.e."):
        table.add_column(name, justify="right")
    metrics = [m for m in HEADLINE if m in results["base"]] + [
        m for m in results["base"] if m not in HEADLINE
    ]
    for metric in metrics:
        base, trained = results["base"][metric], results["trained"][metric]
        change, error = paired_change(rows["base"], rows["trained"], metric)
        results.setdefault("change", {})[metric] = change
        results.setdefault("change_standard_error", {})[metric] = error
        table.add_row(metric, f"{base:.4f}", f"{trained:.4f}", f"{change:+.4f} ± {error:.4f}")
    console.print(table)
    # the trained LoRA's velocity drift at every grid step (the editor holds it now), on a few samples
    drift = velocity_drift(editor, samples[:DRIFT_SAMPLES], cfg.method, seed=cfg.eval.seed)
    results["velocity_drift"] = drift
    trained = set(drift["trained"])
    console.print(
        "velocity drift ||v_theta - v_ref||^2 per grid step, inside / outside the mask (* trained): "
        + "  ".join(
            f"{j}{'*' if j in trained else ''} {a:.2g}/{b:.2g}"
            for j, (a, b) in enumerate(zip(drift["inside"], drift["outside"], strict=True))
        )
    )
    # per-sample rows too, so runs of several seeds can be compared paired per sample
    results["samples"] = {
        name: [{m: row[m] for m in ("id", "task", *metrics)} for row in rows[name]] for name in rows
    }
    (cfg.run_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    shown = min(cfg.eval.grid_samples, len(samples))
    if shown:
        save_before_after(
            samples[:shown], edits["base"][:shown], edits["trained"][:shown], cfg.run_dir / "before_after.png"
        )
    return {name: results[name] for name in SUMMARY}
