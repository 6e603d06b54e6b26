"""Deterministic ODE rollouts of a group of candidates (docs/METHOD.md section 2).

The flow ODE dx/dsigma = v_theta(x, sigma, c) is integrated with first-order Euler steps on the
editor's Kontext sigma grid, as `FluxKontextPipeline.__call__` does (in float32 it is the same
arithmetic; in bf16 the state stays float32 here, see `euler_step`), so that for theta_old the
surrogate's one-step prediction from a stored state equals the stored next state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rcgrpo.editor import EditCondition, Editor
from rcgrpo.lora import base_weights


@dataclass
class Rollout:
    """One group of G candidates integrated from their initial latents to images."""

    sigmas: torch.Tensor  # (T + 1,) the grid, 1 -> 0
    kept_states: list[int]  # grid indices j whose states x_j were kept
    states: torch.Tensor  # (len(kept_states), G, N, D) packed latents x_j on the grid, float32
    final_latents: torch.Tensor  # (G, N, D) x_T, float32
    images: torch.Tensor  # (G, 3, H, W) in [0, 1]


def states_of_steps(num_steps: int, steps: Sequence[int] | None) -> list[int]:
    """Grid-state indices to keep so the surrogate can use steps j -> j+1 for every j in `steps`.

    None keeps every grid state (0..T).
    """
    if steps is None:
        return list(range(num_steps + 1))
    bad = [j for j in steps if not 0 <= j < num_steps]
    if bad:
        raise ValueError(
            f"trained steps {bad} are outside the {num_steps}-step grid (0..{num_steps - 1})"
        )
    return sorted({i for j in steps for i in (j, j + 1)})


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """x_{j+1} = x_j + (sigma_{j+1} - sigma_j) v in float32, and kept in float32.

    diffusers' Euler scheduler rounds x_{j+1} back to the model's dtype; the ODE state here stays
    float32 (only the transformer's input is cast), because the surrogate compares states: a bf16
    state has a step of 2^-8 |x|, coarser than what one update moves x_theta by, so pi_theta could not
    see the update and the background anchor's (x_theta - x_ref) / dt would be mostly rounding.
    """
    return x.float() + (sigma_next - sigma).float() * v.float()


@torch.no_grad()
def rollout(
    editor: Editor,
    cond: EditCondition,
    initial_latents: torch.Tensor,
    num_steps: int,
    kept_states: Sequence[int] | None = None,
    attention_kwargs: dict | None = None,
    decode: bool = True,
    lora_steps: Sequence[int] | None = None,
) -> Rollout:
    """Integrate G candidates from `initial_latents` (G, C, h, w, unpacked) under condition `cond`.

    `cond` is either one condition (batch 1, repeated for the group) or one per candidate.
    `kept_states` lists grid indices to keep (None: all). `attention_kwargs` are passed to the
    transformer's attention processors (used by attention capture). `lora_steps` lists the grid
    indices j whose step j -> j+1 uses the LoRA (None: every step); the others use the base weights.
    """
    if initial_latents.ndim != 4:
        raise ValueError(f"initial latents must be (G, C, h, w), got {tuple(initial_latents.shape)}")
    group_size, channels, h, w = initial_latents.shape
    if channels != editor.latent_channels or (h, w) != editor.latent_size(cond.height, cond.width):
        raise ValueError(
            f"initial latents {tuple(initial_latents.shape[1:])} do not match the editor's latent shape "
            f"{(editor.latent_channels, *editor.latent_size(cond.height, cond.width))}"
        )
    if cond.prompt_embeds.shape[0] == 1 and group_size > 1:
        cond = cond.repeat(group_size)
    grid = editor.sigmas(num_steps, cond.height, cond.width)  # on the host: the record carries it
    sigmas = grid.to(editor.device)
    keep = list(range(num_steps + 1)) if kept_states is None else sorted(set(kept_states))
    x = editor.pack(initial_latents.to(editor.device, torch.float32))
    kept = [x] if 0 in keep else []
    for j in range(num_steps):
        if lora_steps is None or j in lora_steps:
            v = editor.velocity(x, sigmas[j], cond, attention_kwargs)
        else:
            with base_weights(editor.transformer):
                v = editor.velocity(x, sigmas[j], cond, attention_kwargs)
        x = euler_step(x, v, sigmas[j], sigmas[j + 1])
        if j + 1 in keep:
            kept.append(x)
    images = editor.decode(x, cond.height, cond.width) if decode else torch.empty(0)
    return Rollout(sigmas=grid, kept_states=keep, states=torch.stack(kept), final_latents=x, images=images)
