import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rcgrpo import compbench_metrics
from rcgrpo.clip_scores import build_tiny_clip, crop_to_mask, load_clip, mask_bbox
from rcgrpo.compbench_metrics import CompBenchMetrics, group_means, mean3, round3, task_means

# With the tiny CLIP (seed 0), this caption's embedding has a positive cosine with the random crops
# below and this one a negative cosine, so LC-T is exercised both above and at its clamp.
POSITIVE, NEGATIVE = "green triangle", "a red circle"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return load_clip(build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny"))


def _picture(seed, height, width):
    """Random 8-bit RGB picture as a float tensor (exact through PNG and PIL)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=g).float() / 255


class _TensorFeatures(torch.nn.Module):
    """CLIP with transformers-4 style feature methods (projected tensors), which torchmetrics expects."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _official(ori, edited, mask, gt, caption, clip):
    """CompBench's eval_all.py calculate_metrics (PSNR, SSIM, LC-T, LC-I) on PIL images, with its
    torchmetrics modules; only the CLIP feature calls go through the transformers-5 adapter."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from torchmetrics.multimodal import CLIPScore

    ori, edited, gt = (im.resize((512, 512), resample=Image.Resampling.BICUBIC) for im in (ori, edited, gt))
    mask = mask.resize((512, 512), resample=Image.Resampling.NEAREST)

    def to_tensor(pil):
        return torch.tensor(np.array(pil).astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)

    keep = torch.tensor(1 - np.array(mask, dtype=np.float32) / 255.0)[None, None]
    bg_ori, bg_edited = to_tensor(ori) * keep, to_tensor(edited) * keep
    results = {
        "PSNR": PeakSignalNoiseRatio(data_range=1.0)(bg_edited, bg_ori).item(),
        "SSIM": StructuralSimilarityIndexMeasure(data_range=1.0)(bg_edited, bg_ori).item(),
    }
    y, x = np.where(np.array(mask) > 0)
    bbox = (x.min(), y.min(), x.max(), y.max())
    crop_edited, crop_gt = edited.crop(bbox), gt.crop(bbox)
    model = _TensorFeatures(clip.model)
    score = CLIPScore(model_name_or_path=lambda: (model, clip.processor))
    results["LC-T"] = score(torch.tensor(np.array(crop_edited)).permute(2, 0, 1), caption).item()
    inputs = clip.processor(images=[crop_edited, crop_gt], return_tensors="pt")
    feats = model.get_image_features(inputs["pixel_values"])
    results["LC-I"] = F.cosine_similarity(feats[0:1], feats[1:2]).item()
    return results


def _pil(image):
    return Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())


def test_scores_match_the_official_evaluator(clip):
    # non-square, non-512 pictures so the bicubic/nearest resizes matter
    sources = [_picture(s, 40, 56) for s in (0, 1)]
    edits = [_picture(s, 40, 56) for s in (2, 3)]
    targets = [_picture(s, 40, 56) for s in (4, 5)]
    masks = [torch.zeros(40, 56) for _ in range(2)]
    masks[0][5:20, 10:30] = 1
    masks[1][12:35, 3:50] = 1
    captions = [POSITIVE, NEGATIVE]
    ours = CompBenchMetrics(clip, lpips=None).score(sources, edits, masks, targets, captions)
    for i in range(2):
        official = _official(
            _pil(sources[i]),
            _pil(edits[i]),
            Image.fromarray((masks[i] * 255).byte().numpy()),
            _pil(targets[i]),
            captions[i],
            clip,
        )
        assert ours[i]["PSNR"] == round(official["PSNR"], 3)
        assert ours[i]["SSIM"] == round(official["SSIM"], 3)
        for metric in ("LC-T", "LC-I"):
            assert ours[i][metric] == pytest.approx(round(official[metric], 3), abs=1e-3 + 1e-9)
    # both sides of LC-T's clamp were exercised
    assert ours[0]["LC-T"] > 0 and ours[1]["LC-T"] == 0.0


def test_background_psnr_by_hand_and_mask_region_ignored():
    size = 64
    source = torch.full((3, size, size), 128 / 255)
    edit = source.clone()
    edit[:, :, : size // 2] = 153 / 255  # the left half (all background) is off by 25 levels
    edit[:, :, 3 * size // 4 :] = 0.0  # inside the mask: ignored
    mask = torch.zeros(size, size)
    mask[:, 3 * size // 4 :] = 1
    metrics = CompBenchMetrics(None, lpips=None, size=size)
    (row,) = metrics.score([source], [edit], [mask], [None], ["x"])
    # MSE over all 3*H*W values, half of which differ by 25/255 (the masked quarter is zero in both)
    mse = 0.5 * (25 / 255) ** 2
    assert row["PSNR"] == round(10 * math.log10(1 / mse), 3) == 23.182
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    keep = (1 - mask)[None, None]
    expected_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)(edit[None] * keep, source[None] * keep)
    assert row["SSIM"] == round(expected_ssim.item(), 3) < 1
    assert set(row) == {"PSNR", "SSIM"} and metrics.missing.keys() == {"LC-T", "LC-I", "LPIPS"}
    # changing only pixels under the mask leaves the background perfect
    inside_only = source.clone()
    inside_only[:, :, 3 * size // 4 :] = 1.0
    (row,) = metrics.score([source], [inside_only], [mask], [None], ["x"])
    assert row["PSNR"] == math.inf and row["SSIM"] == 1.0


def test_mask_bbox_follows_pil_crop_semantics():
    mask = torch.zeros(32, 32)
    mask[10:20, 5:9] = 1
    assert mask_bbox(mask) == (5, 10, 8, 19)
    crop = crop_to_mask(_picture(0, 32, 32), mask)
    assert crop.size == (3, 9)  # PIL crop excludes the last masked column and row
    assert mask_bbox(torch.zeros(32, 32)) is None
    line = torch.zeros(32, 32)
    line[4, 2:30] = 1  # one row high: no box, as in the official evaluator
    assert mask_bbox(line) is None


def _embed_by_hand(clip, crop, caption):
    model = clip.model
    pixels = clip.processor(images=[crop], return_tensors="pt")["pixel_values"]
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    tokens = clip.processor.tokenizer([caption], return_tensors="pt")
    text = model.text_projection(model.text_model(**tokens).pooler_output)
    return image, text


@torch.no_grad()
def test_lc_t_and_lc_i_equal_hand_computed_embeddings(clip):
    edits = torch.stack([_picture(10, 48, 48), _picture(11, 48, 48), _picture(12, 48, 48)])
    targets = torch.stack([_picture(20, 48, 48), _picture(21, 48, 48), _picture(22, 48, 48)])
    masks = torch.zeros(3, 48, 48)
    masks[0, 4:30, 6:40] = 1
    masks[1, 20:44, 2:25] = 1  # the third mask is empty
    lc_t = clip.lc_t(edits, masks, [POSITIVE, NEGATIVE, POSITIVE])
    lc_i = clip.lc_i(edits, targets, masks)
    for i, caption in enumerate((POSITIVE, NEGATIVE)):
        crop = crop_to_mask(edits[i], masks[i])
        image, text = _embed_by_hand(clip, crop, caption)
        cos = F.cosine_similarity(image, text).item()
        assert lc_t[i].item() == pytest.approx(100 * max(cos, 0.0), abs=1e-4)
        target_image, _ = _embed_by_hand(clip, crop_to_mask(targets[i], masks[i]), caption)
        assert lc_i[i].item() == pytest.approx(F.cosine_similarity(image, target_image).item(), abs=1e-5)
    assert lc_t[0] > 0 and lc_t[1] == 0  # cos < 0 is clamped
    assert lc_t[2] == 0 and lc_i[2] == 0  # empty mask
    # an edit that equals the ground truth inside the box has LC-I = 1
    same = clip.lc_i(edits[:1], edits[:1], masks[:1])
    assert same.item() == pytest.approx(1.0, abs=1e-5)


def test_rounding_and_macro_averages_on_a_toy_table():
    nan = math.nan
    rows = [
        {"task": "add", "PSNR": 20.0, "LC-I": 0.5},
        {"task": "add", "PSNR": 21.0, "LC-I": nan},  # no ground truth: skipped by the mean
        {"task": "remove", "PSNR": 30.001, "LC-I": 0.7},
        {"task": "remove", "PSNR": 30.002, "LC-I": 0.8},
        {"task": "remove", "PSNR": 30.002, "LC-I": 0.9},
        {"task": "replace", "PSNR": 25.0, "LC-I": 0.6},
        {"task": "implicit_reasoning", "PSNR": 18.0, "LC-I": 0.3},
    ]
    per_task = task_means(rows, ("PSNR", "LC-I"))
    assert per_task == {
        "add": {"count": 2, "PSNR": 20.5, "LC-I": 0.5},
        "remove": {"count": 3, "PSNR": 30.002, "LC-I": 0.8},  # 30.00166.. rounded
        "replace": {"count": 1, "PSNR": 25.0, "LC-I": 0.6},
        "implicit_reasoning": {"count": 1, "PSNR": 18.0, "LC-I": 0.3},
    }
    groups = group_means(per_task, ("PSNR", "LC-I"))
    # macro: mean of the three task means, (20.5 + 30.002 + 25.0) / 3 = 25.16733.., not the row mean 26.0008
    assert groups == {
        "Local Editing": {"tasks": 3, "PSNR": 25.167, "LC-I": 0.633},
        "Implicit Reasoning": {"tasks": 1, "PSNR": 18.0, "LC-I": 0.3},
    }
    assert round3(0.12351) == 0.124 and math.isnan(round3(nan)) and math.isnan(mean3([nan, nan]))


def test_load_clip_refuses_what_is_not_a_local_clip_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="local directories only"):
        load_clip("openai/clip-vit-large-patch14")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="local directories only"):
        load_clip(tmp_path / "file.txt")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip(tmp_path)


def test_lpips_without_torchvision_is_reported_missing_once(caplog, monkeypatch):
    if compbench_metrics.importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    monkeypatch.setattr(compbench_metrics, "_reported_missing", set())
    with caplog.at_level(logging.WARNING, logger="rcgrpo.compbench_metrics"):
        assert compbench_metrics.load_lpips() is None
        assert compbench_metrics.load_lpips() is None
    warnings = [r for r in caplog.records if "LPIPS" in r.getMessage()]
    assert len(warnings) == 1 and "torchvision" in warnings[0].getMessage()
    assert "torchvision" in CompBenchMetrics(None).missing["LPIPS"]
