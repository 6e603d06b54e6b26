"""Wire schemas for scoring edits: the reward server's REST bodies and its Redis stream messages.

REST (`POST /v1/score`): JSON, images as base64 of 8-bit PNG (RGB for source/edit/target, grayscale
for the mask, 255 = inside the edit region). No pickle anywhere.

Streams: a rollout worker publishes one `RolloutGroup` per group to the rollouts stream, encoded with
`services.codec` (JSON meta, PNG image and mask parts, large parts in a blob store):

    meta    {"group_id", "policy_version", "instruction", "caption", "group_size",
             "acd": [float] * G or null, "has_target": bool}
    images  "source", "edit/0" ... "edit/{G-1}", and "target" when has_target
    masks   "mask"

The reward server answers on the scored stream with one `ScoredGroup` per rollout group (meta only).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.blobstore import BlobStore
from services.codec import CodecError, Message, decode_message, encode_image, encode_mask, encode_message

ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"  # group ids end up in Redis key names
MAX_TEXT_CHARS = 4096
MAX_ITEMS_PER_REQUEST = 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------------
# REST


class Intrinsic(_Strict):
    """Scores the rollout computed itself and the server passes through with their weights."""

    acd: float | None = Field(None, ge=0.0, le=1.0, description="attention concentration R_ACD in [0,1]")


class ScoreItem(_Strict):
    group_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    sample_index: int = Field(ge=0, le=1_000_000, description="candidate index i within the group")
    policy_version: int = Field(ge=0, description="version of the policy that produced the edit")
    instruction: str = Field("", max_length=MAX_TEXT_CHARS)
    caption: str = Field("", max_length=MAX_TEXT_CHARS, description="what the edit region should show")
    source: str = Field(min_length=1, description="base64 8-bit RGB PNG of the source image")
    edit: str = Field(min_length=1, description="base64 8-bit RGB PNG of the edited image, same size")
    mask: str = Field(min_length=1, description="base64 8-bit grayscale PNG, same size; 255 = edit region")
    target: str | None = Field(None, description="base64 8-bit RGB PNG of the ground-truth edit")
    intrinsic: Intrinsic | None = None


class ScoreRequest(_Strict):
    items: list[ScoreItem] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)
    rewards: list[str] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="names among the server's rewards; default: all it serves",
    )
    weights: dict[str, float] | None = Field(
        None, description="weight overrides for chosen rewards; default: the server's weights"
    )


class ItemScore(BaseModel):
    group_id: str
    sample_index: int
    policy_version: int
    scores: dict[str, float] = Field(description="every chosen reward's raw sub-score")
    total: float = Field(description="sum over rewards of weight * sub-score")


class ScoreResponse(BaseModel):
    results: list[ItemScore]
    weights: dict[str, float] = Field(description="the weights the totals used")


class RewardInfo(BaseModel):
    name: str
    description: str
    inputs: list[str] = Field(description="item fields the reward reads")
    model_based: bool = Field(description="runs a model, micro-batched across requests")
    weight: float = Field(description="this server's default weight")


class RewardsResponse(BaseModel):
    rewards: list[RewardInfo]


class ErrorResponse(BaseModel):
    detail: str
    kind: str


# ---------------------------------------------------------------------------------------------------
# images on the REST wire: base64 around services.codec's PNG


def image_to_b64(image: torch.Tensor) -> str:
    """Float (3,H,W) in [0,1] -> base64 8-bit RGB PNG."""
    return base64.b64encode(encode_image(image)).decode("ascii")


def mask_to_b64(mask: torch.Tensor) -> str:
    """Float (H,W) in [0,1] -> base64 8-bit grayscale PNG."""
    return base64.b64encode(encode_mask(mask)).decode("ascii")


def make_score_item(
    group_id: str,
    sample_index: int,
    policy_version: int,
    source: torch.Tensor,
    edit: torch.Tensor,
    mask: torch.Tensor,
    instruction: str = "",
    caption: str = "",
    target: torch.Tensor | None = None,
    acd: float | None = None,
) -> ScoreItem:
    """A ScoreItem from tensors: images (3,H,W) and mask (H,W), float in [0,1]."""
    return ScoreItem(
        group_id=group_id,
        sample_index=sample_index,
        policy_version=policy_version,
        instruction=instruction,
        caption=caption,
        source=image_to_b64(source),
        edit=image_to_b64(edit),
        mask=mask_to_b64(mask),
        target=image_to_b64(target) if target is not None else None,
        intrinsic=Intrinsic(acd=float(acd)) if acd is not None else None,
    )


def b64_to_bytes(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise CodecError(f"{what} is not valid base64: {error}") from error


# ---------------------------------------------------------------------------------------------------
# streams


class RolloutGroupMeta(_Strict):
    group_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    policy_version: int = Field(ge=0)
    instruction: str = Field("", max_length=MAX_TEXT_CHARS)
    caption: str = Field("", max_length=MAX_TEXT_CHARS)
    group_size: int = Field(ge=1, le=MAX_ITEMS_PER_REQUEST)
    acd: list[float] | None = None
    has_target: bool = False

    @model_validator(mode="after")
    def _acd_per_candidate(self):
        if self.acd is not None:
            if len(self.acd) != self.group_size:
                raise ValueError(f"acd has {len(self.acd)} values for group_size={self.group_size}")
            if not all(0.0 <= a <= 1.0 for a in self.acd):
                raise ValueError("acd values must be in [0,1]")
        return self


class RolloutGroup:
    """One rollout group as tensors: source (3,H,W), mask (H,W), edits (G,3,H,W), optional target."""

    def __init__(
        self,
        meta: RolloutGroupMeta,
        source: torch.Tensor,
        mask: torch.Tensor,
        edits: torch.Tensor,
        target: torch.Tensor | None = None,
    ):
        if edits.ndim != 4 or edits.shape[0] != meta.group_size:
            raise ValueError(f"edits must be ({meta.group_size},3,H,W), got {tuple(edits.shape)}")
        if (target is not None) != meta.has_target:
            raise ValueError(
                f"has_target={meta.has_target} but target is {'given' if target is not None else 'missing'}"
            )
        self.meta = meta
        self.source = source
        self.mask = mask
        self.edits = edits
        self.target = target


def encode_rollout_group(
    group_id: str,
    policy_version: int,
    instruction: str,
    caption: str,
    source: torch.Tensor,
    mask: torch.Tensor,
    edits: torch.Tensor,
    target: torch.Tensor | None = None,
    acd: list[float] | torch.Tensor | None = None,
    blobs: BlobStore | None = None,
) -> dict[str, bytes]:
    """Stream fields for one rollout group (what the rollout worker publishes)."""
    if isinstance(acd, torch.Tensor):
        acd = [float(a) for a in acd]
    meta = RolloutGroupMeta(
        group_id=group_id,
        policy_version=policy_version,
        instruction=instruction,
        caption=caption,
        group_size=int(edits.shape[0]),
        acd=acd,
        has_target=target is not None,
    )
    images = {"source": source, **{f"edit/{i}": edit for i, edit in enumerate(edits)}}
    if target is not None:
        images["target"] = target
    message = Message(meta=meta.model_dump(), images=images, masks={"mask": mask})
    return encode_message(message, blobs=blobs)


def decode_rollout_group(fields: Mapping, blobs: BlobStore | None = None) -> RolloutGroup:
    """Inverse of encode_rollout_group; raises ValueError (CodecError or pydantic's) naming the problem."""
    message = decode_message(fields, blobs=blobs)
    try:
        meta = RolloutGroupMeta.model_validate(message.meta)
    except ValidationError as error:
        raise CodecError(f"rollout group meta is invalid: {error}") from error
    names = [f"edit/{i}" for i in range(meta.group_size)]
    required = ["source", *names] + (["target"] if meta.has_target else [])
    missing = [n for n in required if n not in message.images] + [
        n for n in ["mask"] if n not in message.masks
    ]
    if missing:
        raise CodecError(f"rollout group {meta.group_id!r} lacks parts {missing}")
    edits = [message.images[n] for n in names]
    if any(e.shape != edits[0].shape for e in edits):
        raise CodecError(f"rollout group {meta.group_id!r} has edits of different sizes")
    return RolloutGroup(
        meta,
        source=message.images["source"],
        mask=message.masks["mask"],
        edits=torch.stack(edits),
        target=message.images.get("target"),
    )


class ScoredGroup(_Strict):
    """The reward server's answer to one rollout group (meta of a codec message on the scored stream)."""

    group_id: str
    policy_version: int
    scores: list[dict[str, float]] = Field(description="per candidate, every reward's sub-score")
    totals: list[float] = Field(description="per candidate, the weighted total r_i")
    weights: dict[str, float]


def encode_scored_group(scored: ScoredGroup) -> dict[str, bytes]:
    return encode_message(Message(meta=scored.model_dump()))


def decode_scored_group(fields: Mapping) -> ScoredGroup:
    return ScoredGroup.model_validate(decode_message(fields).meta)
