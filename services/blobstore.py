"""Content-addressed blob stores for payloads too large to ride inside a stream entry.

A blob is named by the sha256 of its bytes, so a ref (key, sha256, size) is enough to fetch and verify
it anywhere. get() re-hashes what it read and raises on a mismatch or a missing blob.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

DEFAULT_BLOB_TTL_S = 3600


class BlobError(RuntimeError):
    pass


class BlobMissingError(BlobError):
    pass


class BlobIntegrityError(BlobError):
    pass


@dataclass(frozen=True)
class BlobRef:
    key: str
    sha256: str
    size: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BlobRef:
        missing = {"key", "sha256", "size"} - set(data)
        if missing:
            raise ValueError(f"blob ref is missing {sorted(missing)}: {data!r}")
        return cls(key=str(data["key"]), sha256=str(data["sha256"]), size=int(data["size"]))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_blob(ref: BlobRef, data: bytes | None) -> bytes:
    if data is None:
        raise BlobMissingError(f"blob {ref.key} is missing (expired, deleted or never written)")
    if len(data) != ref.size:
        raise BlobIntegrityError(f"blob {ref.key} has {len(data)} bytes, its ref says {ref.size}")
    digest = sha256_hex(data)
    if digest != ref.sha256:
        raise BlobIntegrityError(f"blob {ref.key} has sha256 {digest}, its ref says {ref.sha256}")
    return data


class BlobStore(ABC):
    # Seconds a blob lives after put(); None: until deleted.
    ttl_s: float | None = None

    def put(self, data: bytes) -> BlobRef:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        digest = sha256_hex(data)
        ref = BlobRef(key=self._key_for(digest), sha256=digest, size=len(data))
        self._write(ref.key, data)
        return ref

    def get(self, ref: BlobRef) -> bytes:
        return verify_blob(ref, self._read(ref.key))

    @abstractmethod
    def delete(self, ref: BlobRef) -> None: ...

    @abstractmethod
    def _key_for(self, digest: str) -> str: ...

    @abstractmethod
    def _write(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _read(self, key: str) -> bytes | None: ...


class RedisBlobStore(BlobStore):
    """Blobs as Redis string keys `{prefix}{sha256}`, expiring after ttl_s (None: never).

    Writing the same content again refreshes its TTL.
    """

    def __init__(
        self, client: redis.Redis, prefix: str = "rcgrpo:blob:", ttl_s: float | None = DEFAULT_BLOB_TTL_S
    ):
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive or None (got {ttl_s})")
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s

    def _key_for(self, digest: str) -> str:
        return self.prefix + digest

    def _write(self, key: str, data: bytes) -> None:
        px = None if self.ttl_s is None else int(self.ttl_s * 1000)
        self.client.set(key, data, px=px)

    def _read(self, key: str) -> bytes | None:
        return self.client.get(key)

    def delete(self, ref: BlobRef) -> None:
        self.client.delete(ref.key)


class DirectoryBlobStore(BlobStore):
    """Blobs as files `{directory}/{sha[:2]}/{sha}` on a directory all processes share.

    Writes go to a temp file in the same directory, fsync, then rename, so a reader never sees a partial
    blob. Blobs stay until delete() or remove_older_than().
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _key_for(self, digest: str) -> str:
        return f"{digest[:2]}/{digest}"

    def _path(self, key: str) -> Path:
        path = (self.directory / key).resolve()
        if self.directory.resolve() not in path.parents:
            raise ValueError(f"blob key {key!r} points outside {self.directory}")
        return path

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if path.exists() and path.stat().st_size == len(data):
            # Content-addressed: same name, same bytes. Touch it so remove_older_than() sees it as new.
            os.utime(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, ref: BlobRef) -> None:
        self._path(ref.key).unlink(missing_ok=True)

    def remove_older_than(self, age_s: float) -> int:
        """Delete blobs last written more than age_s ago; returns how many."""
        cutoff = time.time() - age_s
        removed = 0
        for path in self.directory.glob("??/*"):
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed
