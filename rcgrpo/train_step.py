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
from rcgrpo.lora import base_weights, lora_parameters
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
    kept_states: list[int]  # grid indices j of the kept states
    states: torch.Tensor  # (S, G, N, D) x_j for j in kept_states
    token_weights: torch.Tensor  # (N,) w(u): the editing mask at token resolution
    advantages: torch.Tensor  # (G,) A_i
    # (N,) share of each token's pixels outside the mask (rcgrpo.noise.token_background); None: 1 - w(u)
    background_weights: torch.Tensor | None = None

    def __post_init__(self):
        if self.cond.prompt_embeds.shape[0] != 1:
            raise ValueError(f"TrainGroup.cond must have batch 1, got {self.cond.prompt_embeds.shape[0]}")
        if self.states.ndim != 4 or self.states.shape[0] != len(self.kept_states):
            raise ValueError(
                f"states must be (S, G, N, D) with S = {len(self.kept_states)} kept indices, "
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
        bad = [j for j in self.kept_states if not 0 <= j < len(self.sigmas)]
        if bad:
            raise ValueError(f"state indices {bad} are outside the {len(self.sigmas) - 1}-step grid")

    def anchor_weights(self) -> torch.Tensor:
        """b(u) of the background anchor: background_weights, else 1 - w(u)."""
        return self.background_weights if self.background_weights is not None else 1 - self.token_weights

    def training_indices(self) -> list[int]:
        """Grid indices j whose step j -> j+1 can be trained on: both x_j and x_{j+1} were kept."""
        kept = set(self.kept_states)
        return [j for j in self.kept_states if j + 1 in kept]


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
    # Where the first update's gradient comes from (before clipping). Per group given, in order:
    # ||g_group|| of its surrogate term, and its share <g_group, g> / ||g||^2 of the whole gradient g
    # (the shares and the anchor's sum to 1; 0 for a group skipped for zero advantages)
    group_gradient_norm: list[float] = field(default_factory=list)
    group_gradient_share: list[float] = field(default_factory=list)
    surrogate_gradient_norm: float = math.nan  # ||sum of the groups' surrogate gradients||
    anchor_gradient_norm: float = math.nan  # ||beta_bg * gradient of the background anchor||
    anchor_surrogate_cosine: float = math.nan  # cos(anchor gradient, surrogate gradient)


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
    trained = set(cfg.trained_steps)
    valid = torch.tensor([j for j in group.training_indices() if j in trained], dtype=torch.long)
    if len(valid) < cfg.steps_per_anchor:
        raise ValueError(
            f"the group kept states {group.kept_states}, which give {len(valid)} trainable steps j -> j+1 "
            f"among the trained steps {cfg.trained_steps}; cfg.steps_per_anchor={cfg.steps_per_anchor} "
            "needs at least that many"
        )
    anchors = torch.randperm(group_size, generator=generator)[: cfg.anchors]
    steps = torch.stack(
        [valid[torch.randperm(len(valid), generator=generator)[: cfg.steps_per_anchor]] for _ in anchors]
    )
    return anchors, steps


def reference_prediction(
    editor: Editor, x_j: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, cond
) -> torch.Tensor:
    """x_ref: the base editor's one-step prediction (adapters disabled), without gradient."""
    with torch.no_grad(), base_weights(editor.transformer):
        return one_step_prediction(editor, x_j, sigma, sigma_next, cond)


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


def _candidates_next(groups: list[TrainGroup], position: list[dict[int, int]], g_rows: list[int], j, device):
    """x^(i)_{j+1} for all candidates i of rows (g, j): (R, G, N, D)."""
    nxt = [position[g][int(i) + 1] for g, i in zip(g_rows, j, strict=True)]
    return torch.stack([groups[g].states[s] for g, s in zip(g_rows, nxt, strict=True)]).to(device)


def _token_weights(groups: list[TrainGroup], g_rows: list[int], cfg: MethodConfig, device):
    """w(u) per row (R, N); None: Neighbor GRPO's plain distance over all tokens."""
    return torch.stack([groups[g].token_weights for g in g_rows]).to(device) if cfg.mask_aware else None


def _measured_scales(
    groups: list[TrainGroup], position: list[dict[int, int]], rows: _Rows, cfg, device, chunk: int
) -> torch.Tensor:
    """c(k, j) of every row of an epoch, from stored states only (a constant of the update): (M,).
    `chunk` rows at a time, so the candidates on the device are no more than a micro-batch's."""
    found = []
    for start in range(0, len(rows.anchor), chunk):
        g_rows = rows.group[start : start + chunk].tolist()
        candidates = _candidates_next(groups, position, g_rows, rows.step[start : start + chunk], device)
        anchors = rows.anchor[start : start + chunk].to(device)
        found.append(
            neighbour_distance_scale(candidates, anchors, _token_weights(groups, g_rows, cfg, device))
        )
    return torch.cat(found)


def _distance_scales(measured: torch.Tensor, steps: torch.Tensor, cfg: MethodConfig) -> torch.Tensor | None:
    """The c each row's distances are divided by: None ("none"), the row's own ("neighbours"), or the
    mean over the batch's rows at the same grid index ("batch"). A group whose candidates collapsed
    onto each other (c ~ 1e-4 of its neighbours') gets gradients ~ 1/sqrt(c) under its own scale; under
    the batch's its softmax stays near uniform and its gradient small."""
    if cfg.distance_scale == "none":
        return None
    if cfg.distance_scale == "neighbours":
        return measured
    scales = torch.zeros_like(measured)
    # unique() on the host's steps and masked sums: unique() or boolean indexing on the device would be
    # data-dependent shapes, a host sync each (`rcgrpo plan --trace` finds them)
    for j in steps.unique():
        at_j = (steps == j).to(measured.device, measured.dtype)
        scales += at_j * ((measured * at_j).sum() / at_j.sum())
    return scales


def _flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params]
    )


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
    diagnose: bool = True,
) -> StepStats:
    """`cfg.update_epochs` policy updates on one batch of scored groups.

    Every update samples B anchors x K steps per group afresh; the loss is the mean over all rows of
    all groups (every group has B * K rows, so it is also the mean of the groups' losses). Rows go
    through the transformer group by group, `micro_batch_rows` at a time (None: a group's rows at
    once), with gradients accumulated, so peak memory is bounded by the micro-batch, not by
    B * K * groups; the result equals the unbatched update up to float rounding. diagnose: on the
    first update, also measure each group's and the background anchor's part of the gradient (one
    extra backward per micro-batch and two copies of the LoRA's gradient).
    """
    if micro_batch_rows is not None and micro_batch_rows < 1:
        raise ValueError(f"micro_batch_rows must be >= 1 (got {micro_batch_rows})")
    given = len(groups)
    # groups whose rewards were all equal have A = 0: no signal, skip their forward pass
    signal = [i for i, g in enumerate(groups) if g.advantages.abs().max() > 0]
    groups = [groups[i] for i in signal]
    if not groups:
        return StepStats(num_groups=0, group_gradient_norm=[0.0] * given, group_gradient_share=[0.0] * given)
    device = editor.device
    params = [p for param_group in optimizer.param_groups for p in param_group["params"]]
    position = [{index: s for s, index in enumerate(g.kept_states)} for g in groups]

    losses, surrogates, anchor_terms, grad_norms, ratios, log_ratios, entropies = [], [], [], [], [], [], []
    scale_by_step: dict[int, list[float]] = {}
    group_grads: list[torch.Tensor] = []  # the first update's surrogate gradient of each group
    anchor_grad = None  # and its background anchor's
    epochs = [_sample_rows(groups, cfg, generator) for _ in range(cfg.update_epochs)]
    if cfg.background_anchor > 0:
        # at most as many rows per no-grad forward as the epochs' forwards take (all of one epoch: None)
        x_refs = _reference_predictions(
            editor, groups, position, epochs, micro_batch_rows or len(epochs[0].anchor)
        )
    for epoch, rows in enumerate(epochs):
        measuring = diagnose and epoch == 0
        num_rows = len(rows.anchor)
        with torch.no_grad():
            # c(k, j): the candidates' own distance scale at each row's step, always measured; the
            # distances are divided by it (or by its batch mean) as cfg.distance_scale says
            measured = _measured_scales(groups, position, rows, cfg, device, micro_batch_rows or num_rows)
            scales = _distance_scales(measured, rows.step, cfg)
        for i, c in zip(rows.step.tolist(), measured.tolist(), strict=True):
            scale_by_step.setdefault(i, []).append(c)
        optimizer.zero_grad(set_to_none=True)
        update_loss = update_surrogate = update_anchor = 0.0
        if measuring:
            before = _flat_grad(params)  # zeros
            group_grads = [torch.zeros_like(before) for _ in groups]
            anchor_grad = torch.zeros_like(before) if cfg.background_anchor > 0 else None
        for g in range(len(groups)):
            of_group = (rows.group == g).nonzero().flatten().tolist()
            chunk = micro_batch_rows or len(of_group)
            for start in range(0, len(of_group), chunk):
                index = of_group[start : start + chunk]
                g_rows = [g] * len(index)
                k_host = rows.anchor[index]  # host copy for the lookups: no sync per row
                k = k_host.to(device)
                j = rows.step[index]
                x_j, sigma, sigma_next, cond = _row_inputs(
                    groups, position, g_rows, k_host, j, device
                )  # x^(k)_j: (R, N, D)
                candidates_next = _candidates_next(
                    groups, position, g_rows, j, device
                )  # x^(i)_{j+1}: (R, G, N, D)
                weights = _token_weights(groups, g_rows, cfg, device)
                advantages = torch.stack([groups[i].advantages for i in g_rows]).to(device, torch.float32)
                scale = None if scales is None else scales[index]
                with torch.no_grad():
                    # pi_old: theta_old's one-step prediction is the anchor's stored x^(k)_{j+1}
                    stored_next = candidates_next[torch.arange(len(k), device=device), k]
                    old_log_probs = policy_log_probs(candidates_next, stored_next, weights, cfg.tau, scale)
                    entropies.append(-(old_log_probs.exp() * old_log_probs).sum(dim=-1))
                # x_theta = x^(k)_j + (sigma_{j+1} - sigma_j) v_theta(x^(k)_j, sigma_j, c): the only term with gradient
                x_theta = one_step_prediction(editor, x_j, sigma, sigma_next, cond)
                log_probs = policy_log_probs(
                    candidates_next, x_theta, weights, cfg.tau, scale
                )  # log pi_theta
                surrogate, ratio = clipped_surrogate_loss(
                    log_probs, old_log_probs, advantages, cfg.clip_eps, cfg.log_ratio_clamp
                )
                anchor = None
                if cfg.background_anchor > 0:
                    # beta_bg * mean_bg ||v_theta - v_ref||^2, in the same micro-batch as the surrogate
                    background = torch.stack([groups[i].anchor_weights() for i in g_rows]).to(device)
                    x_ref = torch.stack(
                        [x_refs[(i, int(a), int(t))] for i, a, t in zip(g_rows, k_host, j, strict=True)]
                    )
                    anchor = background_anchor_loss(x_theta, x_ref, sigma, sigma_next, background)
                    update_anchor += anchor.detach().sum() / num_rows
                loss = surrogate if anchor is None else surrogate + cfg.background_anchor * anchor
                if measuring:
                    # the group's surrogate and the anchor backward apart: what each adds to the gradient
                    (surrogate.sum() / num_rows).backward(retain_graph=anchor is not None)
                    accumulated = _flat_grad(params)
                    group_grads[g] += accumulated - before
                    if anchor is not None:
                        (cfg.background_anchor * anchor.sum() / num_rows).backward()
                        before = _flat_grad(params)
                        anchor_grad += before - accumulated
                    else:
                        before = accumulated
                else:
                    (loss.sum() / num_rows).backward()
                # the diagnostics stay on the device: one sync per update, not per micro-batch
                update_loss += loss.detach().sum() / num_rows
                update_surrogate += surrogate.detach().sum() / num_rows
                ratios.append(ratio.detach().flatten())
                log_ratios.append((log_probs - old_log_probs).detach().flatten())

        grad_norms.append(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        losses.append(update_loss)
        surrogates.append(update_surrogate)
        anchor_terms.append(update_anchor if cfg.background_anchor > 0 else math.nan)

    ratio, log_ratio, entropy = (torch.cat(t).float().cpu() for t in (ratios, log_ratios, entropies))
    losses, surrogates, anchor_terms, grad_norms = (
        [float(v) for v in values] for values in (losses, surrogates, anchor_terms, grad_norms)
    )
    deviation = (ratio - 1.0).abs()
    attribution = _gradient_attribution(group_grads, anchor_grad, signal, given) if diagnose else {}
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
        **attribution,
    )


def _gradient_attribution(
    group_grads: list[torch.Tensor], anchor_grad: torch.Tensor | None, signal: list[int], given: int
) -> dict:
    """Norms and shares of the first update's gradient by group (all `given`, 0 for those skipped) and
    the anchor's norm and cosine to the surrogate's."""
    surrogate = torch.stack(group_grads).sum(dim=0)
    total = surrogate + (anchor_grad if anchor_grad is not None else 0)
    squared = total.pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
    norms, shares = [0.0] * given, [0.0] * given
    for i, grad in zip(signal, group_grads, strict=True):
        norms[i] = grad.norm().item()
        shares[i] = (grad @ total / squared).item()
    found = {
        "group_gradient_norm": norms,
        "group_gradient_share": shares,
        "surrogate_gradient_norm": surrogate.norm().item(),
    }
    if anchor_grad is not None:
        found["anchor_gradient_norm"] = anchor_grad.norm().item()
        found["anchor_surrogate_cosine"] = torch.nn.functional.cosine_similarity(
            anchor_grad, surrogate, dim=0
        ).item()
    return found
