"""Group-relative advantages (docs/METHOD.md section 2): the Lp quasi-norm standardisation of Neighbor GRPO.

A_i = sqrt(G) (r_i - mean(r)) / ||r - mean(r)||_p, clipped to +-clip. p = 2 is the usual z-score
(population std); p < 1 (default 0.8) is a quasi-norm that weighs many small deviations more than a
few large ones. A group whose rewards are all (nearly) equal carries no signal: it gets zero
advantages instead of a 0/0, and `zero_variance_groups` reports it so the caller can drop it.
"""

from __future__ import annotations

import math

import torch


def zero_variance_groups(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """Rewards (..., G) -> bool (...): True where the group's reward std (population) is below eps."""
    if rewards.ndim < 1 or rewards.shape[-1] < 2:
        raise ValueError(f"rewards must be (..., G) with G >= 2, got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    return rewards.float().std(dim=-1, unbiased=False) < eps


def group_advantages(
    rewards: torch.Tensor, p: float = 0.8, clip: float = 5.0, eps: float = 1e-6
) -> torch.Tensor:
    """Rewards (..., G) -> advantages (..., G), standardised within each group along the last dim.

    Groups flagged by `zero_variance_groups(rewards, eps)` get all-zero advantages (never NaN).
    """
    if p <= 0:
        raise ValueError(f"p must be > 0 (got {p})")
    if clip <= 0:
        raise ValueError(f"clip must be > 0 (got {clip})")
    flat = zero_variance_groups(rewards, eps)
    rewards = rewards.float()
    group_size = rewards.shape[-1]
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    # ||r - mean||_p = (sum_i |r_i - mean|^p)^(1/p); a quasi-norm for p < 1
    norm = centred.abs().pow(p).sum(dim=-1, keepdim=True).pow(1.0 / p)
    norm = torch.where(flat.unsqueeze(-1), torch.ones_like(norm), norm)
    advantages = math.sqrt(group_size) * centred / norm
    advantages = advantages.masked_fill(flat.unsqueeze(-1), 0.0)
    return advantages.clamp(-clip, clip)
