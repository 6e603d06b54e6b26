"""One editing example, the unit every dataset loader yields and every evaluator consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
