"""What a run leaves for people to look at: reward curves and before/after edits as PNG, and the
held-out evaluation table. Drawn with PIL so no plotting library is needed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

# One panel per entry: (title, [(label, metrics.jsonl key), ...]). A key "a.b" reads row["a"]["b"];
# "term_spread.*" draws one line per reward term. Read top to bottom they answer: is the reward rising,
# does it spread within groups and is that spread the instruction's, does the policy move.
CURVES = (
    ("reward", [("total", "reward_mean"), ("instruction term", "instruction_reward_mean")]),
    ("within-group reward std", [("total", "reward_std")]),
    ("within-group spread of each weighted reward term", [("", "term_spread.*")]),
    (
        "instruction term and advantages",
        [
            ("share of advantage variance", "instruction_share"),
            ("groups it dominates", "instruction_dominant"),
        ],
    ),
    ("ACD", [("mean", "acd_mean"), ("corr with instruction", "acd_instruction_corr")]),
    ("clip fraction", [("", "clip_fraction")]),
    ("|r - 1|", [("median", "ratio_deviation_p50"), ("90th percentile", "ratio_deviation_p90")]),
    ("pi_old over the candidates", [("effective neighbours exp(H)", "effective_neighbours")]),
    ("grad norm (before clipping)", [("", "grad_norm")]),
    ("loss", [("total", "loss"), ("background anchor", "background_anchor_loss")]),
)
COLOURS = ((20, 70, 180), (200, 80, 20), (30, 150, 60), (150, 40, 160), (120, 120, 120), (0, 150, 160))
SMOOTHING = 10  # steps in the moving average drawn over each curve
PANEL_W, PANEL_H, COLUMNS = 600, 210, 2


def _moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def _value(row: dict, key: str) -> float:
    node = row
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    try:
        return float(node)
    except (TypeError, ValueError):
        return math.nan


def _series(rows: list[dict], label: str, key: str) -> list[tuple[str, list[float]]]:
    if key.endswith(".*"):
        parent = key[:-2]
        names = sorted({name for row in rows for name in (row.get(parent) or {})})
        return [(name, [_value(row, f"{parent}.{name}") for row in rows]) for name in names]
    return [(label, [_value(row, key) for row in rows])]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, series) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline=(180, 180, 180))
    finite = [v for _, values in series for v in values if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    draw.text((left + 6, top + 4), f"{title}  [{low:.3g}, {high:.3g}]", fill=(0, 0, 0))
    legend_x = left + 6
    for n, (label, _) in enumerate(series):
        if label:
            colour = COLOURS[n % len(COLOURS)]
            draw.text((legend_x, top + 18), label, fill=colour)
            legend_x += 7 * len(label) + 14
    inner = (left + 8, top + 34, right - 8, bottom - 8)

    def line(values, colour, width):
        points = [
            (
                inner[0] + (inner[2] - inner[0]) * i / max(len(values) - 1, 1),
                inner[3] - (inner[3] - inner[1]) * (v - low) / (high - low),
            )
            for i, v in enumerate(values)
            if math.isfinite(v)
        ]
        if len(points) > 1:
            draw.line(points, fill=colour, width=width)
        elif points:
            draw.ellipse(
                [points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour
            )

    for n, (_, values) in enumerate(series):
        colour = COLOURS[n % len(COLOURS)]
        faint = tuple(c + (255 - c) * 2 // 3 for c in colour)
        line(values, faint, 1)  # every step
        line(_moving_average(values, SMOOTHING), colour, 3)  # the trend


def save_curves(metrics_path: Path, out_path: Path) -> Path:
    """The learning signal of a run against the learner step, one panel per CURVES entry (thin: every
    step; thick: a SMOOTHING-step moving average)."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    panel_rows = math.ceil(len(CURVES) / COLUMNS)
    image = Image.new("RGB", (COLUMNS * PANEL_W, panel_rows * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    for n, (title, keys) in enumerate(CURVES):
        row, col = divmod(n, COLUMNS)
        box = (col * PANEL_W + 4, row * PANEL_H + 4, (col + 1) * PANEL_W - 4, (row + 1) * PANEL_H - 4)
        _panel(draw, box, title, [s for label, key in keys for s in _series(rows, label, key)])
    image.save(out_path)
    return out_path


def _to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def save_before_after(samples, base_edits, trained_edits, out_path: Path, scale: int = 2) -> Path:
    """Rows of source | base edit | trained edit | ground truth, instruction written above each row."""
    columns = [
        [s.source for s in samples],
        base_edits,
        trained_edits,
        [s.target if s.target is not None else s.source for s in samples],
    ]
    cell = samples[0].source.shape[-1] * scale
    header = 14
    image = Image.new("RGB", (4 * cell, len(samples) * (cell + header)), "white")
    draw = ImageDraw.Draw(image)
    for row, sample in enumerate(samples):
        y = row * (cell + header)
        draw.text((2, y), sample.instruction[:80], fill=(0, 0, 0))
        for col, images in enumerate(columns):
            image.paste(_to_pil(images[row], scale), (col * cell, y + header))
    image.save(out_path)
    return out_path
