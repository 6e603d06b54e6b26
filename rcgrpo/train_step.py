"""One RC-GRPO policy update (docs/METHOD.md sections 2 and 5), cleanrl style: for each of `update_epochs`
passes over a batch of scored groups, sample anchors and steps, compute the mask-aware surrogate's
clipped loss (plus the background anchor), backward in micro-batches of rows, clip the gradient,
take one optimiser step. The step also measures the learning signal (pi_old's entropy, |r - 1|,
clip fraction, the candidates' distance scale per timestep) so a run shows whether the policy moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rcgrpo.config import MethodConfig
from rcgrpo.editor import EditCondition, Editor
from rcgrpo.lora import lora_parameters
from rcgrpo.surrogate import (
    clipped_surrogate_loss,
    neighbour_distance_scale,
    one_step_prediction,
    policy_log_probs,
)


@dataclass
class TrainGroup:
    """One scored rollout group: what the learner needs from a `rcgrpo.sampler.Rollout` and its rewards."""

    cond: EditCondition  # batch 1: the group's edit
    sigmas: torch.Tensor  # (T + 1,) the Euler grid the rollout used
    state_indices: list[int]  # grid indices j of the kept states
    states: torch.Tensor  # (S, G, N, D) x_j for j in state_indices
    token_weights: torch.Tensor  # (N,) w(u): the editing mask at token resolution
    advantages: torch.Tensor  # (G,) A_i
    # (N,) share of each token's pixels outside the mask (rcgrpo.noise.token_background); None: 1 - w(u)
    background_weights: torch.Tensor | None = None

    def __post_init__(self):
        if self.cond.prompt_embeds.shape[0] != 1:
            raise ValueError(f"TrainGroup.cond must have batch 1, got {self.cond.prompt_embeds.shape[0]}")
        if self.states.ndim != 4 or self.states.shape[0] != len(self.state_indices):
            raise ValueError(
                f"states must be (S, G, N, D) with S = {len(self.state_indices)} kept indices, "
                f"got {tuple(self.states.shape)}"
            )
        _, group_size, num_tokens, _ = self.states.shape
        if self.advantages.shape != (group_size,):
            raise ValueError(f"advantages must be ({group_size},), got {tuple(self.advantages.shape)}")
        if self.token_weights.shape != (num_tokens,):
            raise ValueError(f"token_weights must be ({num_tokens},), got {tuple(self.token_weights.shape)}")
        if self.background_weights is not None and self.background_weights.shape != (num_tokens,):
            raise ValueError(
                f"background_weights must be ({num_tokens},), got {tuple(self.background_weights.shape)}"
            )
        bad = [j for j in self.state_indices if not 0 <= j < len(self.sigmas)]
        if bad:
            raise ValueError(f"state indices {bad} are outside the {len(self.sigmas) - 1}-step grid")

    def anchor_weights(self) -> torch.Tensor:
        """b(u) of the background anchor: background_weights, else 1 - w(u)."""
        return self.background_weights if self.background_weights is not None else 1 - self.token_weights

    def training_indices(self) -> list[int]:
        """Grid indices j whose step j -> j+1 can be trained on: both x_j and x_{j+1} were kept."""
        kept = set(self.state_indices)
        return [j for j in self.state_indices if j + 1 in kept]


@dataclass
class StepStats:
    """What one update did and how strong its learning signal was. Without a group that carries
    signal (`num_groups == 0`) nothing is updated and every measurement is NaN."""

    num_groups: int  # groups that contributed (groups with all-zero advantages are skipped)
    num_updates: int = 0  # optimiser steps taken (update_epochs, or 0)
    loss: float = math.nan  # surrogate + beta_bg * anchor, mean over the updates
    surrogate_loss: float = math.nan
    background_anchor_loss: float = math.nan  # mean_bg ||v_theta - v_ref||^2 (without beta_bg)
    clip_fraction: float = math.nan  # share of (update, k, j, i) with |r - 1| > eps
    ratio_mean: float = math.nan
    ratio_min: float = math.nan
    ratio_max: float = math.nan
    ratio_deviation_p50: float = math.nan  # quantiles of |r - 1| over (update, k, j, i)
    ratio_deviation_p90: float = math.nan
    ratio_deviation_max: float = math.nan
    approx_kl: float = math.nan  # mean of (r - 1) - log r, an estimate of KL(pi_old || pi_theta)
    policy_entropy: float = math.nan  # mean over (k, j) of H(pi_old(. | k, j)), nats
    effective_neighbours: float = math.nan  # mean of exp(H): how many candidates pi_old spreads over
    grad_norm: float = math.nan  # before clipping, mean over the updates
    # grid index j -> mean over the sampled (k, j) of the candidates' mean distance to the anchor
    distance_scale: dict[int, float] = field(default_factory=dict)


def make_optimizer(transformer, cfg: MethodConfig) -> torch.optim.AdamW:
    """AdamW over the LoRA parameters (add_lora first)."""
    return torch.optim.AdamW(
        lora_parameters(transformer), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )


def sample_anchor_steps(
    group: TrainGroup, cfg: MethodConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """B anchors k out of G, and for each K distinct training indices j: (B,) and (B, K) long tensors."""
    group_size = group.states.shape[1]
    if cfg.anchors > group_size:
        raise ValueError(f"cfg.anchors={cfg.anchors} exceeds the group size {group_size}")
    trained = set(cfg.train_steps)
    valid = torch.tensor([j for j in group.training_indices() if j in trained], dtype=torch.long)
    if len(valid) < cfg.timesteps_per_anchor:
        raise ValueError(
            f"the group kept states {group.state_indices}, which give {len(valid)} trainable steps j -> j+1 "
            f"among the trained steps {cfg.train_steps}; cfg.timesteps_per_anchor={cfg.timesteps_per_anchor} "
            "needs at least that many"
        )
    anchors = torch.randperm(group_size, generator=generator)[: cfg.anchors]
    steps = torch.stack(
        [valid[torch.randperm(len(valid), generator=generator)[: cfg.timesteps_per_anchor]] for _ in anchors]
    )
    return anchors, steps


def reference_prediction(
    editor: Editor, x_j: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, cond
) -> torch.Tensor:
    """x_ref: the base editor's one-step prediction (adapters disabled), without gradient."""
    with torch.no_grad():
        editor.transformer.disable_adapters()
        try:
            return one_step_prediction(editor, x_j, sigma, sigma_next, cond)
        finally:
            editor.transformer.enable_adapters()


