"""What the training loop sends besides scores: editing tasks and the rollout states the surrogate
needs (the learner's half of a rollout group). JSON and safetensors only.

A task names a dataset sample and the seed of its group noise, so any worker reproduces it; the
training payload is stored content-addressed in the blob store under a per-group key, so the reward
server only ever sees images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import redis
import torch

from rcgrpo.editor import EditCondition
from rcgrpo.sampler import Rollout
from services.blobstore import BlobRef, BlobStore
from services.codec import decode_tensors, encode_tensors

_COND_TENSORS = (
    "prompt_embeds",
    "pooled_prompt_embeds",
    "text_ids",
    "text_mask",
    "context_latents",
    "image_ids",
)


@dataclass(frozen=True)
class Task:
    task_id: str  # also the rollout group's id
    sample_index: int  # index into the run's training samples
    noise_seed: int  # seeds z* and the d_i of the group

    def to_fields(self) -> dict[str, bytes]:
        return {"task": json.dumps(asdict(self)).encode()}

    @classmethod
    def from_fields(cls, fields) -> Task:
        raw = fields.get(b"task", fields.get("task"))
        if raw is None:
            raise ValueError(f"task entry has no 'task' field (fields: {sorted(fields)})")
        return cls(**json.loads(raw))


def encode_train_payload(
    cond: EditCondition, rollout: Rollout, token_weights: torch.Tensor, background_weights: torch.Tensor
) -> bytes:
    """The condition (batch 1), the sigma grid and the kept states of one group, as safetensors."""
    tensors = {name: getattr(cond, name) for name in _COND_TENSORS}
    if cond.guidance is not None:
        tensors["guidance"] = cond.guidance
    tensors |= {
        "sigmas": rollout.sigmas,
        "state_indices": torch.tensor(rollout.state_indices),
        "states": rollout.states,
        "token_weights": token_weights,
        "background_weights": background_weights,
        "image_size": torch.tensor([cond.height, cond.width]),
    }
    return encode_tensors(tensors)


def decode_train_payload(data: bytes, device: torch.device | str = "cpu") -> dict:
    """Inverse of encode_train_payload: {"cond", "sigmas", "state_indices", "states", "token_weights",
    "background_weights"}."""
    tensors = {k: v.to(device) for k, v in decode_tensors(data).items()}
    height, width = tensors["image_size"].tolist()
    cond = EditCondition(
        **{name: tensors[name] for name in _COND_TENSORS},
        guidance=tensors.get("guidance"),
        height=height,
        width=width,
    )
    return {
        "cond": cond,
        "sigmas": tensors["sigmas"],
        "state_indices": tensors["state_indices"].tolist(),
        "states": tensors["states"],
        "token_weights": tensors["token_weights"],
        "background_weights": tensors["background_weights"],
    }


class TrainPayloads:
    """Training payloads by (group id, policy version): blob in the store, ref under a Redis key."""

    def __init__(self, client: redis.Redis, blobs: BlobStore, namespace: str, ttl_s: int = 24 * 3600):
        self.client = client
        self.blobs = blobs
        self.namespace = namespace
        self.ttl_s = ttl_s

    def _key(self, group_id: str, policy_version: int) -> str:
        return f"{self.namespace}:{group_id}:{policy_version}"

    def put(self, group_id: str, policy_version: int, data: bytes) -> BlobRef:
        ref = self.blobs.put(data)
        self.client.set(self._key(group_id, policy_version), json.dumps(ref.to_dict()), ex=self.ttl_s)
        return ref

    def get(self, group_id: str, policy_version: int) -> bytes:
        raw = self.client.get(self._key(group_id, policy_version))
        if raw is None:
            raise KeyError(f"no training payload for group {group_id!r} at policy version {policy_version}")
        return self.blobs.get(BlobRef.from_dict(json.loads(raw)))

    def delete(self, group_id: str, policy_version: int) -> None:
        raw = self.client.get(self._key(group_id, policy_version))
        if raw is not None:
            self.blobs.delete(BlobRef.from_dict(json.loads(raw)))
            self.client.delete(self._key(group_id, policy_version))
