"""Evaluate an editor on a dataset: plain deterministic ODE sampling (one candidate per sample from a
seeded initial noise; masks are not used to sample), then ShapesEdit rewards and CompBench metrics.

`evaluate(editor, samples, cfg, seed)` is the library entry point (the training driver calls it);
`score_edits(samples, edits)` scores edits made elsewhere, e.g. read back from CompBench's results
layout with `read_results_layout`, so the official evaluator and this one can be run on the same files.

Edits are scored as 8-bit pictures (what a PNG holds), so scoring in memory and scoring the written
results layout give identical numbers.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rcgrpo.clip_scores import ClipScorer, to_uint8
from rcgrpo.compbench_metrics import GROUPS, CompBenchMetrics, group_means, task_means
from rcgrpo.config import MethodConfig
from rcgrpo.data.compbench import IMPLICIT_TASK
from rcgrpo.data.sample import EditSample, open_image
from rcgrpo.group import sample_group
from rcgrpo.sampler import rollout

# the held-out metrics every evaluation reports first: the instruction followed, the background kept
HEADLINE = ("region_adherence", "background_psnr", "background_ssim")
# an edit succeeds where its region is within the reward's colour tolerance on average (1 / (1 + 1))
SUCCESS_ADHERENCE = 0.5
ROW_FIELDS = ("id", "task", "instruction", "caption")


@dataclass
class EvalResult:
    """Per-sample rows and their aggregates.

    overall: plain mean over samples of each metric (NaN skipped). tasks and groups: CompBench's
    convention (per-task means, then macro means over a group's tasks, each rounded to 3 decimals);
    groups only for CompBench data. missing: metrics that could not be computed, with the reason.
    """

    rows: list[dict]
    metrics: list[str]
    overall: dict[str, float]
    tasks: dict[str, dict]
    groups: dict[str, dict]
    missing: dict[str, str] = field(default_factory=dict)
    edits: list[torch.Tensor] | None = None  # (3, H, W) in [0, 1], 8-bit values; kept on request

    def to_dict(self) -> dict:
        return {
            "num_samples": len(self.rows),
            "metrics": self.metrics,
            "overall": self.overall,
            "tasks": self.tasks,
            "groups": self.groups,
            "missing": self.missing,
        }

    def write_json(self, path: str | Path) -> Path:
        """Aggregates as strict JSON: NaN is written as null, an infinite PSNR as "inf"."""
        path = Path(path)
        path.write_text(json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False) + "\n")
        return path

    def write_csv(self, path: str | Path) -> Path:
        """One row per sample: id, task, instruction, caption, then every metric."""
        path = Path(path)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*ROW_FIELDS, *self.metrics])
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: row.get(k, math.nan) for k in (*ROW_FIELDS, *self.metrics)})
        return path

    def table(self) -> str:
        """A plain-text table: one line per task, per group and overall."""
        lines = [("", "n", *self.metrics)]
        for task, means in self.tasks.items():
            lines.append((task, str(means["count"]), *(_cell(means[m]) for m in self.metrics)))
        for group, means in self.groups.items():
            lines.append((group, f"{means['tasks']} tasks", *(_cell(means[m]) for m in self.metrics)))
        lines.append(("overall", str(len(self.rows)), *(_cell(self.overall[m]) for m in self.metrics)))
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        out = io.StringIO()
        for k, line in enumerate(lines):
            out.write(
                "  ".join(
                    cell.ljust(w) if i == 0 else cell.rjust(w)
                    for i, (cell, w) in enumerate(zip(line, widths, strict=True))
                )
            )
            out.write("\n")
            if k == 0:
                out.write("  ".join("-" * w for w in widths) + "\n")
        if self.missing:
            for metric, why in self.missing.items():
                out.write(f"{metric}: missing ({why})\n")
        return out.getvalue()


def _cell(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def json_safe(value):
    """`value` with NaN as null and infinities as "inf"/"-inf", so json.dumps(allow_nan=False) writes it."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def sample_seed(seed: int, sample_id: str) -> int:
    """The initial-noise seed of one sample: fixed by (seed, id), so independent of order and --limit."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little")


def quantize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> the same picture with 8-bit values (what a PNG save keeps)."""
    # contiguous: reductions over a differently strided copy of the same values may round differently
    return (torch.from_numpy(to_uint8(image)).permute(2, 0, 1).float() / 255).contiguous()


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, H, W) -> (3, height, width) bicubic with antialiasing, clamped to [0, 1]; a no-op at the same size."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    out = F.interpolate(
        image[None].float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return out[0].clamp(0, 1)


