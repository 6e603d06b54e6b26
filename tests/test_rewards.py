import math

import pytest
import torch

from rcgrpo.data.shapes import generate_shapes_edit
from rcgrpo.rewards import PSNR_CAP_DB, background_psnr, background_ssim, region_adherence


def _half_mask(b=1, h=4, w=4):
    mask = torch.zeros(b, h, w)
    mask[:, :, : w // 2] = 1  # left half is the edit region
    return mask


# -- region_adherence ------------------------------------------------------------------------------


def test_region_adherence_hand_computed():
    targets = torch.zeros(3, 3, 4, 4)
    masks = _half_mask(3)
    edits = torch.ones(3, 3, 4, 4)  # outside the mask: ignored
    edits[0, :, :, :2] = 0.1  # MSE 0.01 = tau^2 -> 1 / (1 + 1)
    edits[1, :, :, :2] = 0.2  # MSE 0.04 -> 1 / (1 + 4)
    edits[2, :, :, :2] = 0.0  # exact -> 1
    scores = region_adherence(edits, targets, masks)
    assert scores.shape == (3,)
    assert scores.tolist() == pytest.approx([0.5, 0.2, 1.0], abs=1e-6)


def test_region_adherence_soft_mask_weights_and_empty_mask():
    targets = torch.zeros(2, 3, 2, 2)
    edits = torch.zeros(2, 3, 2, 2)
    edits[0, :, 0, 0] = 0.3  # error 0.09 per channel at one pixel
    masks = torch.zeros(2, 2, 2)
    masks[0, 0, 0] = 0.5
    masks[0, 1, 1] = 0.5  # error 0 there: weighted MSE = (0.5 * 0.09) / (0.5 + 0.5) = 0.045
    scores = region_adherence(edits, targets, masks)
    assert scores[0].item() == pytest.approx(1 / (1 + 4.5), abs=1e-6)
    assert scores[1].item() == 0.0  # empty mask, CompBench's convention


def test_region_adherence_separates_ground_truth_from_unchanged_source():
    samples = generate_shapes_edit(48, "train", seed=11)
    sources = torch.stack([s.source for s in samples])
    targets = torch.stack([s.target for s in samples])
    masks = torch.stack([s.mask for s in samples])
    assert torch.equal(region_adherence(targets, targets, masks), torch.ones(48))
    unchanged = region_adherence(sources, targets, masks)
    for kind in ("recolour", "remove", "add", "replace"):
        kind_scores = torch.tensor([u for u, s in zip(unchanged, samples, strict=True) if s.kind == kind])
        assert len(kind_scores) == 12
        assert kind_scores.mean() < 0.25, (kind, kind_scores)
        assert kind_scores.max() < 0.7, (kind, kind_scores)


# -- background_psnr -------------------------------------------------------------------------------


def test_background_psnr_hand_computed():
    sources = torch.zeros(3, 3, 4, 4)
    masks = _half_mask(3)
    edits = torch.zeros(3, 3, 4, 4)
    edits[0] = 0.1
    edits[0, :, :, :2] = 1.0  # inside the mask: zeroed, no error
    # MSE over all 48 values = 0.01 on the 24 background ones -> 0.005 -> -10 log10(0.005)
    edits[1] = 0.5
    masks[1] = 0  # empty mask: MSE 0.25 everywhere -> 6.0206 dB
    edits[2, :, :, :2] = 0.7  # only the edit region differs: identical backgrounds -> cap
    psnr = background_psnr(edits, sources, masks)
    assert psnr.tolist() == pytest.approx(
        [-10 * math.log10(0.005), -10 * math.log10(0.25), PSNR_CAP_DB], abs=1e-4
    )
    assert PSNR_CAP_DB == 100.0


# -- background_ssim -------------------------------------------------------------------------------


def test_background_ssim_hand_computed_constants():
    # Constant images: every window has mu_x = a, mu_y = b, zero variances, so
    # SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = 0.01^2.
    edits = torch.full((3, 3, 16, 16), 0.5)
    sources = torch.full((3, 3, 16, 16), 0.25)
    sources[1] = 0.5
    masks = torch.zeros(3, 16, 16)
    masks[2] = 1  # everything zeroed in both -> identical
    c1 = 0.01**2
    expected = [(2 * 0.5 * 0.25 + c1) / (0.25 + 0.0625 + c1), 1.0, 1.0]
    assert background_ssim(edits, sources, masks).tolist() == pytest.approx(expected, abs=1e-5)


def test_background_ssim_matches_torchmetrics_as_compbench_calls_it():
    tm = pytest.importorskip("torchmetrics.image")
    g = torch.Generator().manual_seed(0)
    sources = torch.rand(2, 3, 24, 20, generator=g)
    edits = (sources + 0.1 * torch.randn(2, 3, 24, 20, generator=g)).clamp(0, 1)
    masks = (torch.rand(2, 24, 20, generator=g) > 0.7).float()
    ours = background_ssim(edits, sources, masks)
    for i in range(2):
        background = 1 - masks[i]
        reference = tm.StructuralSimilarityIndexMeasure(data_range=1.0)(
            edits[i : i + 1] * background, sources[i : i + 1] * background
        )
        assert ours[i].item() == pytest.approx(reference.item(), abs=1e-5)
    assert 0.5 < ours.min() < ours.max() < 1.0


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [region_adherence, background_psnr, background_ssim])
def test_wrong_shapes_are_named(fn):
    images = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"masks \(2, 16, 17\)"):
        fn(images, images, torch.zeros(2, 16, 17))
    with pytest.raises(ValueError, match=r"masks \(2, 1, 16, 16\)"):
        fn(images, images, torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(2, 3, 16, 16\).*\(1, 3, 16, 16\)"):
        fn(images, images[:1], torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match=r"\(2, 4, 16, 16\)"):
        fn(torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 16, 16), torch.zeros(2, 16, 16))
