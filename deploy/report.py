"""What a run leaves for people to look at: reward curves and before/after edits as PNG, and the
held-out evaluation table. Drawn with PIL so no plotting library is needed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

CURVES = (
    ("reward_mean", "reward mean"),
    ("reward_std", "within-group reward std"),
    ("acd_mean", "ACD"),
    ("loss", "loss"),
)


SMOOTHING = 10  # steps in the moving average drawn over each curve


def _moving_average(values: list[float], window: int) -> list[float]:
    finite = [v if math.isfinite(v) else 0.0 for v in values]
    return [
        sum(finite[max(0, i - window + 1) : i + 1]) / len(finite[max(0, i - window + 1) : i + 1])
        for i in range(len(values))
    ]


def _panel(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, values: list[float]
) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline=(180, 180, 180))
    finite = [v for v in values if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    draw.text(
        (left + 6, top + 4),
        f"{title}  [{low:.3g}, {high:.3g}]  (thick: {SMOOTHING}-step mean)",
        fill=(0, 0, 0),
    )
    inner = (left + 8, top + 22, right - 8, bottom - 8)

    def line(series, colour, width):
        points = [
            (
                inner[0] + (inner[2] - inner[0]) * i / max(len(series) - 1, 1),
                inner[3] - (inner[3] - inner[1]) * (v - low) / (high - low),
            )
            for i, v in enumerate(series)
            if math.isfinite(v)
        ]
        if len(points) > 1:
            draw.line(points, fill=colour, width=width)
        elif points:
            draw.ellipse(
                [points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour
            )

    line(values, (170, 195, 235), 1)  # every step
    line(_moving_average(values, SMOOTHING), (20, 70, 180), 3)  # the trend


def save_curves(metrics_path: Path, out_path: Path) -> Path:
    """One panel per curve of the metrics JSONL, against the learner step."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    width, height = 900, 200 * len(CURVES)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for n, (key, title) in enumerate(CURVES):
        _panel(
            draw,
            (4, n * 200 + 4, width - 4, (n + 1) * 200 - 4),
            title,
            [float(r.get(key, float("nan"))) for r in rows],
        )
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