def editor_size(height: int, width: int, multiple: int, max_area: int | None = None) -> tuple[int, int]:
    """The size the editor samples at: scaled down to at most max_area pixels, then rounded to the
    nearest multiple of `multiple` (the editor's 2x2 latent patch), keeping the aspect ratio."""
    scale = 1.0 if max_area is None else min(1.0, math.sqrt(max_area / (height * width)))
    return (
        max(multiple, round(height * scale / multiple) * multiple),
        max(multiple, round(width * scale / multiple) * multiple),
    )


@torch.no_grad()
def generate_edits(
    editor,
    samples: Sequence[EditSample],
    cfg: MethodConfig | None = None,
    seed: int = 0,
    batch_size: int = 1,
    max_area: int | None = None,
    progress: bool = False,
) -> list[torch.Tensor]:
    """One edit per sample with the plain ODE sampler, returned at the sample's size with 8-bit values.

    Consecutive samples of the same size are rolled out together, batch_size at a time; each sample's
    initial noise comes from its own generator, seeded by `sample_seed(seed, id)`.
    """
    from tqdm.auto import tqdm

    cfg = cfg or MethodConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    multiple = 2 * editor.vae_scale_factor
    batches: list[list[int]] = []
    for i, sample in enumerate(samples):
        size = tuple(sample.source.shape[-2:])
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and tuple(samples[last[0]].source.shape[-2:]) == size:
            last.append(i)
        else:
            batches.append([i])
    edits: list[torch.Tensor] = [None] * len(samples)
    bar = tqdm(total=len(samples), desc="editing", disable=not progress)
    for batch in batches:
        height, width = samples[batch[0]].source.shape[-2:]
        edit_h, edit_w = editor_size(height, width, multiple, max_area)
        sources = torch.stack([resize(samples[i].source, edit_h, edit_w) for i in batch])
        cond = editor.encode_condition(sources, [samples[i].instruction for i in batch], cfg.guidance_scale)
        h, w = editor.latent_size(edit_h, edit_w)
        noise = torch.cat(
            [
                torch.randn(
                    1,
                    editor.latent_channels,
                    h,
                    w,
                    generator=torch.Generator().manual_seed(sample_seed(seed, samples[i].id)),
                )
                for i in batch
            ]
        )
        images = rollout(
            editor, cond, noise, cfg.num_steps, kept_states=[cfg.num_steps], lora_steps=cfg.lora_step_indices
        ).images.cpu()
        for i, image in zip(batch, images, strict=True):
            edits[i] = quantize(resize(image, height, width))
        bar.update(len(batch))
    bar.close()
    return edits