def background_anchor_loss(
    x_theta: torch.Tensor,
    x_ref: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    background_weights: torch.Tensor,
) -> torch.Tensor:
    """Per row: sum_u b(u) ||v_theta(u) - v_ref(u)||^2 / sum_u b(u), per-element mean over D, with b(u)
    the background share of token u (TrainGroup.background_weights): (M,).

    background_weights is (N,) or one row per (anchor, step) row, (M, N). v_ref is the base editor's
    velocity (reference_prediction); v_theta and v_ref are recovered from the one-step predictions.
    Velocities, not states, so the term does not vanish as dt shrinks. A row without background (the
    mask covers the image) contributes 0.
    """
    dt = (sigma_next - sigma)[:, None, None]
    per_token = ((x_theta.float() - x_ref.float()) / dt).pow(2).mean(dim=-1)  # (M, N)
    background = background_weights.float().expand_as(per_token)
    total = background.sum(dim=-1)
    return (per_token * background).sum(dim=-1) / total.clamp_min(torch.finfo(torch.float32).tiny)


@dataclass
class _Rows:
    """The (group g, anchor k, step j) rows of one update, flattened across groups."""

    group: torch.Tensor  # (M,) index into the batch of groups
    anchor: torch.Tensor  # (M,) k
    step: torch.Tensor  # (M,) j


def _sample_rows(groups: list[TrainGroup], cfg: MethodConfig, generator: torch.Generator) -> _Rows:
    parts = []
    for g, group in enumerate(groups):
        anchors, steps = sample_anchor_steps(group, cfg, generator)
        k = anchors.repeat_interleave(steps.shape[1])  # B x K rows: (B * K,)
        parts.append((torch.full_like(k, g), k, steps.reshape(-1)))
    return _Rows(*(torch.cat(p) for p in zip(*parts, strict=True)))


