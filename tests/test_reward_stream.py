"""Stream mode against a real redis-server: rollout groups in, one ScoredGroup out per (group, version)."""

import time

import httpx
import pytest
import torch

from rcgrpo.clip_scores import build_tiny_clip
from rcgrpo.data.shapes import generate_shapes_edit
from reward_server.app import create_app
from reward_server.settings import RewardServerSettings
from services.auth import bearer_header
from services.http import serve_in_thread
from services.redis_server import EmbeddedRedis
from services.reward_client import RewardClient
from services.schemas import decode_scored_group, encode_rollout_group, make_score_item
from services.streams import WorkStream

TOKEN = "stream-token-0123456789abcdef"
REWARDS = {"region_adherence": 1.0, "background_psnr": 0.02, "lc_t": 0.01, "acd": 0.5}
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


def publish(work: WorkStream, group_id: str, version: int, group: dict) -> str:
    fields = encode_rollout_group(
        group_id, version, "edit it", group["caption"], group["source"], group["mask"], group["edits"],
        target=group["target"], acd=group["acd"],
    )  # fmt: skip
    return work.publish(fields)


def scored_for(redis_client, group_id):
    return [
        s
        for s in (decode_scored_group(fields) for _, fields in redis_client.xrange(SCORED))
        if s.group_id == group_id
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
    assert scored.policy_version == 5 and scored.weights == REWARDS
    assert len(scored.scores) == len(scored.totals) == 4

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
    for over_http, scores, total in zip(http["results"], scored.scores, scored.totals, strict=True):
        assert scores == pytest.approx(over_http["scores"], rel=1e-5, abs=1e-5)
        assert total == pytest.approx(over_http["total"], rel=1e-5, abs=1e-5)
    assert [s["acd"] for s in scored.scores] == pytest.approx(group["acd"], abs=1e-12)
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
    assert [s.policy_version for s in scored_for(work.client, "grp-a")] == [5, 6]


def test_group_left_by_a_dead_consumer_is_reclaimed_and_scored_once(stream_server, work):
    group = make_group(seed=12)
    fields = encode_rollout_group("grp-b", 1, "edit it", group["caption"], group["source"], group["mask"],
                                  group["edits"], target=group["target"], acd=group["acd"])  # fmt: skip
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
    fields = encode_rollout_group("grp-d", 1, "", "", group["source"], group["mask"][:32], group["edits"])
    work.publish(fields)  # decodes, but its mask does not fit its images
    wait_until(lambda: work.dead_letter_length() == dead_before + 2, what="two dead letters")
    wait_until(lambda: work.pending_count() == 0, what="no pending entries")
    assert not scored_for(work.client, "grp-d")
    dead = work.read_dead_letters()[-2:]
    assert [int(d.fields[b"deliveries"]) for d in dead] == [2, 2]
    assert metric(stream_server, "rcgrpo_reward_errors_total", 'kind="stream_bad_message"') >= 4


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
