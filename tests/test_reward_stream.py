"""Stream mode against a real redis-server: rollout-group records in, one scored record out per group
key (run, group id, policy version), scored with the rewards and weights the record carries."""

import time

import httpx
import pytest
import torch

from rcgrpo.clip_scores import build_tiny_clip
from rcgrpo.data.shapes import generate_shapes_edit
from rcgrpo.rewards import background_psnr
from reward_server.app import create_app
from reward_server.settings import RewardServerSettings
from services.auth import bearer_header
from services.blobstore import BlobStore, DirectoryBlobStore
from services.http import serve_in_thread
from services.record import (
    GroupImages,
    GroupKey,
    GroupMeta,
    RolloutGroup,
    decode_rollout_group,
    encode_rollout_group,
)
from services.redis_server import EmbeddedRedis
from services.reward_client import RewardClient
from services.schemas import make_score_item
from services.streams import WorkStream

TOKEN = "stream-token-0123456789abcdef"
REWARDS = {
    "region_adherence": 1.0,
    "background_psnr": 0.02,
    "lc_t": 0.01,
    "acd": 0.5,
}  # what the server serves
ROLLOUTS, SCORED = "test:rollouts", "test:scored"


def q(x):
    return (x.clamp(0, 1) * 255).round() / 255


def make_group(seed: int, group_size: int = 4):
    sample = generate_shapes_edit(1, seed=seed)[0]
    g = torch.Generator().manual_seed(seed)
    edits = q(sample.target + 0.1 * torch.randn(group_size, *sample.target.shape, generator=g))
    acd = [0.2 + 0.1 * i for i in range(group_size)]
    return dict(
        source=q(sample.source),
        mask=q(sample.mask),
        target=q(sample.target),
        edits=edits,
        acd=acd,
        caption=sample.caption,
    )


def record(
    work: WorkStream, group_id: str, version: int, group: dict, rewards=REWARDS, instruction="edit it"
):
    """A rollout-group record as a worker publishes it (its training tensors: a stand-in blob)."""
    train = BlobStore(work.client, prefix="test:train:").put(
        b"training tensors", name=f"{group_id}:v{version}"
    )
    height, width = group["mask"].shape
    meta = GroupMeta(
        key=GroupKey(run="test", group_id=group_id, policy_version=version),
        instruction=instruction,
        caption=group["caption"],
        group_size=len(group["edits"]),
        height=height,
        width=width,
        kept_states=[0, 1],
        acd=group["acd"],
        rewards=rewards,
        has_target=group["target"] is not None,
    )
    images = GroupImages(group["source"], group["mask"], list(group["edits"]), group["target"])
    return RolloutGroup(meta, train, images)


def publish(work: WorkStream, group_id: str, version: int, group: dict, rewards=REWARDS) -> str:
    return work.publish(encode_rollout_group(record(work, group_id, version, group, rewards)))


def scored_for(redis_client, group_id):
    return [
        s.meta
        for s in (decode_rollout_group(fields) for _, fields in redis_client.xrange(SCORED))
        if s.meta.key.group_id == group_id
    ]


