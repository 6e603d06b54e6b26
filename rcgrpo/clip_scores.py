"""Local CLIP scores of an edit (CompBench's LC-T and LC-I, docs/METHOD.md section 7).

Both look only at the bounding box of the editing mask: LC-T is torchmetrics' CLIPScore,
100 * max(cos(E_crop, E_caption), 0), of the edit's crop against the caption; LC-I is the plain cosine of
the CLIP image embeddings of the same crop in the edit and in the ground truth. An empty mask scores 0.

Images are scored as 8-bit pictures, the way CompBench's evaluator reads them from PNG files, so an edit
scored in memory and the same edit saved and read back score the same. CLIP is loaded from a local
directory only (transformers CLIPModel + CLIPProcessor, e.g. a download of openai/clip-vit-large-patch14).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounding as a PNG save does."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def mask_bbox(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels where mask > 0, as CompBench's evaluator computes it.

    right and bottom are the last masked column and row, and the crop (PIL's `crop`) excludes them; a mask
    with no pixels, or one only a single row or column wide, has no box (None).
    """
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    if len(ys) == 0:
        return None
    left, top, right, bottom = xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


def crop_to_mask(image: torch.Tensor, mask: torch.Tensor):
    """The 8-bit PIL crop of `image` (3, H, W) to the box of `mask` (H, W), or None without a box."""
    from PIL import Image

    box = mask_bbox(mask)
    if box is None:
        return None
    left, top, right, bottom = box
    return Image.fromarray(to_uint8(image[:, top:bottom, left:right]))


class ClipScorer:
    """A CLIP model and its processor, scoring local text (LC-T) and image (LC-I) similarity."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeddings(self, images: list) -> torch.Tensor:
        """PIL images -> (n, d) projected CLIP image embeddings (not normalised)."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return self.model.get_image_features(pixel_values=pixels).pooler_output.float()

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (n, d) projected CLIP text embeddings (not normalised).

        As torchmetrics' CLIPScore: pad to the longest text and cut at the model's maximum positions.
        An empty caption is scored as " " (CompBench's fallback).
        """
        tokens = self.processor(text=[t or " " for t in texts], return_tensors="pt", padding=True)
        limit = self.model.config.text_config.max_position_embeddings
        input_ids = tokens["input_ids"][:, :limit].to(self.device)
        attention_mask = tokens["attention_mask"][:, :limit].to(self.device)
        return self.model.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask
        ).pooler_output.float()

    def lc_t(self, edits: torch.Tensor, masks: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """LC-T per edit: 100 * max(cos(E_crop, E_caption), 0) on the mask's box; 0 without a box.

        edits (B, 3, H, W) in [0, 1], masks (B, H, W), one caption per edit -> (B,) float32 on the CPU.
        """
        _check_batch(edits, masks, "edits")
        if len(captions) != edits.shape[0]:
            raise ValueError(f"{len(captions)} captions for {edits.shape[0]} edits")
        scores = torch.zeros(edits.shape[0])
        crops = [crop_to_mask(e, m) for e, m in zip(edits, masks, strict=True)]
        kept = [i for i, c in enumerate(crops) if c is not None]
        if kept:
            image = _normalise(self.image_embeddings([crops[i] for i in kept]))
            text = _normalise(self.text_embeddings([captions[i] for i in kept]))
            scores[kept] = (100 * (image * text).sum(-1)).clamp(min=0).cpu()
        return scores

    def lc_i(self, edits: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """LC-I per edit: cos(E_crop(edit), E_crop(target)) on the mask's box; 0 without a box.

        edits and targets (B, 3, H, W) in [0, 1], masks (B, H, W) -> (B,) float32 on the CPU.
        """
        _check_batch(edits, masks, "edits")
        if targets.shape != edits.shape:
            raise ValueError(f"targets {tuple(targets.shape)} and edits {tuple(edits.shape)} differ in shape")
        scores = torch.zeros(edits.shape[0])
        kept = [i for i in range(edits.shape[0]) if mask_bbox(masks[i]) is not None]
        if kept:
            crops = [crop_to_mask(edits[i], masks[i]) for i in kept]
            crops += [crop_to_mask(targets[i], masks[i]) for i in kept]
            embeddings = _normalise(self.image_embeddings(crops))
            edit_emb, target_emb = embeddings[: len(kept)], embeddings[len(kept) :]
            scores[kept] = (edit_emb * target_emb).sum(-1).cpu()
        return scores


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


def _check_batch(images: torch.Tensor, masks: torch.Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be (B, 3, H, W), got {tuple(images.shape)}")
    if masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"masks must be (B, H, W) = {(images.shape[0], *images.shape[2:])}, got {tuple(masks.shape)}"
        )


def load_clip(directory: str | Path, device: str | torch.device | None = None) -> ClipScorer:
    """A ClipScorer from a local CLIP directory (CLIPModel + CLIPProcessor files); nothing is downloaded."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(
            f"CLIP directory {str(path)!r} does not exist; rcgrpo loads CLIP from local directories only "
            "(CompBench uses openai/clip-vit-large-patch14: download it yourself, then pass its path)"
        )
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"CLIP directory {str(path)!r} has no config.json (not a CLIPModel directory)"
        )
    model = CLIPModel.from_pretrained(path, local_files_only=True)
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    if device is not None:
        model.to(device)
    return ClipScorer(model, processor)


def build_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised tiny CLIP (model + processor) to `directory`, offline (for tests)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from rcgrpo.tiny_editor import _clip_tokenizer

    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    path = Path(directory)
    model.save_pretrained(path, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
