"""The LoRA store: the learner publishes each policy version's LoRA, rollout workers load the latest.

Each version is a safetensors blob `v{policy_version}` in a blob store that never expires (Redis keys
`{namespace}:blob:v...`, or files in a directory every worker mounts: `services.blobstore.DirectoryBlobStore`), plus a Redis hash `{namespace}:version:{policy_version}` = {policy_version, created_at} and the
blob's ref (key, sha256, size); `{namespace}:latest` holds the newest policy version. The last
`keep_last` versions are kept; older records and their blobs are deleted on publish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
import torch

from services.blobstore import BlobRef, BlobStore, DirectoryBlobStore
from services.codec import decode_tensors, encode_tensors

DEFAULT_KEEP_LAST = 4


@dataclass(frozen=True)
class LoraVersion:
    policy_version: int
    blob: BlobRef
    created_at: float

    def to_hash(self) -> dict[str, str]:
        return {
            "policy_version": str(self.policy_version),
            "created_at": repr(self.created_at),
            **{k: str(v) for k, v in self.blob.to_dict().items()},
        }

    @classmethod
    def from_hash(cls, data: dict[bytes, bytes]) -> LoraVersion:
        fields = {k.decode(): v.decode() for k, v in data.items()}
        return cls(
            policy_version=int(fields["policy_version"]),
            blob=BlobRef.from_dict(fields),
            created_at=float(fields["created_at"]),
        )


class LoraPublishError(OSError):
    """A policy version whose LoRA could not be written (a full volume): nothing points at it, and the
    latest version is still the one before."""


def _blob_name(policy_version: int) -> str:
    return f"v{policy_version}"


class LoraStore:
    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "rcgrpo:lora",
        keep_last: int = DEFAULT_KEEP_LAST,
        blobs: BlobStore | DirectoryBlobStore | None = None,
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (got {keep_last})")
        self.client = client
        # where the versions' bytes live (None: Redis); the records are in Redis either way
        self.blobs = blobs or BlobStore(client, prefix=f"{namespace}:blob:", ttl_s=None)  # kept until pruned
        self.namespace = namespace
        self.keep_last = keep_last
        self.latest_key = f"{namespace}:latest"
        self._versions_key = f"{namespace}:versions"  # sorted set: member = score = policy version

    def _record_key(self, policy_version: int) -> str:
        return f"{self.namespace}:version:{policy_version}"

    def publish(self, tensors: dict[str, torch.Tensor], policy_version: int | None = None) -> LoraVersion:
        """Store `tensors` as `policy_version` (default: latest + 1). Versions must increase. Two round
        trips: the newest and the kept versions, then the blob (in Redis), the record and the pruning of
        versions beyond keep_last in one transaction."""
        if not tensors:
            raise ValueError("refusing to publish an empty LoRA")
        with self.client.pipeline(transaction=False) as pipe:
            latest, kept = pipe.get(self.latest_key).zrange(self._versions_key, 0, -1).execute()
        latest = None if latest is None else int(latest)
        if policy_version is None:
            policy_version = 0 if latest is None else latest + 1
        if latest is not None and policy_version <= latest:
            raise ValueError(f"policy version {policy_version} is not newer than the latest, {latest}")
        pruned = ([int(v) for v in kept] + [policy_version])[: -self.keep_last]
        data = encode_tensors(tensors, metadata={"policy_version": str(policy_version)})
        in_redis = isinstance(self.blobs, BlobStore)
        with self.client.pipeline(transaction=True) as pipe:
            # the blob is durable before any record points at it: in the same transaction, or (a file)
            # written before the transaction
            blobs = self.blobs.queued(pipe) if in_redis else self.blobs
            try:
                ref = blobs.put(data, name=_blob_name(policy_version))
            except OSError as error:  # the transaction is not executed: the previous latest stands
                raise LoraPublishError(
                    f"policy version v{policy_version} not published: {error}; the latest is still v{latest}"
                ) from None
            record = LoraVersion(policy_version, ref, time.time())
            pipe.hset(self._record_key(policy_version), mapping=record.to_hash())
            pipe.zadd(self._versions_key, {str(policy_version): policy_version})
            pipe.set(self.latest_key, policy_version)
            for old in pruned:
                pipe.delete(self._record_key(old))
                pipe.zrem(self._versions_key, str(old))
            if in_redis and pruned:
                pipe.delete(*(self.blobs.key_for(_blob_name(old)) for old in pruned))
            pipe.execute()
        if not in_redis:  # files no record points at any more
            self.blobs.delete_keys(*(self.blobs.key_for(_blob_name(old)) for old in pruned))
        return record

    def versions(self) -> list[int]:
        """The kept policy versions, oldest first."""
        return [int(v) for v in self.client.zrange(self._versions_key, 0, -1)]

    def get(self, policy_version: int) -> LoraVersion | None:
        data = self.client.hgetall(self._record_key(policy_version))
        return LoraVersion.from_hash(data) if data else None

    def latest_version(self) -> int | None:
        """The newest policy version's number (one GET): what a worker polls before every group."""
        policy_version = self.client.get(self.latest_key)
        return None if policy_version is None else int(policy_version)

    def latest(self) -> LoraVersion | None:
        policy_version = self.latest_version()
        return None if policy_version is None else self.get(policy_version)

    def load(self, version: int | LoraVersion) -> dict[str, torch.Tensor]:
        """The LoRA of a policy version; raises BlobIntegrityError if the blob's sha256 does not match."""
        record = version if isinstance(version, LoraVersion) else self.get(version)
        if record is None:
            raise KeyError(f"policy version {version} is not stored (kept versions: {self.versions()})")
        return decode_tensors(self.blobs.get(record.blob))
