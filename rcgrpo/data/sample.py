"""One editing example, the unit every dataset loader yields and every evaluator consumes."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass
class EditSample:
    """An instruction-guided local edit.

    source and target are float RGB in [0, 1], shape (3, H, W); mask is (H, W) with values in {0, 1}
    (1 = the region the edit should change). target is None where no ground truth exists (a user's
    own data). kind is the edit type ("recolour", "remove", "add", "replace", or a CompBench task
    name). meta holds JSON-serialisable extras (object lists, file paths).
    """

    id: str
    source: torch.Tensor
    mask: torch.Tensor
    instruction: str
    caption: str
    target: torch.Tensor | None = None
    kind: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def task(self) -> str:
        """The task the sample is averaged under: CompBench's task name, else the edit kind."""
        return self.meta.get("task") or self.kind or "all"

    def __post_init__(self):
        if self.source.ndim != 3 or self.source.shape[0] != 3:
            raise ValueError(f"sample {self.id!r}: source must be (3, H, W), got {tuple(self.source.shape)}")
        if self.mask.shape != self.source.shape[1:]:
            raise ValueError(
                f"sample {self.id!r}: mask shape {tuple(self.mask.shape)} differs from source "
                f"spatial shape {tuple(self.source.shape[1:])}"
            )
        if self.target is not None and self.target.shape != self.source.shape:
            raise ValueError(
                f"sample {self.id!r}: target shape {tuple(self.target.shape)} differs from source "
                f"shape {tuple(self.source.shape)}"
            )


# -- reading images from disk or bytes (shared by the CompBench and manifest loaders) ------------------


def open_image(source: str | Path | bytes, name: str) -> Image.Image:
    """Decode an image file or encoded bytes completely; errors name `name` (a path or row id)."""
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise FileNotFoundError(f"image file not found: {name}")
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()  # decode now, so a truncated file fails here and not later
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {name}: {error}") from error
    return image


def _resize_shape(size: int | tuple[int, int] | None, image: Image.Image) -> tuple[int, int] | None:
    """PIL's (width, height) for a target size given as int (square) or (H, W); None keeps the size."""
    if size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else size
    return None if (width, height) == image.size else (width, height)


def image_to_tensor(image: Image.Image, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """(3, H, W) float RGB in [0, 1]; resized bicubically to size (int: square, tuple: (H, W))."""
    image = image.convert("RGB")
    shape = _resize_shape(size, image)
    if shape is not None:
        image = image.resize(shape, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def mask_to_tensor(image: Image.Image, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """(H, W) float {0, 1}: grey levels, nearest resize, /255, then 1 where >= 0.5."""
    image = image.convert("L")
    shape = _resize_shape(size, image)
    if shape is not None:
        image = image.resize(shape, Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(image, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32))


def load_sample(
    id: str,
    source: str | Path | bytes,
    mask: str | Path | bytes,
    target: str | Path | bytes | None,
    instruction: str,
    caption: str,
    kind: str,
    meta: dict,
    names: dict[str, str],
    size: int | tuple[int, int] | None = None,
) -> EditSample:
    """Read source, mask and optional target (paths or encoded bytes) into an EditSample.

    names maps "source"/"mask"/"target" to what error messages call each image. The mask and
    target must have the source's pixel size before any resize.
    """
    source_image = open_image(source, names["source"])
    mask_image = open_image(mask, names["mask"])
    if mask_image.size != source_image.size:
        raise ValueError(
            f"mask {names['mask']} is {mask_image.size[0]}x{mask_image.size[1]} but source "
            f"{names['source']} is {source_image.size[0]}x{source_image.size[1]} (width x height)"
        )
    target_tensor = None
    if target is not None:
        target_image = open_image(target, names["target"])
        if target_image.size != source_image.size:
            raise ValueError(
                f"target {names['target']} is {target_image.size[0]}x{target_image.size[1]} but source "
                f"{names['source']} is {source_image.size[0]}x{source_image.size[1]} (width x height)"
            )
        target_tensor = image_to_tensor(target_image, size)
    return EditSample(
        id=id,
        source=image_to_tensor(source_image, size),
        mask=mask_to_tensor(mask_image, size),
        instruction=instruction,
        caption=caption,
        target=target_tensor,
        kind=kind,
        meta=meta,
    )
