"""Wire schemas of the reward server's REST API (`POST /v1/score`, `GET /v1/rewards`).

JSON, images as base64 of 8-bit PNG (RGB for source/edit/target, grayscale for the mask, 255 = inside
the edit region). No pickle anywhere. The stream messages are in `services.record`.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from services.codec import CodecError, encode_image, encode_mask

ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"  # group ids end up in Redis key names
MAX_TEXT_CHARS = 4096
MAX_ITEMS_PER_REQUEST = 1024
MAX_POLICY_VERSION = 2**53 - 1  # the largest integer every JSON reader keeps exactly
MAX_WEIGHT = 1e6  # |w_j| bound: with scores bounded too, every total stays finite
REWARD_NAME_PATTERN = r"^[a-z][a-z0-9_]*$"  # names in reward_server.registry
RewardName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=REWARD_NAME_PATTERN)]
Weight = Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]


class StrictModel(BaseModel):
    """The base of every wire schema: unknown fields and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------------
# REST


class Intrinsic(StrictModel):
    """Scores the rollout computed itself and the server passes through with their weights."""

    acd: float | None = Field(None, ge=0.0, le=1.0, description="attention concentration R_ACD in [0,1]")


class ScoreItem(StrictModel):
    group_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    candidate_index: int = Field(ge=0, le=1_000_000, description="candidate index i within the group")
    policy_version: int = Field(
        ge=0, le=MAX_POLICY_VERSION, description="version of the policy that produced the edit"
    )
    instruction: str = Field("", max_length=MAX_TEXT_CHARS)
    caption: str = Field("", max_length=MAX_TEXT_CHARS, description="what the edit region should show")
    source: str = Field(min_length=1, description="base64 8-bit RGB PNG of the source image")
    edit: str = Field(min_length=1, description="base64 8-bit RGB PNG of the edited image, same size")
    mask: str = Field(min_length=1, description="base64 8-bit grayscale PNG, same size; 255 = edit region")
    target: str | None = Field(None, description="base64 8-bit RGB PNG of the ground-truth edit")
    intrinsic: Intrinsic | None = None


class Composition(StrictModel):
    """How the sub-scores r_j become one total r_i.

    weighted_sum: r_i = sum_j w_j r_j.
    gated (a guard against reward hacking): r_i = E (a + b C) + U, with E the weighted mean of the
    instruction terms and C that of the preservation terms (every term neither instruction nor
    ungated), each score mapped onto [0, 1] by its reward's range, and U = sum_j w_j r_j over the ungated
    terms (intrinsic ones such as ACD). Preservation counts only in proportion to instruction
    following, so an unedited copy of the source cannot win on background metrics.
    """

    kind: Literal["weighted_sum", "gated"] = "weighted_sum"
    instruction_terms: list[RewardName] = Field(
        default_factory=lambda: ["region_adherence"], min_length=1, max_length=64
    )
    ungated_terms: list[RewardName] = Field(default_factory=lambda: ["acd"], max_length=64)
    floor: float = Field(0.1, ge=0, le=MAX_WEIGHT, description="a: the gate's weight without preservation")
    slope: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="b: the weight of preservation P")

    @model_validator(mode="after")
    def _disjoint(self):
        both = sorted(set(self.instruction_terms) & set(self.ungated_terms))
        if both:
            raise ValueError(f"terms {both} are both instruction and ungated terms")
        return self


class ScoreRequest(StrictModel):
    items: list[ScoreItem] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)
    rewards: list[RewardName] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="distinct names among the server's rewards; default: all it serves",
    )
    weights: dict[RewardName, Weight] | None = Field(
        None, description="weight overrides for chosen rewards; default: the server's weights"
    )
    composition: Composition | None = Field(
        None, description="how sub-scores make the total; default: the server's composition"
    )

    @field_validator("rewards")
    @classmethod
    def _distinct(cls, rewards: list[str] | None) -> list[str] | None:
        if rewards is not None and len(set(rewards)) != len(rewards):
            repeated = sorted({name for name in rewards if rewards.count(name) > 1})
            raise ValueError(f"rewards must be distinct; {repeated} repeated")
        return rewards


class ItemScore(BaseModel):
    group_id: str
    candidate_index: int
    policy_version: int
    scores: dict[str, float] = Field(description="every chosen reward's raw sub-score")
    total: float = Field(description="the composed total: sum over rewards of weight * sub-score, or gated")


class ScoreResponse(BaseModel):
    results: list[ItemScore]
    weights: dict[str, float] = Field(description="the weights the totals used")
    composition: Composition = Field(default_factory=Composition, description="how the totals were composed")


class RewardInfo(BaseModel):
    name: str
    description: str
    inputs: list[str] = Field(description="item fields the reward reads")
    model_based: bool = Field(description="runs a model, micro-batched across requests")
    weight: float = Field(description="this server's default weight")


class RewardsResponse(BaseModel):
    rewards: list[RewardInfo]


class ErrorResponse(BaseModel):
    """Every error answer of the reward server has this shape."""

    detail: str
    kind: str
    reward: str | None = Field(None, description="the reward that failed, for kind reward_failed")


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
    candidate_index: int,
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
        candidate_index=candidate_index,
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
