"""One RC-GRPO policy update (docs/METHOD.md section 5), cleanrl style: sample anchors and steps,
compute the mask-aware surrogate's clipped loss, backward, clip the gradient, one optimiser step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcgrpo.config import MethodConfig
from rcgrpo.editor import EditCondition, Editor
from rcgrpo.lora import lora_parameters
from rcgrpo.surrogate import clipped_surrogate_loss, one_step_prediction, policy_log_probs


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
    loss: float
    clip_fraction: float  # fraction of (k, j, i) with |r - 1| > eps
    ratio_mean: float
    ratio_min: float
    ratio_max: float
    grad_norm: float  # before clipping
    num_groups: int  # groups that contributed (groups with all-zero advantages are skipped)


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
    valid = torch.tensor(group.training_indices(), dtype=torch.long)
    if len(valid) < cfg.timesteps_per_anchor:
        raise ValueError(
            f"the group kept states {group.state_indices}, which give {len(valid)} trainable steps j -> j+1; "
            f"cfg.timesteps_per_anchor={cfg.timesteps_per_anchor} needs at least that many"
        )
    anchors = torch.randperm(group_size, generator=generator)[: cfg.anchors]
    steps = torch.stack(
        [valid[torch.randperm(len(valid), generator=generator)[: cfg.timesteps_per_anchor]] for _ in anchors]
    )
    return anchors, steps


def background_anchor_loss(
    editor: Editor,
    x_j: torch.Tensor,
    x_theta: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    cond,
    background_weights: torch.Tensor,
) -> torch.Tensor:
    """mean_{(k,j)} sum_u b(u) ||v_theta(u) - v_ref(u)||^2 / sum_u b(u), per-element mean over D, with b(u)
    the background share of token u (TrainGroup.background_weights).

    v_ref is the base editor's velocity (adapters disabled); v_theta is recovered from x_theta, so the
    anchor costs one extra no-grad forward pass. Velocities, not states, so the term does not vanish
    as dt shrinks.
    """
    dt = (sigma_next - sigma)[:, None, None]
    with torch.no_grad():
        editor.transformer.disable_adapters()
        try:
            x_ref = one_step_prediction(editor, x_j, sigma, sigma_next, cond)
        finally:
            editor.transformer.enable_adapters()
    per_token = ((x_theta.float() - x_ref.float()) / dt).pow(2).mean(dim=-1)  # (M, N)
    background = background_weights.float()
    if not background.sum() > 0:
        return per_token.new_zeros(())
    return ((per_token * background).sum(dim=-1) / background.sum()).mean()


def rc_grpo_step(
    editor: Editor,
    optimizer: torch.optim.Optimizer,
    groups: list[TrainGroup],
    cfg: MethodConfig,
    generator: torch.Generator,
) -> StepStats:
    """One policy update on a batch of scored groups; the loss is the mean of the groups' losses."""
    if not groups:
        raise ValueError("rc_grpo_step needs at least one group")
    device = editor.device
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # groups whose rewards were all equal have A = 0: no signal, skip their forward pass
    groups = [g for g in groups if g.advantages.abs().max() > 0]
    if not groups:
        return StepStats(0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0)

    optimizer.zero_grad(set_to_none=True)
    total_loss, ratios = 0.0, []
    for group in groups:
        anchors, steps = sample_anchor_steps(group, cfg, generator)
        # flatten the B x K (anchor k, step j) pairs into M = B * K rows
        k = anchors.repeat_interleave(steps.shape[1])  # (M,)
        j = steps.reshape(-1)  # (M,)
        position = {index: s for s, index in enumerate(group.state_indices)}
        now = torch.tensor([position[int(i)] for i in j])
        nxt = torch.tensor([position[int(i) + 1] for i in j])
        states = group.states.to(device)
        x_j = states[now, k]  # x^(k)_j: (M, N, D)
        candidates_next = states[nxt]  # x^(i)_{j+1} for all i: (M, G, N, D)
        sigmas = group.sigmas.to(device)
        weights = group.token_weights.to(device) if cfg.mask_aware else None  # w(u)

        with torch.no_grad():
            # pi_old: theta_old's one-step prediction is the anchor's stored x^(k)_{j+1}
            old_log_probs = policy_log_probs(
                candidates_next, candidates_next[torch.arange(len(k)), k], weights, cfg.tau
            )
        # x_theta = x^(k)_j + (sigma_{j+1} - sigma_j) v_theta(x^(k)_j, sigma_j, c): the only term with gradient
        x_theta = one_step_prediction(editor, x_j, sigmas[j], sigmas[j + 1], group.cond.repeat(len(k)))
        log_probs = policy_log_probs(candidates_next, x_theta, weights, cfg.tau)  # log pi_theta(i|k,j)
        advantages = group.advantages.to(device, torch.float32).expand_as(log_probs)  # A_i for every (k, j)
        loss, ratio = clipped_surrogate_loss(
            log_probs, old_log_probs, advantages, cfg.clip_eps, cfg.log_ratio_clamp
        )
        if cfg.background_anchor > 0:
            loss = loss + cfg.background_anchor * background_anchor_loss(
                editor,
                x_j,
                x_theta,
                sigmas[j],
                sigmas[j + 1],
                group.cond.repeat(len(k)),
                group.anchor_weights().to(device),
            )
        # accumulate per group so only one group's activations are alive at a time
        (loss / len(groups)).backward()
        total_loss += loss.item() / len(groups)
        ratios.append(ratio.detach().flatten())

    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    ratio = torch.cat(ratios)
    return StepStats(
        loss=total_loss,
        clip_fraction=((ratio - 1.0).abs() > cfg.clip_eps).float().mean().item(),
        ratio_mean=ratio.mean().item(),
        ratio_min=ratio.min().item(),
        ratio_max=ratio.max().item(),
        grad_norm=grad_norm.item(),
        num_groups=len(groups),
    )
