"""Versioned LoRA weights: the learner publishes, rollout workers load the latest.

Each version is a safetensors blob in a persistent blob store plus a Redis hash
`{namespace}:version:{v}` = {version, sha256, size, blob_key, created_at}; `{namespace}:latest` points
at the newest. The last `keep_last` versions are kept; older records and blobs are deleted on publish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
import torch

from services.blobstore import BlobRef, BlobStore
from services.codec import decode_tensors, encode_tensors

DEFAULT_KEEP_LAST = 4


@dataclass(frozen=True)
class WeightVersion:
    version: int
    sha256: str
    size: int
    blob_key: str
    created_at: float

    @property
    def blob_ref(self) -> BlobRef:
        return BlobRef(key=self.blob_key, sha256=self.sha256, size=self.size)

    @classmethod
    def from_hash(cls, data: dict[bytes, bytes]) -> WeightVersion:
        fields = {k.decode(): v.decode() for k, v in data.items()}
        return cls(
            version=int(fields["version"]),
            sha256=fields["sha256"],
            size=int(fields["size"]),
            blob_key=fields["blob_key"],
            created_at=float(fields["created_at"]),
        )


class WeightStore:
    def __init__(
        self,
        client: redis.Redis,
        blobs: BlobStore,
        namespace: str = "rcgrpo:weights",
        keep_last: int = DEFAULT_KEEP_LAST,
    ):
        if blobs.ttl_s is not None:
            raise ValueError(
                f"weights need a blob store without expiry (got ttl_s={blobs.ttl_s}); "
                "e.g. RedisBlobStore(client, prefix='rcgrpo:weights:blob:', ttl_s=None)"
            )
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (got {keep_last})")
        self.client = client
        self.blobs = blobs
        self.namespace = namespace
        self.keep_last = keep_last
        self._latest_key = f"{namespace}:latest"
        self._versions_key = f"{namespace}:versions"  # sorted set: member = score = version

    def _record_key(self, version: int) -> str:
        return f"{self.namespace}:version:{version}"

    def publish(self, tensors: dict[str, torch.Tensor], version: int | None = None) -> WeightVersion:
        """Store `tensors` as `version` (default: latest + 1). Versions must increase."""
        if not tensors:
            raise ValueError("refusing to publish an empty weight dict")
        latest = self.latest()
        if version is None:
            version = 0 if latest is None else latest.version + 1
        if latest is not None and version <= latest.version:
            raise ValueError(f"weight version {version} is not newer than the latest, {latest.version}")
        # The blob is durable before any record points at it.
        ref = self.blobs.put(encode_tensors(tensors, metadata={"version": str(version)}))
        record = WeightVersion(
            version=version, sha256=ref.sha256, size=ref.size, blob_key=ref.key, created_at=time.time()
        )
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._record_key(version), mapping={k: str(v) for k, v in vars(record).items()})
            pipe.zadd(self._versions_key, {str(version): version})
            pipe.set(self._latest_key, version)
            pipe.execute()
        self._prune()
        return record

    def _prune(self):
        versions = self.versions()
        dropped, kept = versions[: -self.keep_last], versions[-self.keep_last :]
        if not dropped:
            return
        kept_keys = {self.get(v).blob_key for v in kept}
        for version in dropped:
            record = self.get(version)
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self._record_key(version))
                pipe.zrem(self._versions_key, str(version))
                pipe.execute()
            # Identical weights published twice share one content-addressed blob.
            if record is not None and record.blob_key not in kept_keys:
                self.blobs.delete(record.blob_ref)

    def versions(self) -> list[int]:
        return [int(v) for v in self.client.zrange(self._versions_key, 0, -1)]

    def get(self, version: int) -> WeightVersion | None:
        data = self.client.hgetall(self._record_key(version))
        return WeightVersion.from_hash(data) if data else None

    def latest(self) -> WeightVersion | None:
        version = self.client.get(self._latest_key)
        return None if version is None else self.get(int(version))

    def load(self, version: int | WeightVersion) -> dict[str, torch.Tensor]:
        """The tensors of `version`; raises BlobIntegrityError if the blob's sha256 does not match."""
        record = version if isinstance(version, WeightVersion) else self.get(version)
        if record is None:
            raise KeyError(f"weight version {version} is not stored (kept versions: {self.versions()})")
        return decode_tensors(self.blobs.get(record.blob_ref))