def _row_inputs(groups: list[TrainGroup], position: list[dict[int, int]], g_rows: list[int], k, j, device):
    """x^(k)_j (R, N, D), sigma_j, sigma_{j+1} (R,) and the edit conditions of rows (g, k, j)."""
    now = [position[g][int(i)] for g, i in zip(g_rows, j, strict=True)]
    x_j = torch.stack([groups[g].states[s, int(a)] for g, s, a in zip(g_rows, now, k, strict=True)])
    sigma = torch.stack([groups[g].sigmas[int(i)] for g, i in zip(g_rows, j, strict=True)])
    sigma_next = torch.stack([groups[g].sigmas[int(i) + 1] for g, i in zip(g_rows, j, strict=True)])
    cond = EditCondition.cat([groups[g].cond for g in g_rows])
    return x_j.to(device), sigma.to(device), sigma_next.to(device), cond


def _reference_predictions(
    editor: Editor,
    groups: list[TrainGroup],
    position: list[dict[int, int]],
    epochs: list[_Rows],
    chunk: int,
) -> dict[tuple[int, int, int], torch.Tensor]:
    """x_ref for every distinct (g, k, j) row the update's epochs sampled, `chunk` rows per forward: the
    base editor does not change during the update, so each row's reference pass is made once, not once
    per epoch that samples it."""
    distinct = sorted(
        {
            (int(g), int(k), int(j))
            for rows in epochs
            for g, k, j in zip(rows.group, rows.anchor, rows.step, strict=True)
        }
    )
    found = {}
    for start in range(0, len(distinct), chunk):
        part = distinct[start : start + chunk]
        g_rows, k, j = (
            [r[0] for r in part],
            torch.tensor([r[1] for r in part]),
            torch.tensor([r[2] for r in part]),
        )
        x_ref = reference_prediction(editor, *_row_inputs(groups, position, g_rows, k, j, editor.device))
        found.update(zip(part, x_ref, strict=True))
    return found


