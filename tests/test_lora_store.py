"""LoraStore on a real redis-server: publish, latest, load, sha256 verification, keep-last pruning."""

import pytest
import torch

from services.blobstore import BlobIntegrityError, BlobMissingError
from services.lora_store import LoraStore


def lora(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prefix = "transformer.transformer_blocks.0.attn.to_q"
    return {
        f"{prefix}.lora_A.weight": torch.randn(4, 32, generator=g).bfloat16(),
        f"{prefix}.lora_B.weight": torch.randn(32, 4, generator=g).bfloat16(),
    }


@pytest.fixture
def store(client):
    return LoraStore(client, keep_last=2)


def test_publish_load_latest(store, client):
    assert store.latest() is None
    v0 = store.publish(lora(0))
    v1 = store.publish(lora(1))
    assert (v0.policy_version, v1.policy_version) == (0, 1)
    assert store.latest() == v1 and store.get(0) == v0
    assert v1.blob.size == len(store.blobs.get(v1.blob)) and len(v1.blob.sha256) == 64
    assert client.ttl(v1.blob.key) == -1  # a published LoRA never expires; only pruning removes it
    for version, seed in ((v0, 0), (1, 1)):
        loaded = store.load(version)
        for name, tensor in lora(seed).items():
            assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], tensor)
    with pytest.raises(ValueError, match="not newer"):
        store.publish(lora(2), policy_version=1)
    assert store.publish(lora(2), policy_version=10).policy_version == 10


def test_keep_last_prunes_old_versions(store):
    records = [store.publish(lora(seed)) for seed in range(4)]
    assert store.versions() == [2, 3]
    with pytest.raises(KeyError, match=r"kept versions: \[2, 3\]"):
        store.load(0)
    with pytest.raises(BlobMissingError, match="missing"):
        store.blobs.get(records[0].blob)  # the pruned blob is gone too
    # Identical weights re-published as new versions stay loadable after the older copies are pruned.
    store.publish(lora(3))
    store.publish(lora(3))
    assert store.versions() == [4, 5]
    assert torch.equal(store.load(5)[next(iter(lora(3)))], next(iter(lora(3).values())))


def test_load_detects_corrupted_weights(store, client):
    record = store.publish(lora(0))
    corrupt = bytearray(client.get(record.blob.key))
    corrupt[-1] ^= 1
    client.set(record.blob.key, bytes(corrupt))
    with pytest.raises(BlobIntegrityError, match="sha256"):
        store.load(record.policy_version)


def test_directory_store_keeps_the_bytes_in_files_and_the_records_in_redis(client, tmp_path):
    """learner.lora_store=directory: versions as files (written atomically), records and the latest
    version in Redis; a reader on another store instance loads it bit-exactly; pruning removes the
    file; a tampered file fails its sha256."""
    from services.blobstore import DirectoryBlobStore

    writer = LoraStore(client, keep_last=2, blobs=DirectoryBlobStore(tmp_path, prefix="lora-"))
    reader = LoraStore(client, keep_last=2, blobs=DirectoryBlobStore(tmp_path, prefix="lora-"))
    versions = [writer.publish(lora(seed)) for seed in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-v1", "lora-v2"]  # v0 pruned, no partials
    assert not client.exists("rcgrpo:lora:blob:v2")  # the bytes are not in Redis
    assert reader.latest_version() == 2 and reader.latest() == versions[2]
    loaded = reader.load(2)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in lora(2).items())
    (tmp_path / "lora-v2").write_bytes(b"x" * versions[2].blob.size)
    with pytest.raises(BlobIntegrityError):
        reader.load(2)
    (tmp_path / "lora-v1").unlink()
    with pytest.raises(BlobMissingError):
        reader.load(1)
