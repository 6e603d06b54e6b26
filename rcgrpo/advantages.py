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


def groups_without_signal(
    rewards: torch.Tensor, instruction: torch.Tensor, eps: float, noise_floor: float, drop_noise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which groups carry no gradient: (flat, below_floor), bool (groups,) each, from the totals r_i and
    the instruction rewards (groups, G). below_floor: the instruction reward's within-group std is under
    `noise_floor` (its candidates differ by rounding and background jitter, not by following the
    instruction); flat: the total's std is under eps, or (drop_noise) the group is below the floor."""
    below_floor = instruction.float().std(dim=-1, unbiased=False) < noise_floor
    flat = zero_variance_groups(rewards, eps)
    return (flat | below_floor if drop_noise else flat), below_floor


def group_advantages(
    rewards: torch.Tensor, p: float = 0.8, clip: float = 5.0, eps: float = 1e-6, std_floor: float = 0.0
) -> torch.Tensor:
    """Rewards (..., G) -> advantages (..., G), standardised within each group along the last dim.

    Groups flagged by `zero_variance_groups(rewards, eps)` get all-zero advantages (never NaN).
    std_floor (sigma_min, reward units): the norm is at least that of a group whose deviations are all
    +-sigma_min, G^(1/p) sigma_min, so a group whose rewards barely differ gets advantages in proportion
    to its spread instead of being blown up to unit scale.
    """
    if p <= 0:
        raise ValueError(f"p must be > 0 (got {p})")
    if clip <= 0:
        raise ValueError(f"clip must be > 0 (got {clip})")
    if std_floor < 0:
        raise ValueError(f"std_floor must be >= 0 (got {std_floor})")
    flat = zero_variance_groups(rewards, eps)
    rewards = rewards.float()
    group_size = rewards.shape[-1]
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    # ||r - mean||_p = (sum_i |r_i - mean|^p)^(1/p); a quasi-norm for p < 1
    norm = centred.abs().pow(p).sum(dim=-1, keepdim=True).pow(1.0 / p)
    # max(||r - mean||_p, G^(1/p) sigma_min)
    norm = norm.clamp_min(group_size ** (1.0 / p) * std_floor)
    norm = torch.where(flat.unsqueeze(-1), torch.ones_like(norm), norm)
    advantages = math.sqrt(group_size) * centred / norm
    advantages = advantages.masked_fill(flat.unsqueeze(-1), 0.0)
    return advantages.clamp(-clip, clip)


def _row_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row pair of (n, G) tensors; NaN where either row is constant."""
    a, b = a - a.mean(dim=-1, keepdim=True), b - b.mean(dim=-1, keepdim=True)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(denom > 0, (a * b).sum(dim=-1) / denom.clamp_min(1e-30), torch.nan)


def _variance_share(total: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Cov(total, part) / Var(total) per row of (n, G) tensors; NaN where the total is constant."""
    centred = total - total.mean(dim=-1, keepdim=True)
    variance = centred.pow(2).sum(dim=-1)
    covariance = (centred * (part - part.mean(dim=-1, keepdim=True))).sum(dim=-1)
    return torch.where(variance > 0, covariance / variance.clamp_min(1e-30), torch.nan)


def reward_term_diagnostics(
    scores: dict[str, torch.Tensor],
    weights: dict[str, float],
    instruction_terms: list[str],
    p: float = 0.8,
    clip: float = 5.0,
    eps: float = 1e-6,
) -> dict:
    """Where a batch's advantages come from: the instruction term, or background and ACD noise.

    scores: reward name -> (groups, G) raw sub-scores; weights: name -> w_j of r_i = sum_j w_j r_ij.
    Returns, averaged over groups (NaN-skipping):
      term_std[name]               std_i(r_ij), the term's own within-group spread (unweighted: also
                                   measured for a term of weight 0, e.g. R_ACD with lambda_ACD = 0);
      term_spread[name]            w_j * std_i(r_ij), what each term adds to the within-group spread;
      instruction_dominant         share of groups whose instruction spread is the largest term's;
      advantage_instruction_corr   corr_i(A_i of r, A_i of the instruction terms alone);
      instruction_share            Cov_i(r, r_instruction) / Var_i(r): the instruction term's part of the
                                   total's variance (the terms' parts sum to 1; negative when the other
                                   terms pull the advantages against the instruction);
      acd_instruction_corr         corr_i(R_ACD, instruction reward), when ACD is scored;
    and per_group: the same numbers for each group (NaN where a group's term is constant).
    """
    missing = [name for name in instruction_terms if name not in scores]
    if missing:
        raise ValueError(f"instruction terms {missing} are not among the scored rewards {sorted(scores)}")
    weighted = {name: weights[name] * value.float() for name, value in scores.items()}
    total = sum(weighted.values())
    instruction = sum(weighted[name] for name in instruction_terms)
    std = {name: value.float().std(dim=-1, unbiased=False) for name, value in scores.items()}
    spread = {name: abs(weights[name]) * value for name, value in std.items()}
    others = [spread[name] for name in spread if name not in instruction_terms]
    instruction_spread = instruction.std(dim=-1, unbiased=False)
    dominant = (
        instruction_spread >= torch.stack(others).amax(dim=0)
        if others
        else torch.ones_like(instruction_spread)
    ).float()
    corr = _row_corr(group_advantages(total, p, clip, eps), group_advantages(instruction, p, clip, eps))
    share = _variance_share(total, instruction)
    acd_corr = _row_corr(scores["acd"].float(), instruction) if "acd" in scores else None
    per_group = [
        {
            "term_std": {name: value[g].item() for name, value in std.items()},
            "term_spread": {name: value[g].item() for name, value in spread.items()},
            "instruction_dominant": bool(dominant[g]),
            "advantage_instruction_corr": corr[g].item(),
            "instruction_share": share[g].item(),
            **({"acd_instruction_corr": acd_corr[g].item()} if acd_corr is not None else {}),
        }
        for g in range(total.shape[0])
    ]
    result = {
        "term_std": {name: value.mean().item() for name, value in std.items()},
        "term_spread": {name: value.mean().item() for name, value in spread.items()},
        "instruction_dominant": dominant.mean().item(),
        "advantage_instruction_corr": corr.nanmean().item(),
        "instruction_share": share.nanmean().item(),
        "per_group": per_group,
    }
    if acd_corr is not None:
        result["acd_instruction_corr"] = acd_corr.nanmean().item()
    return result
