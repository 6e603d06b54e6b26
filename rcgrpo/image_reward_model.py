"""A learned image reward model from a local directory: a transformers image classifier (any
AutoModelForImageClassification, e.g. a ViT or SigLIP fine-tuned to score edits) with its image
processor; one of its logits is the reward. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rcgrpo.clip_scores import to_uint8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ImageRewardModel:
    """Scores a batch of images with one forward pass of the classifier."""

    def __init__(self, model, processor, label_index: int = 0):
        num_labels = model.config.num_labels
        if not 0 <= label_index < num_labels:
            raise ValueError(f"label_index {label_index} is not among the model's {num_labels} labels")
        self.model = model.eval()
        self.processor = processor
        self.label_index = label_index

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def score(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) float in [0, 1] -> Tensor[B] float32: the chosen logit per image."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
        pixels = self.processor(images=[to_uint8(image) for image in images], return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(self.device, self.dtype)
        logits = self.model(pixel_values=pixel_values).logits
        return logits[:, self.label_index].float().cpu()


def load_reward_model(
    directory: str | Path,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    label_index: int = 0,
) -> ImageRewardModel:
    """The reward model in `directory` (config.json, weights, preprocessor_config.json), in `dtype`, on
    `device` (default: CUDA when there is one)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    path = Path(directory)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"reward model directory {str(path)!r} has no config.json")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}; got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageClassification.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype])
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return ImageRewardModel(model.to(device), processor, label_index)


def build_tiny_reward_model(directory: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised tiny ViT regressor (one logit) and its processor (for tests)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_labels=1,
    )
    torch.manual_seed(seed)
    directory = Path(directory)
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory
