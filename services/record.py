"""The rollout-group record, from the rollout worker to the learner, and the task that asks for it.

A `Task` names a dataset sample and the seed of its group noise, so any worker reproduces the group.
The worker answers it with one `RolloutGroup` record, carried as one `services.codec` message:

    meta    GroupMeta (JSON): the group key, texts, group size, image size, the kept grid indices,
            R_ACD per candidate, the run's rewards and weights, and, once scored, the scores
    images  "source", "edit/0" ... "edit/{G-1}", "target" when has_target   (PNG, for the scorer)
    masks   "mask"
    refs    "train": the learner's tensors (condition, sigma grid, kept states, token weights) as one
            safetensors blob, stored under the group key

On the rollouts stream the record has its images; the reward server scores it with the rewards it
carries and publishes the same record, scores added and images dropped, to the scored stream, from
which the learner builds its `TrainGroup`. The group key (run, group id, policy version) is the one
identity of a group everywhere: the reward server's done key, the name of the training tensors' blob
and the learner's record of what it has trained on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch
from pydantic import ConfigDict, Field, ValidationError, model_validator

from rcgrpo.data.sample import EditSample
from rcgrpo.editor import EditCondition
from rcgrpo.train_step import TrainGroup
from services.blobstore import BlobRef, BlobStore
from services.codec import (
    CodecError,
    Message,
    decode_json,
    decode_message,
    decode_tensors,
    encode_message,
    encode_tensors,
)
from services.schemas import ID_PATTERN, MAX_ITEMS_PER_REQUEST, MAX_TEXT_CHARS, Composition, StrictModel

if TYPE_CHECKING:
    from rcgrpo.group import SampledGroup


@dataclass(frozen=True)
class Task:
    group_id: str  # the id of the rollout group this task asks for
    dataset_index: int  # index into the run's training samples
    noise_seed: int  # seeds z* and the d_i of the group

    def to_fields(self) -> dict[str, bytes]:
        return {"task": json.dumps(asdict(self)).encode()}

    @classmethod
    def from_fields(cls, fields) -> Task:
        raw = fields.get(b"task", fields.get("task"))
        if raw is None:
            raise ValueError(f"task entry has no 'task' field (fields: {sorted(fields)})")
        return cls(**json.loads(raw))


class GroupKey(StrictModel):
    """The identity of one rollout group: the run, the group (its task) and the policy version that
    sampled it. A task re-sampled by another policy version is another group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    group_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    policy_version: int = Field(ge=0)

    @property
    def id(self) -> str:
        """The key as one string, fit for Redis key names."""
        return f"{self.run}:{self.group_id}:v{self.policy_version}"


class GroupScores(StrictModel):
    """What the scorer adds to a record."""

    scores: list[dict[str, float]] = Field(description="per candidate, every reward's sub-score")
    totals: list[float] = Field(description="per candidate, r_i composed from the group's rewards")


class GroupMeta(StrictModel):
    key: GroupKey
    # the sample's task (ShapesEdit edit kind or CompBench task): diagnostics are reported per task
    task: str = Field("", max_length=128)
    instruction: str = Field("", max_length=MAX_TEXT_CHARS)
    caption: str = Field("", max_length=MAX_TEXT_CHARS)
    group_size: int = Field(ge=1, le=MAX_ITEMS_PER_REQUEST)
    height: int = Field(ge=1)  # of every image part, and of the condition
    width: int = Field(ge=1)
    kept_states: list[int] = Field(min_length=1)  # grid indices j of the kept states
    acd: list[float]  # R_ACD per candidate, in [0, 1]
    # the run's rewards and their weights w_j (lambda_ACD for "acd"): every scorer applies these
    rewards: dict[str, float] = Field(min_length=1)
    composition: Composition | None = None  # how the run composes r_i; None: the weighted sum
    has_target: bool = False
    scores: GroupScores | None = None  # set by the scorer

    @model_validator(mode="after")
    def _per_candidate(self):
        if len(self.acd) != self.group_size:
            raise ValueError(f"acd has {len(self.acd)} values for group_size={self.group_size}")
        if not all(0.0 <= a <= 1.0 for a in self.acd):
            raise ValueError("acd values must be in [0,1]")
        if self.scores is not None and not (
            len(self.scores.scores) == len(self.scores.totals) == self.group_size
        ):
            raise ValueError(
                f"scores has {len(self.scores.scores)} candidates and {len(self.scores.totals)} totals "
                f"for group_size={self.group_size}"
            )
        return self


@dataclass
class GroupImages:
    """What the scorer reads: source (3,H,W), mask (H,W), the G edits (3,H,W), the target or None."""

    source: torch.Tensor
    mask: torch.Tensor
    edits: list[torch.Tensor]
    target: torch.Tensor | None = None


@dataclass
class RolloutGroup:
    """One rollout group: images on the rollouts stream, scores (in meta) on the scored stream."""

    meta: GroupMeta
    train: BlobRef  # the learner's tensors in the blob store (`encode_train_tensors`)
    images: GroupImages | None = None