def score_edits(
    samples: Sequence[EditSample],
    edits: Sequence[torch.Tensor],
    clip: ClipScorer | None = None,
    compbench: bool | CompBenchMetrics = True,
    keep_edits: bool = False,
) -> EvalResult:
    """Score one edit per sample: ShapesEdit rewards (where a ground truth exists) and CompBench metrics.

    compbench: True builds CompBenchMetrics(clip) (LPIPS when available offline), False skips them.
    Edits are resized to the sample's size and scored as 8-bit pictures.
    """
    from rcgrpo import rewards

    if len(samples) != len(edits):
        raise ValueError(f"{len(edits)} edits for {len(samples)} samples")
    edits = [quantize(resize(e, *s.source.shape[-2:])) for s, e in zip(samples, edits, strict=True)]
    if compbench is True:
        compbench = CompBenchMetrics(clip)
    metrics = list(HEADLINE)
    missing: dict[str, str] = {}
    if compbench:
        metrics += list(compbench.metrics)
        missing.update(compbench.missing)
        bench_rows = compbench.score(
            [s.source for s in samples],
            edits,
            [compbench_mask(s) for s in samples],
            [s.target for s in samples],
            [s.caption for s in samples],
        )
    rows = []
    for i, (sample, edit) in enumerate(zip(samples, edits, strict=True)):
        batch = dict(edits=edit[None], sources=sample.source[None], masks=sample.mask[None])
        row = {
            "id": sample.id,
            "task": sample.task,
            "instruction": sample.instruction,
            "caption": sample.caption,
            "region_adherence": math.nan
            if sample.target is None
            else rewards.region_adherence(edit[None], sample.target[None], sample.mask[None]).item(),
            "background_psnr": rewards.background_psnr(**batch).item(),
            "background_ssim": rewards.background_ssim(**batch).item(),
        }
        if compbench:
            row.update(bench_rows[i])
        rows.append(row)
    is_compbench = bool(samples) and all(s.meta.get("dataset") == "compbench" for s in samples)
    per_task = task_means(rows, metrics)
    return EvalResult(
        rows=rows,
        metrics=metrics,
        overall={m: _nanmean(r[m] for r in rows) for m in metrics},
        tasks=per_task,
        groups=group_means(per_task, metrics, GROUPS) if is_compbench else {},
        missing=missing,
        edits=list(edits) if keep_edits else None,
    )


def compbench_mask(sample: EditSample) -> torch.Tensor:
    """The mask as CompBench's evaluator reads it: the mask file's grey levels / 255 where the sample
    came from one (the loaders binarise at 0.5; the official bbox uses > 0 and the background weight
    1 - mask), else the sample's mask."""
    path = sample.meta.get("mask_path")
    if not path:
        return sample.mask
    pixels = np.asarray(open_image(path, path).convert("L"), dtype=np.float32) / 255
    if pixels.shape != tuple(sample.mask.shape):
        return sample.mask  # the loader resized the sample; its mask is the one that matches
    return torch.from_numpy(pixels)


