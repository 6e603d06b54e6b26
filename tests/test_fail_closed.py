"""A reward that cannot be computed is never a number: over REST it is a 503 naming the reward and the
cause; in stream mode the group stays pending, is retried, and is dead-lettered (and counted) after
max_deliveries; the learner never trains on a group whose scores lack one of the run's terms."""

import re
import time

import httpx
import pytest
import torch
from openai_standin import serve_standin
from prometheus_client import REGISTRY
from test_reward_stream import make_group, record

from learner.learner import Learner
from reward_server.app import create_app
from reward_server.registry import REWARDS, Reward
from reward_server.settings import RewardServerSettings
from services.bus import RunBus
from services.config import load_run_config
from services.http import serve_in_thread
from services.record import GroupScores, RolloutGroup, decode_rollout_group, encode_rollout_group
from services.redis_server import EmbeddedRedis
from services.reward_client import RewardClient
from services.schemas import make_score_item
from services.streams import WorkStream

ROLLOUTS, SCORED = "failing:rollouts", "failing:scored"


def metric(url, name, labels):
    found = re.search(re.escape(f"{name}{{{labels}}}") + r" ([0-9.e+-]+)", httpx.get(f"{url}/metrics").text)
    return float(found.group(1)) if found else 0.0


def wait_until(condition, timeout_s=30.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def one_item():
    group = make_group(seed=21, group_size=1)
    item = make_score_item("f", 0, 0, group["source"], group["edits"][0], group["mask"], acd=0.5)
    return item.model_dump(mode="json", exclude_none=True)


def out_of_memory(batch, models):
    raise RuntimeError("CUDA out of memory")


def not_a_number(batch, models):
    return torch.full((batch.edits.shape[0],), float("nan"))


@pytest.mark.parametrize("model", [None, "flaky"], ids=["per_request", "micro_batched"])
@pytest.mark.parametrize(
    "fn,cause",
    [(out_of_memory, "RuntimeError: CUDA out of memory"), (not_a_number, "returned a non-finite score nan")],
)
def test_a_reward_that_fails_is_a_503_naming_it(tmp_path, model, fn, cause):
    registry = {**REWARDS, "flaky": Reward("flaky", fn, ("edit",), model, 1.0, "fails")}
    settings = RewardServerSettings(
        insecure_no_auth=True,
        rewards={"acd": 0.5, "flaky": 1.0},
        models={"flaky": tmp_path} if model else {},
    )
    app = create_app(settings, registry=registry, model_loaders={"flaky": lambda directory: object()})
    with serve_in_thread(app) as url:
        RewardClient(url).wait_ready(timeout_s=30)
        failed = httpx.post(f"{url}/v1/score", json={"items": [one_item()]})
        alone = httpx.post(f"{url}/v1/score", json={"items": [one_item()], "rewards": ["acd"]})
        failures = metric(url, "rcgrpo_reward_reward_failures_total", 'reward="flaky"')
        queue = metric(url, "rcgrpo_reward_queue_depth", "")
    # no total with the failed term left out or set to zero: the whole request fails, naming it
    assert failed.status_code == 503, failed.text
    assert failed.json() == {
        "detail": f"reward 'flaky' could not be computed: {cause}",
        "kind": "reward_failed",
        "reward": "flaky",
    }
    assert alone.status_code == 200 and alone.json()["results"][0]["total"] == pytest.approx(0.25)
    assert failures == 1 and queue == 0


def test_a_group_whose_judge_fails_stays_pending_then_is_dead_lettered(tmp_path):
    with EmbeddedRedis() as redis_server, serve_standin() as (standin, judge_url):
        settings = RewardServerSettings(
            insecure_no_auth=True,
            rewards={"vlm_judge": 1.0, "acd": 0.5},
            judge={"base_url": judge_url, "model": "judge", "max_attempts": 1},
            stream={
                "enabled": True,
                "redis_url": redis_server.url,
                "rollouts": ROLLOUTS,
                "scored": SCORED,
                "block_ms": 50,
                "reclaim_idle_ms": 200,
                "max_deliveries": 3,
            },
        )
        client = redis_server.client()
        work = WorkStream(client, ROLLOUTS, "reward-server")
        rewards = {"vlm_judge": 1.0, "acd": 0.5}
        with serve_in_thread(create_app(settings)) as url:
            RewardClient(url).wait_ready(timeout_s=30)
            # the judge is down: the group is tried max_deliveries times, never scored, then dead-lettered
            standin.reset(mode="fail")
            work.publish(encode_rollout_group(record(work, "down", 0, make_group(seed=22), rewards)))
            wait_until(lambda: work.dead_letter_length() == 1, what="the dead letter")
            assert client.xlen(SCORED) == 0 and work.pending_count() == 0
            assert len(standin.requests) == 3 * 4  # 3 deliveries of 4 candidates, one attempt each
            assert metric(url, "rcgrpo_reward_stream_groups_total", 'outcome="failed"') == 3
            assert metric(url, "rcgrpo_reward_stream_groups_total", 'outcome="dead_lettered"') == 1
            assert metric(url, "rcgrpo_reward_reward_failures_total", 'reward="vlm_judge"') == 3

            # the judge fails once, then answers: the group's retry is scored, once, with real scores
            standin.reset(fail_first=1)
            work.publish(encode_rollout_group(record(work, "flaky", 0, make_group(seed=23), rewards)))
            wait_until(lambda: client.xlen(SCORED) == 1, what="the scored group")
            wait_until(lambda: work.pending_count() == 0, what="no pending entries")
            [(_, fields)] = client.xrange(SCORED)
            scored = decode_rollout_group(fields).meta
            assert scored.key.group_id == "flaky" and work.dead_letter_length() == 1
            assert all(0 <= s["vlm_judge"] <= 1 and set(s) == set(rewards) for s in scored.scores.scores)
        client.close()


def test_the_learner_never_trains_on_a_group_lacking_a_term(tmp_path):
    with EmbeddedRedis() as redis_server:
        cfg = load_run_config(
            None,
            [
                "name=incomplete",
                f"runs_dir={tmp_path}",
                f"redis_url={redis_server.url}",
                "learner.groups_per_step=1",
            ],
        )
        bus = RunBus(cfg, redis_server.url)
        learner = Learner(cfg, redis_server.url)
        group = record(bus.scored, "partial", 0, make_group(seed=24), cfg.rewards)
        scores = [{name: 0.5 for name in cfg.rewards if name != "background_ssim"} for _ in range(4)]
        group = RolloutGroup(
            group.meta.model_copy(update={"scores": GroupScores(scores=scores, totals=[1.0] * 4)}),
            group.train,
        )
        before = REGISTRY.get_sample_value("rcgrpo_learner_groups_total", {"outcome": "incomplete"}) or 0.0
        bus.scored.publish(encode_rollout_group(group))
        with pytest.raises(TimeoutError, match="got 0"):
            learner.collect_groups(timeout_s=1.0)
        after = REGISTRY.get_sample_value("rcgrpo_learner_groups_total", {"outcome": "incomplete"})
        assert after - before == 1
        learner.checkpoint(task_cursor=0)
        assert bus.scored.pending_count() == 0  # acknowledged with the checkpoint, never re-read
        bus.client.close()


def test_the_learner_reports_the_hacking_detectors_per_group():
    from learner.learner import _hacks

    with EmbeddedRedis() as redis_server:
        client = redis_server.client()
        rewards = {"region_adherence": 1.0, "no_edit": 0.0, "repainted": 0.0, "acd": 0.5}
        group = record(WorkStream(client, "h:rollouts", "g"), "h", 0, make_group(seed=25), rewards)
        client.close()
    flags = [(1.0, 0.0), (0.0, 1.0), (0.0, 1.0), (0.0, 0.0)]
    scores = [{"region_adherence": 0.5, "no_edit": a, "repainted": b, "acd": 0.5} for a, b in flags]
    meta = group.meta.model_copy(update={"scores": GroupScores(scores=scores, totals=[0.75] * 4)})
    assert _hacks(RolloutGroup(meta, group.train)) == {"no_edit": 1, "repainted": 2}
    without = meta.model_copy(update={"rewards": {"region_adherence": 1.0, "acd": 0.5}})
    assert _hacks(RolloutGroup(without, group.train)) == {}