def rc_grpo_step(
    editor: Editor,
    optimizer: torch.optim.Optimizer,
    groups: list[TrainGroup],
    cfg: MethodConfig,
    generator: torch.Generator,
    micro_batch_rows: int | None = None,
) -> StepStats:
    """`cfg.update_epochs` policy updates on one batch of scored groups.

    Every update samples B anchors x K steps per group afresh; the loss is the mean over all rows of
    all groups (every group has B * K rows, so it is also the mean of the groups' losses). Rows go
    through the transformer `micro_batch_rows` at a time (None: all at once) with gradients
    accumulated, so peak memory is bounded by the micro-batch, not by B * K * groups; the result
    equals the unbatched update up to float rounding.
    """
    if micro_batch_rows is not None and micro_batch_rows < 1:
        raise ValueError(f"micro_batch_rows must be >= 1 (got {micro_batch_rows})")
    # groups whose rewards were all equal have A = 0: no signal, skip their forward pass
    groups = [g for g in groups if g.advantages.abs().max() > 0]
    if not groups:
        return StepStats(num_groups=0)
    device = editor.device
    params = [p for param_group in optimizer.param_groups for p in param_group["params"]]
    position = [{index: s for s, index in enumerate(g.state_indices)} for g in groups]

    losses, surrogates, anchor_terms, grad_norms, ratios, log_ratios, entropies = [], [], [], [], [], [], []
    scale_by_step: dict[int, list[float]] = {}
    epochs = [_sample_rows(groups, cfg, generator) for _ in range(cfg.update_epochs)]
    if cfg.background_anchor > 0:
        # at most as many rows per no-grad forward as the epochs' forwards take (all of one epoch: None)
        x_refs = _reference_predictions(
            editor, groups, position, epochs, micro_batch_rows or len(epochs[0].anchor)
        )
    for rows in epochs:
        num_rows = len(rows.anchor)
        chunk = micro_batch_rows or num_rows
        optimizer.zero_grad(set_to_none=True)
        update_loss = update_surrogate = update_anchor = 0.0
        for start in range(0, num_rows, chunk):
            g_rows = rows.group[start : start + chunk].tolist()
            k_host = rows.anchor[start : start + chunk]  # host copy for the lookups: no sync per row
            k = k_host.to(device)
            j = rows.step[start : start + chunk]
            x_j, sigma, sigma_next, cond = _row_inputs(
                groups, position, g_rows, k_host, j, device
            )  # x^(k)_j: (R, N, D)
            nxt = [position[g][int(i) + 1] for g, i in zip(g_rows, j, strict=True)]
            candidates_next = torch.stack([groups[g].states[s] for g, s in zip(g_rows, nxt, strict=True)])
            candidates_next = candidates_next.to(device)  # x^(i)_{j+1} for all i: (R, G, N, D)
            # w(u) per row; None: Neighbor GRPO's plain distance over all tokens
            weights = (
                torch.stack([groups[g].token_weights for g in g_rows]).to(device) if cfg.mask_aware else None
            )
            advantages = torch.stack([groups[g].advantages for g in g_rows]).to(device, torch.float32)

            with torch.no_grad():
                # c(k, j): the candidates' own distance scale at this step, always measured; the
                # distances are divided by it only with distance_scale="neighbours"
                measured = neighbour_distance_scale(candidates_next, k, weights)
                for i, c in zip(j.tolist(), measured.tolist(), strict=True):
                    scale_by_step.setdefault(i, []).append(c)
                scale = measured if cfg.distance_scale == "neighbours" else None
                # pi_old: theta_old's one-step prediction is the anchor's stored x^(k)_{j+1}
                stored_next = candidates_next[torch.arange(len(k), device=device), k]
                old_log_probs = policy_log_probs(candidates_next, stored_next, weights, cfg.tau, scale)
                entropies.append(-(old_log_probs.exp() * old_log_probs).sum(dim=-1).cpu())
            # x_theta = x^(k)_j + (sigma_{j+1} - sigma_j) v_theta(x^(k)_j, sigma_j, c): the only term with gradient
            x_theta = one_step_prediction(editor, x_j, sigma, sigma_next, cond)
            log_probs = policy_log_probs(candidates_next, x_theta, weights, cfg.tau, scale)  # log pi_theta
            surrogate, ratio = clipped_surrogate_loss(
                log_probs, old_log_probs, advantages, cfg.clip_eps, cfg.log_ratio_clamp
            )
            loss = surrogate
            if cfg.background_anchor > 0:
                # beta_bg * mean_bg ||v_theta - v_ref||^2, in the same micro-batch as the surrogate
                background = torch.stack([groups[g].anchor_weights() for g in g_rows]).to(device)
                x_ref = torch.stack(
                    [x_refs[(g, int(a), int(i))] for g, a, i in zip(g_rows, k_host, j, strict=True)]
                )
                anchor = background_anchor_loss(x_theta, x_ref, sigma, sigma_next, background)
                loss = loss + cfg.background_anchor * anchor
                update_anchor += anchor.detach().sum().item() / num_rows
            (loss.sum() / num_rows).backward()
            update_loss += loss.detach().sum().item() / num_rows
            update_surrogate += surrogate.detach().sum().item() / num_rows
            ratios.append(ratio.detach().flatten().cpu())
            log_ratios.append((log_probs - old_log_probs).detach().flatten().cpu())

        grad_norms.append(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item())
        optimizer.step()
        losses.append(update_loss)
        surrogates.append(update_surrogate)
        anchor_terms.append(update_anchor if cfg.background_anchor > 0 else math.nan)

    ratio, log_ratio, entropy = torch.cat(ratios), torch.cat(log_ratios), torch.cat(entropies)
    deviation = (ratio - 1.0).abs()
    return StepStats(
        num_groups=len(groups),
        num_updates=cfg.update_epochs,
        loss=sum(losses) / len(losses),
        surrogate_loss=sum(surrogates) / len(surrogates),
        background_anchor_loss=sum(anchor_terms) / len(anchor_terms),
        clip_fraction=(deviation > cfg.clip_eps).float().mean().item(),
        ratio_mean=ratio.mean().item(),
        ratio_min=ratio.min().item(),
        ratio_max=ratio.max().item(),
        ratio_deviation_p50=deviation.quantile(0.5).item(),
        ratio_deviation_p90=deviation.quantile(0.9).item(),
        ratio_deviation_max=deviation.max().item(),
        approx_kl=((ratio - 1.0) - log_ratio.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)).mean().item(),
        policy_entropy=entropy.mean().item(),
        effective_neighbours=entropy.exp().mean().item(),
        grad_norm=sum(grad_norms) / len(grad_norms),
        distance_scale={i: sum(v) / len(v) for i, v in sorted(scale_by_step.items())},
    )
