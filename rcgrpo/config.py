"""The method's settings. Every [ours] choice of docs/METHOD.md is a field here, with its default, so an
ablation is a config change (RDP on/off, ACD weight, mask-aware distance, s_in/s_out, p, G, B, K).
"""

from __future__ import annotations

import warnings
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rcgrpo.rewards import DEFAULT_WEIGHTS


class ConfigSection(BaseModel):
    """The base of every config section of the project: an unknown field is an error, never ignored.
    A field renamed in this release is still read under its old name, with a warning that says the new
    one (`renamed`: old name -> new name; the old names go in the next release)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, values):
        if not isinstance(values, dict) or not cls.renamed.keys() & values.keys():
            return values
        values = dict(values)
        for old, new in cls.renamed.items():
            if old in values:
                if new in values:
                    raise ValueError(f"{old} is the old name of {new}: give {new} only")
                warnings.warn(
                    f"config field {old} is now {new}; the old name goes in the next release",
                    FutureWarning,
                    stacklevel=2,
                )
                values[new] = values.pop(old)
        return values


class MethodConfig(ConfigSection):
    renamed = {"timesteps_per_anchor": "steps_per_anchor"}

    # -- rollout (section 2) --
    group_size: int = Field(8, ge=2)  # G candidates per group (paper: 12)
    # paper: 8-step DPM++
    num_steps: int = Field(8, ge=1, description="Euler steps on the Kontext sigma grid")
    guidance_scale: float = Field(2.5, description="Kontext's embedded guidance")
    # -- RDP (section 3): s(u) = s_in m(u) + s_out (1 - m(u)) --
    rdp: bool = True  # False: global Neighbor-GRPO perturbation, s(u) = s_in everywhere
    s_in: float = Field(0.3, ge=0, le=1)
    s_out: float = Field(0.0, ge=0, le=1)  # background strength, 0 to 0.05
    mask_dilation: int = Field(0, ge=0)  # latent pixels of max-pool dilation of the latent mask
    mask_feather: float = Field(
        0.0, ge=0
    )  # std (latent pixels) of the Gaussian blur of the latent mask; 0 = hard
    # -- ACD (section 4) --
    acd_weight: float = Field(DEFAULT_WEIGHTS["acd"], ge=0)  # lambda_ACD
    acd_layers: str = "double"  # "double" (all dual-stream blocks), "all", or comma-separated block names
    # -- surrogate (sections 2 and 5) --
    anchors: int = Field(4, ge=1)  # B anchors sampled out of G
    steps_per_anchor: int = Field(4, ge=1)  # K trained grid steps per anchor
    # where on the T-step grid the trained steps begin, as a fraction of T: the surrogate (and the
    # background anchor) train on steps j -> j+1 with j >= floor(train_steps_from T). 0 = every step;
    # 0.5 = the late, low-noise half, where the edit's detail is decided (the early half sets the layout,
    # and a LoRA trained there repaints the background: docs/EXPERIMENTS.md)
    train_steps_from: float = Field(0.0, ge=0, lt=1)
    tau: float = Field(
        1.0, gt=0
    )  # softmax temperature on the per-element mean distance (divided by c, see below)
    # c(k, j) that d_i is divided by before tau: "none" (c = 1, METHOD's plain form), "neighbours" (the
    # mean distance of the other candidates to the anchor at that step: tau relative to the group's own
    # spread), or "batch" (that distance averaged over the update's rows at the same grid index j: a
    # group whose candidates collapsed onto each other keeps a near-uniform pi and a small gradient
    # instead of one that grows like 1/sqrt(c))
    distance_scale: Literal["none", "neighbours", "batch"] = "none"
    # where the LoRA acts when sampling (rollouts and evaluation): "all" grid steps, or only the
    # "trained" ones (train_steps_from's), so no step runs weights its surrogate never saw; plain
    # diffusers then needs the adapters switched on at those steps only (docs/METHOD.md)
    lora_steps: Literal["all", "trained"] = "all"
    # optimiser steps per batch of groups, each on fresh anchors and steps, all against the same pi_old
    # (the rollout's policy): PPO's epochs. With 1 the ratio only leaves 1 through staleness.
    update_epochs: int = Field(1, ge=1)
    clip_eps: float = Field(0.2, gt=0)  # PPO clip epsilon
    log_ratio_clamp: float = Field(10.0, gt=0)
    mask_aware: bool = True  # False: d_i is the plain mean over all tokens
    # beta_bg: weight of the background anchor, mean_{u outside the mask} ||v_theta(u) - v_ref(u)||^2 with
    # v_ref the base editor (LoRA off). RDP and the mask-aware distance give the background no gradient
    # at all, so nothing else stops a shared LoRA update from drifting it. 0 = off (docs/METHOD.md: no KL term).
    background_anchor: float = Field(0.0, ge=0)
    # -- advantages --
    adv_p: float = Field(0.8, gt=0)  # Lp quasi-norm; 2 gives the z-score
    adv_clip: float = Field(5.0, gt=0)
    zero_std_eps: float = Field(1e-6, ge=0)  # groups whose reward std is below this are dropped
    # drop (no gradient) the groups whose instruction reward's within-group std is below the reward's
    # noise floor (the run's reward.noise_floor); they are counted per task kind either way
    drop_noise_groups: bool = False
    # sigma_min: the advantage norm is at least G^(1/p) sigma_min, so a group whose rewards differ by
    # less than sigma_min is not standardised up to the same weight as one with a real outcome spread
    adv_std_floor: float = Field(0.0, ge=0)
    # -- LoRA and optimiser --
    lora_rank: int = Field(8, ge=1)  # paper scale: 32
    lora_alpha: int = Field(16, ge=1)  # paper scale: 64
    lora_targets: list[str] = Field(
        min_length=1,
        default_factory=lambda: [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
        ],
    )
    learning_rate: float = Field(1e-4, gt=0)  # paper at FLUX scale: 1e-5
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _fits_the_grid(self):
        if self.anchors > self.group_size:
            raise ValueError(f"anchors must be in 1..group_size={self.group_size} (got {self.anchors})")
        if self.steps_per_anchor > len(self.trained_steps):
            raise ValueError(
                f"steps_per_anchor must be in 1..{len(self.trained_steps)}, the steps trained "
                f"(num_steps={self.num_steps}, train_steps_from={self.train_steps_from}; "
                f"got {self.steps_per_anchor})"
            )
        return self

    @property
    def trained_steps(self) -> list[int]:
        """Grid indices j whose step j -> j+1 the surrogate trains on (train_steps_from's late part)."""
        return list(range(int(self.train_steps_from * self.num_steps), self.num_steps))

    @property
    def lora_step_indices(self) -> list[int] | None:
        """Grid indices j whose sampling step uses the LoRA; None: every step."""
        return None if self.lora_steps == "all" else self.trained_steps
