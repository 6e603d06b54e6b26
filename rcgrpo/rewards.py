"""Pixel rewards and background metrics, shared by the reward server and the evaluator.

All functions take a batch: images (B, 3, H, W) float in [0, 1], masks (B, H, W) in [0, 1] with
1 = edit region, and return a float32 Tensor[B].

The background metrics follow CompBench (docs/METHOD.md section 7): both images are multiplied by
(1 - mask), so the edit region contributes zero error, then PSNR / SSIM are taken over the whole
image with data range 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # value for identical images; every PSNR is clipped to it
REGION_TOLERANCE = 0.1  # tau of region_adherence: an RMS colour error of tau scores 0.5
SSIM_KERNEL_SIZE = 11  # torchmetrics' StructuralSimilarityIndexMeasure defaults, which CompBench uses
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

# The default rewards and their weights w_j in r_i = sum_j w_j r_j (acd's is lambda_ACD): what a run
# config and a reward server that name no weights use, and the one place these numbers live. The
# background terms are weighted low on purpose: under RDP a group's backgrounds differ only where
# in-mask changes spill through the VAE decoder, so a heavy background term mostly rewards "edit less"
# (docs/REWARDS.md). Every other registered reward is opt-in, at the weight its config gives it.
DEFAULT_WEIGHTS = {"region_adherence": 1.0, "background_psnr": 0.02, "background_ssim": 0.2, "acd": 0.5}


def _check_batch(images: dict[str, torch.Tensor], masks: torch.Tensor) -> None:
    """ValueError naming every shape unless all images are (B, 3, H, W) and masks (B, H, W)."""
    (first_name, first), *rest = images.items()
    shapes = (
        ", ".join(f"{name} {tuple(t.shape)}" for name, t in images.items()) + f", masks {tuple(masks.shape)}"
    )
    if first.ndim != 4 or first.shape[1] != 3:
        raise ValueError(f"{first_name} must be (B, 3, H, W); got {shapes}")
    for _, other in rest:
        if other.shape != first.shape:
            raise ValueError(f"image batches must have equal shapes; got {shapes}")
    b, _, h, w = first.shape
    if masks.shape != (b, h, w):
        raise ValueError(f"masks must be (B, H, W) = {(b, h, w)}; got {shapes}")


def region_adherence(
    edits: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, tolerance: float = REGION_TOLERANCE
) -> torch.Tensor:
    """How well the edit region matches the ground truth, in (0, 1]; 0 for an empty mask.

    With e the mask-weighted mean squared colour error inside the mask,
        e = sum_u m(u) ||edit(u) - target(u)||^2 / (3 sum_u m(u)),
    the score is 1 / (1 + e / tolerance^2): 1 for the ground truth, 0.5 at an RMS error of
    `tolerance`. A Cauchy kernel rather than a Gaussian so that two poor edits still get different
    scores (group-relative advantages need that ordering). An empty mask scores 0, CompBench's
    convention for its local metrics.
    """
    _check_batch({"edits": edits, "targets": targets}, masks)
    weights = masks.float().unsqueeze(1)
    squared = (edits.float() - targets.float()).pow(2) * weights
    area = weights.sum(dim=(1, 2, 3))
    mse = squared.sum(dim=(1, 2, 3)) / (3 * area).clamp_min(1e-12)
    score = 1.0 / (1.0 + mse / tolerance**2)
    return torch.where(area > 0, score, torch.zeros_like(score))


def _background(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return images.float() * (1 - masks.float()).unsqueeze(1)


def background_psnr(edits: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """PSNR (dB, data range 1) between edit and source with the edit region zeroed in both.

    The mean squared error is over all 3 H W values, as in CompBench (so it equals the mean over
    background pixels times the background fraction). Identical backgrounds give PSNR_CAP_DB.
    """
    _check_batch({"edits": edits, "sources": sources}, masks)
    mse = (_background(edits, masks) - _background(sources, masks)).pow(2).mean(dim=(1, 2, 3))
    floor = 10.0 ** (-PSNR_CAP_DB / 10.0)  # the MSE whose PSNR is the cap
    return -10.0 * torch.log10(mse.clamp_min(floor))


def _gaussian_window(channels: int, device: torch.device) -> torch.Tensor:
    offsets = torch.arange(SSIM_KERNEL_SIZE, dtype=torch.float32, device=device) - (SSIM_KERNEL_SIZE - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    kernel = kernel / kernel.sum()
    return (kernel[:, None] * kernel[None, :]).expand(channels, 1, -1, -1).contiguous()


def background_ssim(edits: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """SSIM (data range 1) between edit and source with the edit region zeroed in both.

    Gaussian 11x11 window (sigma 1.5), K1 = 0.01, K2 = 0.03, images reflect-padded by 5 pixels so
    the SSIM map covers every pixel, averaged over channels and pixels: the same numbers as
    torchmetrics' StructuralSimilarityIndexMeasure(data_range=1.0) (version 1.9), which
    CompBench's evaluation calls.
    """
    _check_batch({"edits": edits, "sources": sources}, masks)
    height, width = edits.shape[-2:]
    if min(height, width) <= SSIM_KERNEL_SIZE // 2:  # reflect padding needs more pixels than the pad
        raise ValueError(f"background_ssim needs H, W > {SSIM_KERNEL_SIZE // 2}; got {height}x{width}")
    pad = SSIM_KERNEL_SIZE // 2
    x = F.pad(_background(edits, masks), (pad, pad, pad, pad), mode="reflect")
    y = F.pad(_background(sources, masks), (pad, pad, pad, pad), mode="reflect")
    window = _gaussian_window(x.shape[1], x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=t.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x = (blur(x * x) - mu_x**2).clamp_min(0)  # rounding can make these slightly negative
    var_y = (blur(y * y) - mu_y**2).clamp_min(0)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # (K data_range)^2 with data_range 1
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


# ---------------------------------------------------------------------------------------------------
# the gated composition of sub-scores into r_i, and detectors of the two cheapest reward hacks

NO_EDIT_TOLERANCE = 0.02  # in-mask RMS colour change below this: the edit left the region as it was
REPAINT_TOLERANCE = 0.1  # background RMS colour change above this: the edit repainted the image


def unit_mean(terms: dict[str, tuple[float, float, tuple[float, float]]]) -> float:
    """The weighted mean of scores mapped onto [0, 1]: terms maps a name to (w_j, r_j, (low_j, high_j))
    and each r_j becomes clamp((r_j - low_j) / (high_j - low_j), 0, 1). 0 when no weight is positive."""
    total_weight = sum(weight for weight, _, _ in terms.values())
    if total_weight <= 0:
        return 0.0
    mapped = sum(
        weight * min(max((value - low) / (high - low), 0.0), 1.0)
        for weight, value, (low, high) in terms.values()
    )
    return mapped / total_weight


def gated_total(execution: float, consistency: float, ungated: float, floor: float, slope: float) -> float:
    """r_i = E (a + b C) + U: instruction following E and consistency C in [0, 1] (unit_mean of the
    instruction and of the preservation terms), a = floor, b = slope, U the ungated terms' weighted sum.
    Preserving the background is worth at most (a + b) E, so an edit that ignores the instruction
    (E near 0) cannot win on background metrics, and one that repaints everything (C near 0) keeps
    only a / (a + b) of its instruction score."""
    return execution * (floor + slope * consistency) + ungated


def _rms_change(edits: torch.Tensor, sources: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    squared = (edits.float() - sources.float()).pow(2) * weights.unsqueeze(1)
    area = weights.sum(dim=(1, 2))
    return (squared.sum(dim=(1, 2, 3)) / (3 * area).clamp_min(1e-12)).sqrt()


def unedited(
    edits: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor, tolerance: float = NO_EDIT_TOLERANCE
) -> torch.Tensor:
    """1.0 where the edit region is (nearly) unchanged from the source, else 0.0 ("no edit")."""
    _check_batch({"edits": edits, "sources": sources}, masks)
    return (_rms_change(edits, sources, masks.float()) < tolerance).float()


def repainted(
    edits: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor, tolerance: float = REPAINT_TOLERANCE
) -> torch.Tensor:
    """1.0 where the background (outside the mask) changed by more than `tolerance` RMS, else 0.0
    ("repaint everything"). An empty background counts as unchanged."""
    _check_batch({"edits": edits, "sources": sources}, masks)
    return (_rms_change(edits, sources, 1 - masks.float()) > tolerance).float()
