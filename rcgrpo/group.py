"""One rollout group, sampled as the method does it (docs/METHOD.md sections 2-4): the edit's condition, RDP
initial noise around a shared base noise, the deterministic Euler rollout with text-attention capture,
and R_ACD per candidate. The rollout worker, `rcgrpo demo` and the benchmarks all sample through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rcgrpo.acd import acd_reward
from rcgrpo.attention import capture_text_attention
from rcgrpo.config import MethodConfig
from rcgrpo.data.sample import EditSample
from rcgrpo.editor import EditCondition, Editor
from rcgrpo.noise import group_noise, latent_mask, token_background, token_weights
from rcgrpo.sampler import Rollout, rollout
from rcgrpo.train_step import TrainGroup


@dataclass
class GroupStart:
    """What a group's rollout starts from."""

    cond: EditCondition  # batch 1: the edit's condition
    mask_latent: torch.Tensor  # (h, w) m at latent resolution, dilated and feathered as configured
    initial_latents: torch.Tensor  # (G, C, h, w) z_i


@dataclass
class SampledGroup:
    """A rolled-out group and what training and scoring need from it besides the images."""

    cond: EditCondition  # batch 1
    rollout: Rollout  # sigmas, kept states x_j, images (G, 3, H, W)
    token_weights: torch.Tensor  # (N,) w(u): the editing mask at token resolution
    background_weights: torch.Tensor  # (N,) each token's share of background pixels
    acd: torch.Tensor  # (G,) R_ACD per candidate

    def train_group(self, advantages: torch.Tensor) -> TrainGroup:
        """The TrainGroup of this group with advantages A_i (G,)."""
        return TrainGroup(
            cond=self.cond,
            sigmas=self.rollout.sigmas,
            kept_states=self.rollout.kept_states,
            states=self.rollout.states,
            token_weights=self.token_weights,
            advantages=advantages,
            background_weights=self.background_weights,
        )


def start_group(editor: Editor, cfg: MethodConfig, sample: EditSample, noise_seed: int) -> GroupStart:
    """The condition, the latent mask and the G initial latents of `sample`'s group.

    `noise_seed` seeds z* and then the d_i, so the same seed gives the same group anywhere.
    """
    cond = editor.encode_condition(sample.source[None], [sample.instruction], cfg.guidance_scale)
    h, w = editor.latent_size(cond.height, cond.width)
    mask_latent = latent_mask(sample.mask, (h, w), cfg.mask_dilation, cfg.mask_feather)
    generator = torch.Generator().manual_seed(noise_seed)
    # RDP: z_i = sqrt(1 - s^2) z* + s d_i with s = s_in inside the mask, s_out outside (global if not cfg.rdp)
    initial = group_noise(cfg, mask_latent, (editor.latent_channels, h, w), generator)
    return GroupStart(cond, mask_latent, initial)


@torch.no_grad()
def sample_group(
    editor: Editor,
    cfg: MethodConfig,
    sample: EditSample,
    noise_seed: int,
    kept_states: Sequence[int] | None = None,
) -> SampledGroup:
    """Roll out `sample`'s group of cfg.group_size candidates with the editor's current weights.

    `kept_states`: grid indices whose states to keep for training (None: all).
    """
    start = start_group(editor, cfg, sample, noise_seed)
    group_cond = start.cond.repeat(cfg.group_size)
    with capture_text_attention(editor, cfg.acd_layers) as capture:
        result = rollout(
            editor,
            group_cond,
            start.initial_latents,
            cfg.num_steps,
            kept_states,
            capture.attention_kwargs(group_cond),
            lora_steps=cfg.lora_step_indices,
        )
        attention = capture.attention_map()
    w = token_weights(start.mask_latent)  # w(u)
    return SampledGroup(
        cond=start.cond,
        rollout=result,
        token_weights=w,
        background_weights=token_background(sample.mask, start.mask_latent.shape),
        acd=acd_reward(attention, w > 0.5),  # R_ACD per candidate
    )