def group_meta(
    key: GroupKey,
    group: SampledGroup,
    sample: EditSample,
    rewards: Mapping[str, float],
    composition: Composition | None = None,
) -> GroupMeta:
    """The meta of a freshly sampled group of `sample` (no scores yet)."""
    return GroupMeta(
        key=key,
        task=sample.task,
        instruction=sample.instruction,
        caption=sample.caption,
        group_size=len(group.acd),
        height=group.cond.height,
        width=group.cond.width,
        kept_states=group.rollout.kept_states,
        acd=group.acd.tolist(),
        rewards=dict(rewards),
        composition=composition,
        has_target=sample.target is not None,
    )


def encode_rollout_group(group: RolloutGroup, blobs: BlobStore | None = None) -> dict[str, bytes]:
    """Stream fields for one record; image parts too large to inline go to `blobs`."""
    images, masks = {}, {}
    if group.images is not None:
        if len(group.images.edits) != group.meta.group_size:
            raise ValueError(f"{len(group.images.edits)} edits for group_size={group.meta.group_size}")
        if (group.images.target is not None) != group.meta.has_target:
            given = "given" if group.images.target is not None else "missing"
            raise ValueError(f"has_target={group.meta.has_target} but the target is {given}")
        images = {"source": group.images.source, **{f"edit/{i}": e for i, e in enumerate(group.images.edits)}}
        if group.images.target is not None:
            images["target"] = group.images.target
        masks = {"mask": group.images.mask}
    message = Message(meta=group.meta.model_dump(), images=images, masks=masks, refs={"train": group.train})
    return encode_message(message, blobs=blobs)


def group_key(fields: Mapping) -> GroupKey:
    """The group key of a record's stream fields, read from its meta alone (no parts decoded or fetched)."""
    raw = fields.get(b"meta", fields.get("meta"))
    if raw is None:
        raise CodecError(f"rollout group entry has no 'meta' field (fields: {sorted(fields)})")
    try:
        return GroupKey.model_validate(decode_json(raw)["key"])
    except (ValidationError, KeyError, TypeError) as error:
        raise CodecError(f"rollout group meta has no valid key: {error}") from None


def decode_rollout_group(fields: Mapping, blobs: BlobStore | None = None) -> RolloutGroup:
    """Inverse of encode_rollout_group; raises CodecError (a ValueError) naming the problem."""
    message = decode_message(fields, blobs=blobs)
    try:
        meta = GroupMeta.model_validate(message.meta)
    except ValidationError as error:
        raise CodecError(f"rollout group meta is invalid: {error}") from error
    where = f"rollout group {meta.key.id!r}"
    if "train" not in message.refs:
        raise CodecError(f"{where} has no 'train' ref")
    if not message.images and not message.masks:
        return RolloutGroup(meta, message.refs["train"])
    edits = [f"edit/{i}" for i in range(meta.group_size)]
    required = ["source", *edits] + (["target"] if meta.has_target else [])
    missing = [n for n in required if n not in message.images] + [
        n for n in ["mask"] if n not in message.masks
    ]
    if missing:
        raise CodecError(f"{where} lacks parts {missing}")
    for name, image in [*message.images.items(), *message.masks.items()]:
        if tuple(image.shape[-2:]) != (meta.height, meta.width):
            raise CodecError(
                f"{where}: {name} is {image.shape[-1]}x{image.shape[-2]} (WxH), the group is {meta.width}x{meta.height}"
            )
    images = GroupImages(
        source=message.images["source"],
        mask=message.masks["mask"],
        edits=[message.images[n] for n in edits],
        target=message.images.get("target"),
    )
    return RolloutGroup(meta, message.refs["train"], images)


# ---------------------------------------------------------------------------------------------------
# the learner's part of a record: one safetensors blob

_COND_TENSORS = [f.name for f in fields(EditCondition) if f.name not in ("height", "width")]


def encode_train_tensors(group: SampledGroup) -> bytes:
    """The condition (batch 1), the sigma grid, the kept states and the token weights of one group.

    Height, width and the kept grid indices travel in the record's meta."""
    cond = {f"cond.{name}": getattr(group.cond, name) for name in _COND_TENSORS}
    return encode_tensors(
        {name: tensor for name, tensor in cond.items() if tensor is not None}
        | {
            "sigmas": group.rollout.sigmas,
            "states": group.rollout.states,
            "token_weights": group.token_weights,
            "background_weights": group.background_weights,
        }
    )


def load_train_group(
    group: RolloutGroup, advantages: torch.Tensor, device: torch.device | str, data: bytes
) -> TrainGroup:
    """The record's TrainGroup with advantages A_i, from its training blob `data` (fetched and verified
    with BlobStore.get / get_many), on `device`."""
    tensors = {name: t.to(device) for name, t in decode_tensors(data).items()}
    cond = EditCondition(
        **{name: tensors.get(f"cond.{name}") for name in _COND_TENSORS},
        height=group.meta.height,
        width=group.meta.width,
    )
    return TrainGroup(
        cond=cond,
        sigmas=tensors["sigmas"],
        kept_states=group.meta.kept_states,
        states=tensors["states"],
        token_weights=tensors["token_weights"],
        advantages=advantages.to(device),
        background_weights=tensors["background_weights"],
    )
