"""CompBench's metrics, computed as its official evaluator does (docs/METHOD.md section 7; Jia et al., arXiv 2505.12200).

Per sample: source, edit and ground truth are resized to 512x512 (8-bit, bicubic), the mask with nearest
neighbour and divided by 255. Background: source and edit are multiplied by (1 - mask), then PSNR (data
range 1), SSIM (torchmetrics defaults, data range 1) and LPIPS (SqueezeNet, inputs in [-1, 1]) between
the edit and the SOURCE. LC-T and LC-I are the local CLIP scores of rcgrpo.clip_scores on the mask's box.
Each score is rounded to 3 decimals; tasks average their samples, groups average their tasks (macro),
and every average is rounded to 3 decimals again.

Two things differ from running the official script, by necessity, not by choice: torchmetrics'
CLIPScore does not run with transformers 5 (its feature calls return output objects), so LC-T uses the
same formula through ClipScorer; and LPIPS needs torchvision plus SqueezeNet's ImageNet weights in the
torch hub cache, which are never downloaded here: without them LPIPS is reported as missing.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from rcgrpo.clip_scores import ClipScorer, to_uint8
from rcgrpo.data.compbench import IMPLICIT_TASK, LOCAL_TASKS

SIZE = 512
METRICS = ("LC-T", "LC-I", "PSNR", "SSIM", "LPIPS")
# The official summary's groups of masked tasks; "Local Editing" is the macro mean of its three tasks.
GROUPS = {"Local Editing": LOCAL_TASKS, "Implicit Reasoning": (IMPLICIT_TASK,)}

logger = logging.getLogger(__name__)
_reported_missing: set[str] = set()


def resize_image(image: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (3, size, size): the 8-bit picture resized bicubic by PIL, / 255."""
    from PIL import Image

    resized = Image.fromarray(to_uint8(image)).resize((size, size), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)


def resize_mask(mask: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """(H, W) in [0, 1] -> (size, size): the 8-bit mask resized nearest by PIL, / 255."""
    from PIL import Image

    pixels = (mask.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    resized = Image.fromarray(pixels).resize((size, size), resample=Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)


def lpips_unavailable_reason() -> str | None:
    """Why LPIPS-squeeze cannot run offline here, or None when it can."""
    if importlib.util.find_spec("torchvision") is None:
        return (
            "LPIPS (SqueezeNet) needs torchvision, which is not installed, and SqueezeNet 1.1's ImageNet "
            "weights in the torch hub cache (squeezenet1_1-b8a52dc0.pth under $TORCH_HOME/hub/checkpoints)"
        )
    from torchvision.models import SqueezeNet1_1_Weights

    weights = SqueezeNet1_1_Weights.DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights).path).name
    if not cached.exists():
        return f"LPIPS (SqueezeNet) needs SqueezeNet 1.1's ImageNet weights at {cached} (from {weights}); not downloaded"
    return None


def load_lpips():
    """torchmetrics' LPIPS-squeeze module, or None (with a one-time warning) when it cannot run offline."""
    reason = lpips_unavailable_reason()
    if reason is not None:
        if reason not in _reported_missing:
            _reported_missing.add(reason)
            logger.warning("LPIPS will be reported as missing: %s", reason)
        return None
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="squeeze").eval()


def background_scores(
    edit: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, lpips=None
) -> dict[str, float]:
    """PSNR, SSIM (and LPIPS when given) of edit vs source, both multiplied by (1 - mask); all at one size."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    keep = (1 - mask)[None, None]
    edit_bg, source_bg = edit[None] * keep, source[None] * keep
    scores = {
        "PSNR": peak_signal_noise_ratio(edit_bg, source_bg, data_range=1.0).item(),
        "SSIM": structural_similarity_index_measure(edit_bg, source_bg, data_range=1.0).item(),
    }
    if lpips is not None:
        with torch.no_grad():
            scores["LPIPS"] = lpips(edit_bg * 2 - 1, source_bg * 2 - 1).item()
    return scores


class CompBenchMetrics:
    """Scores edits with CompBench's metrics; LC-T/LC-I need a ClipScorer, LPIPS its offline weights."""

    def __init__(self, clip: ClipScorer | None = None, lpips="auto", size: int = SIZE):
        self.clip = clip
        self.lpips = load_lpips() if lpips == "auto" else lpips
        self.size = size

    @property
    def missing(self) -> dict[str, str]:
        """Metrics this scorer cannot compute, with the reason."""
        why = {}
        if self.clip is None:
            why["LC-T"] = why["LC-I"] = "no CLIP directory given (pass --clip DIR)"
        if self.lpips is None:
            why["LPIPS"] = lpips_unavailable_reason() or "LPIPS disabled"
        return why

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(m for m in METRICS if m not in self.missing)

    def score(
        self,
        sources: list[torch.Tensor],
        edits: list[torch.Tensor],
        masks: list[torch.Tensor],
        targets: list[torch.Tensor | None],
        captions: list[str],
    ) -> list[dict[str, float]]:
        """One dict of rounded scores per sample. Images (3, H, W) and masks (H, W) may differ in size
        between samples. LC-I is NaN where a sample has no ground truth (skipped by the averages)."""
        if not len(sources) == len(edits) == len(masks) == len(targets) == len(captions):
            raise ValueError("sources, edits, masks, targets and captions must have the same length")
        if not sources:
            return []
        source = torch.stack([resize_image(x, self.size) for x in sources])
        edit = torch.stack([resize_image(x, self.size) for x in edits])
        mask = torch.stack([resize_mask(m, self.size) for m in masks])
        rows = [background_scores(edit[i], source[i], mask[i], self.lpips) for i in range(len(sources))]
        if self.clip is not None:
            lc_t = self.clip.lc_t(edit, mask, captions)
            has_target = [i for i, t in enumerate(targets) if t is not None]
            lc_i = torch.full((len(sources),), math.nan)
            if has_target:
                target = torch.stack([resize_image(targets[i], self.size) for i in has_target])
                lc_i[has_target] = self.clip.lc_i(edit[has_target], target, mask[has_target])
            for i, row in enumerate(rows):
                row["LC-T"], row["LC-I"] = lc_t[i].item(), lc_i[i].item()
        return [{m: round3(row[m]) for m in METRICS if m in row} for row in rows]


def round3(value: float) -> float:
    """CompBench's rounding; NaN stays NaN."""
    return value if math.isnan(value) else round(float(value), 3)


def mean3(values) -> float:
    """Mean of the non-NaN values rounded to 3 decimals (pandas' mean, as the official summary); NaN if none."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return round3(sum(kept) / len(kept)) if kept else math.nan


def task_means(rows: list[dict], metrics, task_key: str = "task") -> dict[str, dict]:
    """{task: {"count": n, metric: mean3 over the task's rows}} in first-seen task order."""
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row[task_key], []).append(row)
    return {
        task: {"count": len(members), **{m: mean3(r.get(m, math.nan) for r in members) for m in metrics}}
        for task, members in by_task.items()
    }


def group_means(per_task: dict[str, dict], metrics, groups: dict = GROUPS) -> dict[str, dict]:
    """{group: {"tasks": k, metric: mean3 of the group's task means}} for groups with any task present."""
    result = {}
    for group, tasks in groups.items():
        present = [per_task[t] for t in tasks if t in per_task]
        if present:
            result[group] = {"tasks": len(present), **{m: mean3(t[m] for t in present) for m in metrics}}
    return result