def wait_until(condition, timeout_s=20.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def stream_server(redis_server, tmp_path_factory):
    clip_dir = build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")
    settings = RewardServerSettings(
        token=TOKEN,
        rewards=REWARDS,
        models={"clip": clip_dir},
        stream={
            "enabled": True,
            "redis_url": redis_server.url,
            "rollouts": ROLLOUTS,
            "scored": SCORED,
            "block_ms": 50,
            "reclaim_idle_ms": 300,
            "max_deliveries": 2,
        },
    )
    with serve_in_thread(create_app(settings)) as url:
        RewardClient(url).wait_ready(timeout_s=60)
        yield url


@pytest.fixture
def work(redis_server):
    client = redis_server.client()
    yield WorkStream(client, ROLLOUTS, "reward-server")
    client.close()


def metric(url, name, labels):
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return 0.0


def test_group_is_scored_once_like_http(stream_server, work):
    group = make_group(seed=11)
    stream_items_before = metric(stream_server, "rcgrpo_reward_items_scored_total", 'source="stream"')
    lc_t_batches_before = metric(stream_server, "rcgrpo_reward_batch_size_count", 'reward="lc_t"')
    publish(work, "grp-a", 5, group)
    wait_until(lambda: scored_for(work.client, "grp-a"), what="a scored group")
    [scored] = scored_for(work.client, "grp-a")
    assert scored.key.policy_version == 5 and scored.rewards == REWARDS
    assert len(scored.scores.scores) == len(scored.scores.totals) == 4
    # the scored record is the rollout record, scores added: same key, same training tensors, no images
    [(_, fields)] = [
        e for e in work.client.xrange(SCORED) if decode_rollout_group(e[1]).meta.key.group_id == "grp-a"
    ]
    scored_record = decode_rollout_group(fields)
    assert scored_record.images is None
    assert scored_record.train == record(work, "grp-a", 5, group).train

    # the same candidates over HTTP give the same numbers
    items = [
        make_score_item(
            "grp-a",
            i,
            5,
            group["source"],
            edit,
            group["mask"],
            "edit it",
            group["caption"],
            group["target"],
            group["acd"][i],
        ).model_dump(mode="json", exclude_none=True)
        for i, edit in enumerate(group["edits"])
    ]
    http = httpx.post(f"{stream_server}/v1/score", json={"items": items}, headers=bearer_header(TOKEN)).json()
    for over_http, scores, total in zip(
        http["results"], scored.scores.scores, scored.scores.totals, strict=True
    ):
        assert scores == pytest.approx(over_http["scores"], rel=1e-5, abs=1e-5)
        assert total == pytest.approx(over_http["total"], rel=1e-5, abs=1e-5)
    assert [s["acd"] for s in scored.scores.scores] == pytest.approx(group["acd"], abs=1e-12)
    # through the server's own batcher
    assert (
        metric(stream_server, "rcgrpo_reward_items_scored_total", 'source="stream"')
        == stream_items_before + 4
    )
    assert metric(stream_server, "rcgrpo_reward_batch_size_count", 'reward="lc_t"') > lc_t_batches_before

    # a re-delivery of the same group and version: acked, no second result
    duplicates = metric(stream_server, "rcgrpo_reward_stream_groups_total", 'outcome="duplicate"')
    publish(work, "grp-a", 5, group)
    wait_until(
        lambda: metric(stream_server, "rcgrpo_reward_stream_groups_total", 'outcome="duplicate"') > duplicates
    )
    wait_until(lambda: work.pending_count() == 0, what="no pending entries")
    assert len(scored_for(work.client, "grp-a")) == 1
    # a new policy version of the same group is new work
    publish(work, "grp-a", 6, group)
    wait_until(lambda: len(scored_for(work.client, "grp-a")) == 2, what="the version-6 result")
    assert [s.key.policy_version for s in scored_for(work.client, "grp-a")] == [5, 6]


def test_group_left_by_a_dead_consumer_is_reclaimed_and_scored_once(stream_server, work):
    group = make_group(seed=12)
    fields = encode_rollout_group(record(work, "grp-b", 1, group))
    # Another consumer takes the entry and dies before acking it. Publish and take in one transaction,
    # so the server's blocked read cannot get the entry first.
    pipe = work.client.pipeline(transaction=True)
    pipe.xadd(ROLLOUTS, fields)
    pipe.xreadgroup("reward-server", "dead-consumer", {ROLLOUTS: ">"}, count=1)
    entry_id, taken = pipe.execute()
    assert taken[0][1][0][0] == entry_id  # pending to the dead consumer
    assert not scored_for(work.client, "grp-b")
    wait_until(lambda: scored_for(work.client, "grp-b"), what="the reclaimed group's result")
    wait_until(lambda: work.pending_count() == 0, what="no pending entries")
    time.sleep(0.5)  # past another reclaim interval: still one result
    assert len(scored_for(work.client, "grp-b")) == 1


def test_undecodable_group_goes_to_the_dead_letter_stream(stream_server, work):
    dead_before = work.dead_letter_length()
    work.publish({"meta": b'{"group_id": "grp-c"', "parts": b"{}"})  # truncated JSON
    group = make_group(seed=13)
    misfit = record(work, "grp-d", 1, group)
    misfit.images.mask = misfit.images.mask[:32]
    work.publish(encode_rollout_group(misfit))  # encodes, but its mask does not fit its images
    wait_until(lambda: work.dead_letter_length() == dead_before + 2, what="two dead letters")
    wait_until(lambda: work.pending_count() == 0, what="no pending entries")
    assert not scored_for(work.client, "grp-d")
    dead = [fields for _, fields in work.client.xrange(work.dead_letter)][-2:]
    assert [int(fields[b"deliveries"]) for fields in dead] == [2, 2]
    assert metric(stream_server, "rcgrpo_reward_errors_total", 'kind="stream_bad_message"') >= 4


def test_group_is_scored_with_the_rewards_and_weights_it_carries(stream_server, work):
    """The server's own weights (REWARDS) do not apply to a group: its run's do."""
    group = make_group(seed=14)
    run_rewards = {"region_adherence": 3.0, "background_psnr": 0.5, "acd": 0.0}  # other weights, no lc_t
    publish(work, "grp-e", 0, group, rewards=run_rewards)
    wait_until(lambda: scored_for(work.client, "grp-e"), what="the scored group")
    [scored] = scored_for(work.client, "grp-e")
    assert scored.rewards == run_rewards
    for scores, total in zip(scored.scores.scores, scored.scores.totals, strict=True):
        assert set(scores) == set(run_rewards)  # only the run's rewards are computed
        assert total == pytest.approx(sum(w * scores[name] for name, w in run_rewards.items()), rel=1e-9)
        assert total != pytest.approx(sum(w * scores[name] for name, w in REWARDS.items() if name in scores))

    # a group asking for a reward this server does not serve is never scored with other rewards
    dead_before = work.dead_letter_length()
    publish(work, "grp-f", 0, group, rewards={"background_ssim": 1.0, "acd": 0.5})
    wait_until(
        lambda: work.dead_letter_length() == dead_before + 1, what="the unservable group's dead letter"
    )
    assert not scored_for(work.client, "grp-f")


def test_images_in_the_blob_directory_are_read_from_it_and_freed_once_scored(
    redis_server, tmp_path_factory
):
    """A run with blob_store "directory": the image bundle is a file, not a Redis key."""
    payloads = tmp_path_factory.mktemp("payloads")
    rollouts, scored_stream = "test-dir:rollouts", "test-dir:scored"
    settings = RewardServerSettings(
        insecure_no_auth=True,
        rewards={"background_psnr": 0.02, "acd": 0.5},
        stream={
            "enabled": True,
            "redis_url": redis_server.url,
            "rollouts": rollouts,
            "scored": scored_stream,
            "block_ms": 50,
            "blob_dir": payloads,
        },
    )
    client = redis_server.client()
    work = WorkStream(client, rollouts, "reward-server")
    # photograph-like parts (noise compresses badly): each PNG is over the codec's 256 KiB inline limit
    g = torch.Generator().manual_seed(3)
    noise = lambda *shape: q(torch.rand(*shape, generator=g))  # noqa: E731
    mask = torch.zeros(320, 320)
    mask[100:200, 80:240] = 1.0
    group = dict(source=noise(3, 320, 320), mask=mask, target=None, edits=noise(2, 3, 320, 320))
    group |= dict(acd=[0.3, 0.6], caption="a red circle")
    fields = encode_rollout_group(
        record(work, "grp-dir", 0, group, rewards=settings.rewards), DirectoryBlobStore(payloads, "blob-")
    )
    [bundle] = [path.name for path in payloads.iterdir()]
    assert bundle.startswith("blob-") and not client.keys("*blob-*")
    with serve_in_thread(create_app(settings)) as url:
        RewardClient(url).wait_ready(timeout_s=60)
        work.publish(fields)
        wait_until(lambda: client.xlen(scored_stream) == 1, what="the scored group")
        [(_, scored)] = client.xrange(scored_stream)
        meta = decode_rollout_group(scored).meta
        # the same edits scored from memory: the file held the images
        sources, masks = group["source"].expand(2, -1, -1, -1), mask.expand(2, -1, -1)
        expected = background_psnr(group["edits"], sources, masks).tolist()
        assert [s["background_psnr"] for s in meta.scores.scores] == pytest.approx(expected, abs=1e-4)
        # scored and acked: the bundle is deleted
        wait_until(lambda: not any(payloads.iterdir()), what="the bundle's deletion")
    client.close()


def test_unreachable_redis_shows_in_readyz():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    settings = RewardServerSettings(
        insecure_no_auth=True,
        rewards={"acd": 0.5},
        stream={"enabled": True, "redis_url": f"redis://127.0.0.1:{port}/0"},
    )
    with serve_in_thread(create_app(settings)) as url:
        wait_until(
            lambda: "stream mode" in httpx.get(f"{url}/readyz").json().get("detail", ""),
            what="the stream error",
        )
        ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 503 and "ConnectionError" in ready.json()["detail"]