def _nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def evaluate(
    editor,
    samples: Sequence[EditSample],
    cfg: MethodConfig | None = None,
    seed: int = 0,
    clip: ClipScorer | None = None,
    compbench: bool | CompBenchMetrics = True,
    batch_size: int = 1,
    max_area: int | None = None,
    keep_edits: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Edit every sample with the plain ODE sampler (cfg.num_steps, cfg.guidance_scale) and score it."""
    edits = generate_edits(editor, samples, cfg, seed, batch_size, max_area, progress)
    return score_edits(samples, edits, clip=clip, compbench=compbench, keep_edits=keep_edits)


@torch.no_grad()
def within_group_spread(
    editor, samples: Sequence[EditSample], cfg: MethodConfig | None = None, seed: int = 0
) -> dict[str, dict[str, float]]:
    """What GRPO has to select on, per task: each sample's group of cfg.group_size candidates sampled
    as training samples it (RDP at cfg.s_in, cfg.s_out), scored by region adherence as 8-bit pictures.

    Returns {task: {"groups", "adherence", "best_adherence", "median_std", "mean_std", "success_share",
    "groups_with_success"}}: the mean adherence of the candidates and of each group's best one (what
    selection alone could reach: an editor that always made its group's best edit), the median and mean
    of the within-group std of adherence, the share of candidates that succeed (adherence >= 0.5: an RMS
    colour error within the reward's tolerance) and the share of groups with at least one success. A
    group whose candidates all fail differs only by how they fail: the update can select a success only
    where a group holds one.
    """
    from rcgrpo.rewards import region_adherence

    cfg = cfg or MethodConfig()
    by_task: dict[str, list[tuple[float, float, float, float]]] = {}
    for sample in samples:
        if sample.target is None:
            raise ValueError(f"sample {sample.id!r} has no ground truth: its adherence cannot be scored")
        group = sample_group(editor, cfg, sample, sample_seed(seed, sample.id), kept_states=[cfg.num_steps])
        height, width = sample.source.shape[-2:]
        edits = torch.stack([quantize(resize(image, height, width)) for image in group.rollout.images.cpu()])
        n = len(edits)
        adherence = region_adherence(
            edits, sample.target.expand(n, -1, -1, -1), sample.mask.expand(n, -1, -1)
        )
        success = (adherence >= SUCCESS_ADHERENCE).float().mean().item()
        row = (adherence.mean().item(), adherence.max().item(), adherence.std().item(), success)
        by_task.setdefault(sample.task, []).append(row)
    spread = {}
    for task, rows in sorted(by_task.items()):
        mean, best, std, success = np.array(rows).T  # one value per group each
        spread[task] = {
            "groups": len(rows),
            "adherence": float(mean.mean()),
            "best_adherence": float(best.mean()),
            "median_std": float(np.median(std)),
            "mean_std": float(std.mean()),
            "success_share": float(success.mean()),
            "groups_with_success": float((success > 0).mean()),
        }
    return spread


def spread_table(spread: dict[str, dict[str, float]]) -> str:
    """`within_group_spread`'s result as a Markdown table, one row per task."""
    lines = [
        "| kind | groups | adherence | best of group | within-group std (median) | (mean) "
        "| candidates succeeding | groups with a success |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, row in spread.items():
        lines.append(
            f"| {task} | {row['groups']} | {row['adherence']:.3f} | {row['best_adherence']:.3f} "
            f"| {row['median_std']:.4f} | {row['mean_std']:.4f} "
            f"| {row['success_share']:.1%} | {row['groups_with_success']:.1%} |"
        )
    return "\n".join(lines) + "\n"


# -- CompBench's results layout ----------------------------------------------------------------------


def results_path(results_dir: str | Path, model: str, sample: EditSample) -> Path:
    """Where CompBench's evaluator looks for the edit of `sample`:
    <results>/<model>/<model>_local/<task>/<image_path>, or <results>/<model>/<model>_implicit/<image_name>.
    Samples from other datasets go under <model>_local/<kind>/<id>.png."""
    task = sample.task
    image = sample.meta.get("image_path") or sample.meta.get("image_name") or f"{sample.id}.png"
    root = Path(results_dir) / model
    if task == IMPLICIT_TASK:
        return root / f"{model}_implicit" / image
    return root / f"{model}_local" / task / image


def write_results_layout(
    results_dir: str | Path, model: str, samples: Sequence[EditSample], edits: Sequence[torch.Tensor]
) -> list[Path]:
    """Save each edit as an 8-bit PNG where CompBench's evaluator expects it."""
    from PIL import Image

    paths = []
    for sample, edit in zip(samples, edits, strict=True):
        path = results_path(results_dir, model, sample)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8(edit)).save(path)
        paths.append(path)
    return paths


def read_results_layout(
    results_dir: str | Path, model: str, samples: Sequence[EditSample]
) -> tuple[list[EditSample], list[torch.Tensor], list[Path]]:
    """The samples that have an edit in the layout, their edits (3, H, W), and the paths that are missing
    (skipped, as the official evaluator skips them)."""
    from PIL import Image

    if not (Path(results_dir) / model).is_dir():
        raise FileNotFoundError(
            f"no results for model {model!r}: {Path(results_dir) / model} is not a directory"
        )
    found, edits, missing = [], [], []
    for sample in samples:
        path = results_path(results_dir, model, sample)
        if not path.exists():
            missing.append(path)
            continue
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        found.append(sample)
        edits.append(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
    return found, edits, missing


def save_grid(
    path: str | Path, samples: Sequence[EditSample], edits: Sequence[torch.Tensor], max_rows: int = 4
) -> Path:
    """A PNG with one row per sample (the first max_rows): source | edit | ground truth (grey if none)."""
    from PIL import Image

    count = min(max_rows, len(samples))
    if count == 0:
        raise ValueError("no samples to draw")
    height, width = samples[0].source.shape[-2:]
    scale = min(1.0, 256 / max(height, width))
    cell_h, cell_w = max(1, round(height * scale)), max(1, round(width * scale))
    grid = Image.new("RGB", (3 * cell_w, count * cell_h), (128, 128, 128))
    for row in range(count):
        sample = samples[row]
        for col, image in enumerate((sample.source, edits[row], sample.target)):
            if image is not None:
                cell = Image.fromarray(to_uint8(image)).resize((cell_w, cell_h), Image.Resampling.BICUBIC)
                grid.paste(cell, (col * cell_w, row * cell_h))
    path = Path(path)
    grid.save(path)
    return path
