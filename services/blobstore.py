"""The blob store: payloads too large to ride inside a stream entry, as Redis string keys.

A blob is named by the sha256 of its bytes (content-addressed), or by a name its writer chooses (a
rollout group's training tensors under the group key, a LoRA under its policy version). Either way a
`BlobRef` (key, sha256, size) is what a message or record carries: it is enough to fetch and verify the
blob anywhere. get() re-hashes what it read and raises on a mismatch or a missing blob.
"""

from __future__ import annotations

import hashlib
import os
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


def fsync_directory(path: Path) -> None:
    """Make the names in a directory (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it; on failure (a full volume) remove what was written and raise."""
    try:
        with open(path, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except OSError:
        path.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` all at once: written to a temporary name, fsynced, renamed, the rename
    fsynced. A crash or a full volume leaves the previous file as it was, and no partial one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    write_durably(partial, data)
    partial.replace(path)
    fsync_directory(path.parent)


class BlobStore:
    """Blobs as Redis keys `{prefix}{sha256 or name}`, expiring ttl_s after they are written (None: never).

    Writing the same content (or the same name) again overwrites it and refreshes its TTL.
    """

    def __init__(
        self, client: redis.Redis, prefix: str = "rcgrpo:blob:", ttl_s: float | None = DEFAULT_BLOB_TTL_S
    ):
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive or None (got {ttl_s})")
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s

    def key_for(self, name: str) -> str:
        return self.prefix + name

    def put(self, data: bytes, name: str | None = None) -> BlobRef:
        """Store `data` under `name` (default: its sha256) and return its ref."""
        return self.put_many([(data, name)])[0]

    def put_many(self, items: list[tuple[bytes, str | None]]) -> list[BlobRef]:
        """Store several (data, name) blobs in one round trip (a pipeline); their refs."""
        with self.client.pipeline(transaction=False) as pipe:
            refs = self.queued(pipe).put_many(items)
            pipe.execute()
        return refs

    def queued(self, pipe: redis.client.Pipeline) -> QueuedBlobStore:
        """This store's puts queued on `pipe`: their refs at once, the writes when its owner executes it
        (with the message that refers to them, in one round trip)."""
        return QueuedBlobStore(pipe, self.prefix, self.ttl_s)

    def get(self, ref: BlobRef) -> bytes:
        return self.get_many([ref])[0]

    def get_many(self, refs: list[BlobRef]) -> list[bytes]:
        """Several blobs in one command (MGET), each verified against its ref."""
        if not refs:
            return []
        found = self.client.mget([ref.key for ref in refs])
        for ref, data in zip(refs, found, strict=True):
            if data is None:
                raise BlobMissingError(f"blob {ref.key} is missing (expired, deleted or never written)")
            if len(data) != ref.size:
                raise BlobIntegrityError(f"blob {ref.key} has {len(data)} bytes, its ref says {ref.size}")
            digest = sha256_hex(data)
            if digest != ref.sha256:
                raise BlobIntegrityError(f"blob {ref.key} has sha256 {digest}, its ref says {ref.sha256}")
        return found

    def delete(self, *refs: BlobRef) -> None:
        if refs:
            self.client.delete(*(ref.key for ref in refs))


class FetchedBlobs:
    """Blobs fetched and verified together (one MGET for a batch of messages), served by key, so that
    decoding each message makes no round trip."""

    def __init__(self, store: BlobStore, refs: list[BlobRef]):
        self.refs = {ref.key: ref for ref in refs}
        distinct = list(self.refs.values())
        self.by_key = dict(zip(self.refs, store.get_many(distinct), strict=True))

    def get_many(self, refs: list[BlobRef]) -> list[bytes]:
        for ref in refs:
            if self.refs.get(ref.key) != ref:
                raise BlobIntegrityError(f"blob {ref.key} was not fetched under this ref")
        return [self.by_key[ref.key] for ref in refs]


class QueuedBlobStore:
    """BlobStore.put on a pipeline: the SETs wait for the pipeline's execute."""

    def __init__(self, pipe: redis.client.Pipeline, prefix: str, ttl_s: float | None):
        self.pipe, self.prefix, self.ttl_s = pipe, prefix, ttl_s

    def put(self, data: bytes, name: str | None = None) -> BlobRef:
        return self.put_many([(data, name)])[0]

    def put_many(self, items: list[tuple[bytes, str | None]]) -> list[BlobRef]:
        refs, px = [], None if self.ttl_s is None else int(self.ttl_s * 1000)
        for data, name in items:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"blob data must be bytes, got {type(data).__name__}")
            data = bytes(data)
            digest = sha256_hex(data)
            refs.append(BlobRef(key=self.prefix + (name or digest), sha256=digest, size=len(data)))
            self.pipe.set(refs[-1].key, data, px=px)
        return refs


class DirectoryBlobStore:
    """The BlobStore interface on a directory (a volume every worker mounts): each blob a file, written
    atomically (write_atomically), so neither a reader nor a crash nor a full volume leaves a partial
    blob. No TTL: blobs stay until deleted. For payloads every worker reads (policy versions), the
    readers share the filesystem's bandwidth instead of one Redis thread's (docs/SCALE.md, bench/bench_weight_fanout.py)."""

    def __init__(self, root: str | os.PathLike, prefix: str = ""):
        self.root = Path(root)
        self.prefix = prefix

    def key_for(self, name: str) -> str:
        return self.prefix + name

    def _path(self, key: str) -> Path:
        if "/" in key or key.startswith("."):
            raise ValueError(f"blob key {key!r} is not a plain file name")
        return self.root / key

    def put(self, data: bytes, name: str | None = None) -> BlobRef:
        return self.put_many([(data, name)])[0]

    def put_many(self, items: list[tuple[bytes, str | None]]) -> list[BlobRef]:
        self.root.mkdir(parents=True, exist_ok=True)
        refs = []
        for data, name in items:
            data = bytes(data)
            digest = sha256_hex(data)
            ref = BlobRef(key=self.key_for(name or digest), sha256=digest, size=len(data))
            write_atomically(self._path(ref.key), data)
            refs.append(ref)
        return refs

    def queued(self, pipe: redis.client.Pipeline) -> DirectoryBlobStore:
        """BlobStore.queued's interface: the files are written at once, so they exist before the pipeline
        that carries the message referring to them executes."""
        return self

    def get(self, ref: BlobRef) -> bytes:
        return self.get_many([ref])[0]

    def get_many(self, refs: list[BlobRef]) -> list[bytes]:
        found = []
        for ref in refs:
            try:
                data = self._path(ref.key).read_bytes()
            except FileNotFoundError:
                raise BlobMissingError(
                    f"blob {ref.key} is missing under {self.root} (deleted or never written)"
                ) from None
            if len(data) != ref.size:
                raise BlobIntegrityError(f"blob {ref.key} has {len(data)} bytes, its ref says {ref.size}")
            digest = sha256_hex(data)
            if digest != ref.sha256:
                raise BlobIntegrityError(f"blob {ref.key} has sha256 {digest}, its ref says {ref.sha256}")
            found.append(data)
        return found

    def delete(self, *refs: BlobRef) -> None:
        self.delete_keys(*(ref.key for ref in refs))

    def delete_keys(self, *keys: str) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
