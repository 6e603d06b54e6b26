"""What every reward function reads: the items of one request or micro-batch, stacked.

Its own module so that the registry and the models its rewards call (the judge) both import it without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RewardBatch:
    """B items of one image size: edits, sources, targets (B,3,H,W) in [0,1], masks (B,H,W) in [0,1]."""

    edits: torch.Tensor
    sources: torch.Tensor
    masks: torch.Tensor
    instructions: list[str]
    captions: list[str]
    targets: torch.Tensor | None = None
    acd: torch.Tensor | None = None  # (B,) precomputed R_ACD
