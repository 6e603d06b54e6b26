"""The rewards a reward server can serve. Each reward is one registered function.

How to add a reward
-------------------
Write a function from a `RewardBatch` (B items of one image size, stacked) and the loaded models to
one score per item, and register it:

    @register_reward(
        "my_score",
        inputs=("edit", "source", "mask"),  # the item fields it reads; see INPUTS
        model=None,                        # or the name of a model in MODEL_LOADERS, e.g. "clip"
        weight=1.0,                        # default weight in the weighted total
        description="what it measures, its range",
    )
    def my_score(batch: RewardBatch, models: dict) -> torch.Tensor:  # Tensor[B]
        return ...

Raise ValueError for an input the reward cannot score: its caller gets a 422 with the message (in a
batch shared by several callers, only the offending item's caller). Then serve the reward by naming
it (with its weight) under `rewards:` in the server's YAML config. A reward with a `model` is
model-based: the server loads the model once at start-up from the directory given
under `models:` and runs the reward in micro-batches across concurrent requests, off the event loop;
other rewards run per request in a worker thread. A request can only choose among served rewards and
override their weights; it can never load code.

A new kind of model needs one loader, `register_model("name", loader)`: a function from a local
directory to the loaded model (nothing is downloaded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rcgrpo import rewards

# Item fields a reward may read. edit, source, mask, instruction and caption are always present (the
# texts may be empty); target and acd are optional and a reward that needs them rejects items without.
INPUTS = ("edit", "source", "mask", "instruction", "caption", "target", "acd")
OPTIONAL_INPUTS = ("target", "acd")


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


RewardFn = Callable[[RewardBatch, dict], torch.Tensor]


@dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    inputs: tuple[str, ...]
    model: str | None
    weight: float
    description: str

    @property
    def model_based(self) -> bool:
        return self.model is not None


REWARDS: dict[str, Reward] = {}
MODEL_LOADERS: dict[str, Callable[[str], object]] = {}


def register_reward(name: str, inputs: tuple[str, ...], model: str | None, weight: float, description: str):
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise ValueError(f"reward {name!r} reads unknown inputs {unknown}; known: {list(INPUTS)}")
    if name in REWARDS:
        raise ValueError(f"reward {name!r} is already registered")

    def decorator(fn: RewardFn) -> RewardFn:
        REWARDS[name] = Reward(name, fn, tuple(inputs), model, float(weight), description)
        return fn

    return decorator


def register_model(name: str, loader: Callable[[str], object]) -> None:
    if name in MODEL_LOADERS:
        raise ValueError(f"model {name!r} is already registered")
    MODEL_LOADERS[name] = loader


# ---------------------------------------------------------------------------------------------------
# built-in rewards


def _load_clip(directory: str):
    from rcgrpo.clip_scores import load_clip  # transformers is heavy: import only when a CLIP is served

    return load_clip(directory)


register_model("clip", _load_clip)


@register_reward(
    "region_adherence",
    inputs=("edit", "target", "mask"),
    model=None,
    weight=1.0,
    description="ShapesEdit verifiable score: agreement of the edit with the ground truth inside the mask, in [0,1]",
)
def region_adherence(batch: RewardBatch, models: dict) -> torch.Tensor:
    return rewards.region_adherence(batch.edits, batch.targets, batch.masks)


@register_reward(
    "background_psnr",
    inputs=("edit", "source", "mask"),
    model=None,
    weight=0.02,
    description="PSNR (dB, data range 1) between edit and source outside the mask",
)
def background_psnr(batch: RewardBatch, models: dict) -> torch.Tensor:
    return rewards.background_psnr(batch.edits, batch.sources, batch.masks)


@register_reward(
    "background_ssim",
    inputs=("edit", "source", "mask"),
    model=None,
    weight=1.0,
    description="SSIM between edit and source outside the mask, in [-1,1]",
)
def background_ssim(batch: RewardBatch, models: dict) -> torch.Tensor:
    return rewards.background_ssim(batch.edits, batch.sources, batch.masks)


@register_reward(
    "lc_t",
    inputs=("edit", "mask", "caption"),
    model="clip",
    weight=0.01,
    description="local CLIP text score (LC-T): 100 * max(cos, 0) of the mask's box in the edit vs the caption",
)
def lc_t(batch: RewardBatch, models: dict) -> torch.Tensor:
    return models["clip"].lc_t(batch.edits, batch.masks, batch.captions)


@register_reward(
    "lc_i",
    inputs=("edit", "target", "mask"),
    model="clip",
    weight=1.0,
    description="local CLIP image score (LC-I): cosine of CLIP embeddings of the mask's box in edit and ground truth",
)
def lc_i(batch: RewardBatch, models: dict) -> torch.Tensor:
    return models["clip"].lc_i(batch.edits, batch.targets, batch.masks)


@register_reward(
    "acd",
    inputs=("acd",),
    model=None,
    weight=0.5,
    description="attention concentration R_ACD in [0,1], computed by the rollout and passed through (lambda_ACD)",
)
def acd(batch: RewardBatch, models: dict) -> torch.Tensor:
    return batch.acd
