"""The softmax-distance surrogate policy of Neighbor GRPO, made mask-aware (docs/METHOD.md section 5.2).

Under deterministic ODE sampling a candidate has no likelihood, so Neighbor GRPO scores candidates by
how close they lie to the policy's one-step prediction from an anchor's stored state:

    x_theta        = x^(k)_j + (sigma_{j+1} - sigma_j) v_theta(x^(k)_j, sigma_j, c)    (Euler, with gradient)
    pi_theta(i|k,j) = softmax_i( -d(x^(i)_{j+1}, x_theta) / tau )

For theta_old the rollout took exactly that Euler step, so its prediction is the anchor's stored next
state x^(k)_{j+1}: pi_old needs no forward pass.
"""

from __future__ import annotations

import torch

from rcgrpo.editor import EditCondition, Editor
from rcgrpo.sampler import euler_step


def one_step_prediction(
    editor: Editor,
    states: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    cond: EditCondition,
) -> torch.Tensor:
    """x_theta for M (anchor, step) pairs: states (M, N, D), sigma and sigma_next (M,), cond of batch M."""
    v = editor.velocity(states, sigma, cond)
    # same arithmetic as the rollout's step, so theta == theta_old reproduces the stored x_{j+1}
    return euler_step(states, v, sigma[:, None, None], sigma_next[:, None, None])


def masked_distance(
    candidates: torch.Tensor, prediction: torch.Tensor, token_weights: torch.Tensor | None
) -> torch.Tensor:
    """d_i = sum_u w(u) ||x^(i)(u) - x_theta(u)||^2 / sum_u w(u), per-element mean over the token dim D.

    candidates (..., G, N, D), prediction (..., N, D), token_weights (N,) or (..., N) (one mask per
    leading index, e.g. per row of a batch mixing groups) or None (plain mean over tokens) -> (..., G).
    Only tokens with w(u) > 0 can influence d, so the background (w = 0) cannot move the policy.
    """
    per_token = (candidates.float() - prediction.float().unsqueeze(-3)).pow(2).mean(dim=-1)  # (..., G, N)
    if token_weights is None:
        return per_token.mean(dim=-1)
    weights = token_weights.to(per_token.device, torch.float32)
    if weights.shape[-1] != per_token.shape[-1]:
        raise ValueError(f"token weights {tuple(weights.shape)} do not match {per_token.shape[-1]} tokens")
    total = weights.sum(dim=-1, keepdim=True)  # (..., 1)
    if not (total > 0).all():
        raise ValueError("token weights sum to zero: the editing mask is empty at token resolution")
    return (per_token * weights.unsqueeze(-2)).sum(dim=-1) / total


def policy_log_probs(
    candidates_next: torch.Tensor,
    prediction: torch.Tensor,
    token_weights: torch.Tensor | None,
    tau: float,
    distance_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi(i|k,j) = log_softmax_i(-d(x^(i)_{j+1}, prediction) / (c tau)): (M, G, N, D), (M, N, D) -> (M, G).

    c (M,) is the distance scale of each (anchor, step) row (`neighbour_distance_scale`); None: c = 1.
    """
    d = masked_distance(candidates_next, prediction, token_weights)
    if distance_scale is not None:
        d = d / distance_scale.unsqueeze(-1)
    return torch.log_softmax(-d / tau, dim=-1)


def neighbour_distance_scale(
    candidates_next: torch.Tensor, anchors: torch.Tensor, token_weights: torch.Tensor | None
) -> torch.Tensor:
    """c(k, j): the mean distance from the anchor's stored x^(k)_{j+1} to the other candidates' x^(i)_{j+1}.

    candidates_next (M, G, N, D), anchors (M,) -> (M,). How far apart the group's candidates lie changes
    along the ODE and between edits (METHOD section 5), while an update moves x_theta by dt times a
    change of velocity; dividing d by c makes tau a temperature relative to the group's own spread, so
    pi_old has a similar entropy at every timestep. Computed from stored states only (theta_old), so
    it is a constant of the update.
    """
    rows = torch.arange(len(anchors), device=candidates_next.device)
    d = masked_distance(candidates_next, candidates_next[rows, anchors], token_weights)  # (M, G), d_kk = 0
    others = d.sum(dim=-1) / (d.shape[-1] - 1)
    return others.clamp_min(torch.finfo(torch.float32).tiny)


def clipped_surrogate_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    log_ratio_clamp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per (anchor, step) row: -mean_i min(A_i r, A_i clip(r, 1 - eps, 1 + eps)).

    All inputs (M, G) over M (anchor, step) rows and G candidates. Returns (loss (M,), ratio (M, G));
    L = loss.mean() is -mean_{k,j,i} min(...). Note that r is per candidate i: the ratio of the
    softmax probabilities pi_theta(i|k,j) / pi_old(i|k,j) over the group's candidates, not of a
    trajectory likelihood.
    """
    # r = exp(clamp(log pi_theta - log pi_old, +-clamp)): the clamp keeps exp finite early in training
    ratio = torch.exp((log_probs - old_log_probs).clamp(-log_ratio_clamp, log_ratio_clamp))
    unclipped = advantages * ratio
    clipped = advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return -torch.min(unclipped, clipped).mean(dim=-1), ratio
