"""The rewards a reward server can serve. Each reward is one registered function.

How to add a reward
-------------------
Write a function from a `RewardBatch` (B items of one image size, stacked) and the loaded models to
one score per item, and register it:

    @register_reward(
        "my_score",
        inputs=("edit", "source", "mask"),  # the item fields it reads; see INPUTS
        model=None,                        # or the name of a model in MODEL_LOADERS, e.g. "clip"
        description="what it measures, its range",
    )
    def my_score(batch: RewardBatch, models: dict) -> torch.Tensor:  # Tensor[B]
        return ...

Raise ValueError for an input the reward cannot score: its caller gets a 422 with the message (in a
batch shared by several callers, only the offending item's caller). Any other exception means the
reward could not be computed (a judge that timed out, a model that failed): the request fails with a
503 naming the reward and the cause, and a stream group stays pending for a retry; a failed reward
is never a number. Then serve the reward by naming
it with its weight under `rewards:` in the server's YAML config (a reward has no weight of its own: the
default rewards' weights are rcgrpo.rewards.DEFAULT_WEIGHTS, every other weight is a config's). A reward with a `model` is
model-based: the server loads the model once at start-up from the directory given
under `models:` and runs the reward in micro-batches across concurrent requests, off the event loop;
other rewards run per request in a worker thread. A request can only choose among served rewards and
override their weights; it can never load code.

A new kind of model needs one loader, `register_model("name", loader)`: a function from a local
directory to the loaded model (nothing is downloaded). A model configured by its own settings section
instead (the judge endpoint, the local reward model) registers with `settings_section="judge"`; its
loader gets that section's settings and the server's metrics.

A model-based reward runs micro-batched in the server's one model thread; `batched=False` runs it per
request in a worker thread instead (a remote judge: waiting on the network must not hold the model
thread).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rcgrpo import rewards
from reward_server.reward_batch import RewardBatch

# Item fields a reward may read. edit, source, mask, instruction and caption are always present (the
# texts may be empty); target and acd are optional and a reward that needs them rejects items without.
INPUTS = ("edit", "source", "mask", "instruction", "caption", "target", "acd")
OPTIONAL_INPUTS = ("target", "acd")


RewardFn = Callable[[RewardBatch, dict], torch.Tensor]


@dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    inputs: tuple[str, ...]
    model: str | None
    description: str
    batched: bool = True  # model-based rewards only: through the micro-batcher, else per request
    # (low, high): the scores that map to 0 and 1 in the gated composition (clamped); None: unbounded,
    # so the reward can only be an ungated term there
    unit_range: tuple[float, float] | None = None

    @property
    def model_based(self) -> bool:
        return self.model is not None


REWARDS: dict[str, Reward] = {}
MODEL_LOADERS: dict[str, Callable] = {}
# model name -> the settings section that configures it (its loader gets (section, metrics)); models not
# here are directories under `models:` (their loader gets the directory)
MODEL_SECTIONS: dict[str, str] = {}


def register_reward(
    name: str,
    inputs: tuple[str, ...],
    model: str | None,
    description: str,
    batched: bool = True,
    unit_range: tuple[float, float] | None = None,
):
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise ValueError(f"reward {name!r} reads unknown inputs {unknown}; known: {list(INPUTS)}")
    if name in REWARDS:
        raise ValueError(f"reward {name!r} is already registered")

    def decorator(fn: RewardFn) -> RewardFn:
        REWARDS[name] = Reward(name, fn, tuple(inputs), model, description, batched, unit_range)
        return fn

    return decorator


def register_model(name: str, loader: Callable, settings_section: str | None = None) -> None:
    if name in MODEL_LOADERS:
        raise ValueError(f"model {name!r} is already registered")
    MODEL_LOADERS[name] = loader
    if settings_section is not None:
        MODEL_SECTIONS[name] = settings_section


# ---------------------------------------------------------------------------------------------------
# built-in rewards


def _load_clip(directory: str):
    from rcgrpo.clip_scores import load_clip  # transformers is heavy: import only when a CLIP is served

    return load_clip(directory)


register_model("clip", _load_clip)


def _load_judge(settings, metrics):
    from reward_server.judge import Judge  # httpx client and threads: only when a judge is served

    return Judge(settings, metrics)


register_model("judge", _load_judge, settings_section="judge")


def _load_reward_model(settings, metrics):
    from rcgrpo.image_reward_model import load_reward_model

    return load_reward_model(settings.path, dtype=settings.dtype, label_index=settings.label_index)


register_model("reward_model", _load_reward_model, settings_section="reward_model")


@register_reward(
    "region_adherence",
    inputs=("edit", "target", "mask"),
    model=None,
    description="ShapesEdit verifiable score: agreement of the edit with the ground truth inside the mask, in [0,1]",
    unit_range=(0.0, 1.0),
)
def region_adherence(batch: RewardBatch, models: dict) -> torch.Tensor:
    return rewards.region_adherence(batch.edits, batch.targets, batch.masks)


@register_reward(
    "background_psnr",
    inputs=("edit", "source", "mask"),
    model=None,
    description="PSNR (dB, data range 1) between edit and source outside the mask",
    unit_range=(10.0, 40.0),  # 10 dB: unrelated images; 40 dB: no visible difference
)
def background_psnr(batch: RewardBatch, models: dict) -> torch.Tensor:
    return rewards.background_psnr(batch.edits, batch.sources, batch.masks)


@register_reward(
    "background_ssim",
    inputs=("edit", "source", "mask"),
    model=None,
    description="SSIM between edit and source outside the mask, in [-1,1]",
    unit_range=(0.0, 1.0),
)
def background_ssim(batch: RewardBatch, models: dict) -> torch.Tensor:
    return rewards.background_ssim(batch.edits, batch.sources, batch.masks)


@register_reward(
    "lc_t",
    inputs=("edit", "mask", "caption"),
    model="clip",
    description="local CLIP text score (LC-T): 100 * max(cos, 0) of the mask's box in the edit vs the caption",
    unit_range=(0.0, 100.0),
)
def lc_t(batch: RewardBatch, models: dict) -> torch.Tensor:
    return models["clip"].lc_t(batch.edits, batch.masks, batch.captions)


@register_reward(
    "lc_i",
    inputs=("edit", "target", "mask"),
    model="clip",
    description="local CLIP image score (LC-I): cosine of CLIP embeddings of the mask's box in edit and ground truth",
    unit_range=(0.0, 1.0),
)
def lc_i(batch: RewardBatch, models: dict) -> torch.Tensor:
    return models["clip"].lc_i(batch.edits, batch.targets, batch.masks)


@register_reward(
    "acd",
    inputs=("acd",),
    model=None,
    description="attention concentration R_ACD in [0,1], computed by the rollout and passed through (lambda_ACD)",
    unit_range=(0.0, 1.0),
)
def acd(batch: RewardBatch, models: dict) -> torch.Tensor:
    return batch.acd


@register_reward(
    "vlm_judge",
    inputs=("edit", "source", "mask", "instruction", "caption"),
    model="judge",
    description="a vision-language judge over an OpenAI-compatible /v1/chat/completions endpoint (settings "
    "`judge:`): its parsed score mapped onto [0,1]",
    batched=False,
    unit_range=(0.0, 1.0),
)
def vlm_judge(batch: RewardBatch, models: dict) -> torch.Tensor:
    return models["judge"].score(batch)


@register_reward(
    "reward_model",
    inputs=("edit",),
    model="reward_model",
    description="a local transformers image reward model (settings `reward_model:`): its logit for the edit",
)
def reward_model(batch: RewardBatch, models: dict) -> torch.Tensor:
    return models["reward_model"].score(batch.edits)


@register_reward(
    "no_edit",
    inputs=("edit", "source", "mask"),
    model=None,
    description="hacking detector: 1 if the edit region is unchanged from the source (in-mask RMS change "
    f"< {rewards.NO_EDIT_TOLERANCE}), else 0",
    unit_range=(0.0, 1.0),
)
def no_edit(batch: RewardBatch, models: dict) -> torch.Tensor:
    return rewards.unedited(batch.edits, batch.sources, batch.masks)


@register_reward(
    "repainted",
    inputs=("edit", "source", "mask"),
    model=None,
    description="hacking detector: 1 if the background changed (RMS change outside the mask "
    f"> {rewards.REPAINT_TOLERANCE}), else 0",
    unit_range=(0.0, 1.0),
)
def repainted(batch: RewardBatch, models: dict) -> torch.Tensor:
    return rewards.repainted(batch.edits, batch.sources, batch.masks)
