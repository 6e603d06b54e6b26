"""Everything one training run shares through Redis, built from its RunConfig: the three work
streams (tasks -> rollouts -> scored), the weight store, the training payloads and the stop flag."""

from __future__ import annotations

import json

import redis

from services import metrics
from services.blobstore import RedisBlobStore
from services.config import RunConfig
from services.payloads import TrainPayloads
from services.streams import WorkStream
from services.weights import WeightStore

# consumer groups of the three streams
TASKS_GROUP = "rollout-workers"
ROLLOUTS_GROUP = "reward-server"
SCORED_GROUP = "learner"


class RunBus:
    def __init__(self, cfg: RunConfig, redis_url: str):
        self.cfg = cfg
        self.redis_url = redis_url
        self.client = redis.Redis.from_url(redis_url)
        self.tasks = WorkStream(self.client, cfg.key("tasks"), TASKS_GROUP)
        self.rollouts = WorkStream(self.client, cfg.key("rollouts"), ROLLOUTS_GROUP)
        self.scored = WorkStream(self.client, cfg.key("scored"), SCORED_GROUP)
        for stream in (self.tasks, self.rollouts, self.scored):
            stream.ensure_group()
        # weights never expire while kept; payloads live as long as a group may wait to be trained on
        self.weights = WeightStore(
            self.client,
            RedisBlobStore(self.client, prefix=cfg.key("weights:blob:"), ttl_s=None),
            namespace=cfg.key("weights"),
        )
        # rollout-group parts too large to inline (full-size images); the reward server reads them
        self.blobs = RedisBlobStore(self.client, prefix=cfg.key("blob:"))
        self.payloads = TrainPayloads(
            self.client,
            RedisBlobStore(self.client, prefix=cfg.key("payload:blob:")),
            namespace=cfg.key("payload"),
        )
        self._stop_key = cfg.key("stop")

    # what a driver and a learner in separate processes tell each other (learner.external)
    def set_task_cursor(self, cursor: int) -> None:
        self.client.set(self.cfg.key("tasks:cursor"), cursor)

    def task_cursor(self) -> int:
        return int(self.client.get(self.cfg.key("tasks:cursor")) or 0)

    def set_learner_stats(self, stats: dict) -> None:
        self.client.set(self.cfg.key("learner:last"), json.dumps(stats))

    def learner_stats(self) -> dict | None:
        raw = self.client.get(self.cfg.key("learner:last"))
        return None if raw is None else json.loads(raw)

    def task_done_key(self, task_id: str) -> str:
        return self.cfg.key(f"tasks:done:{task_id}")

    def request_stop(self) -> None:
        self.client.set(self._stop_key, b"1")

    def clear_stop(self) -> None:
        self.client.delete(self._stop_key)

    def stop_requested(self) -> bool:
        return bool(self.client.exists(self._stop_key))

    def streams(self) -> dict[str, WorkStream]:
        return {"tasks": self.tasks, "rollouts": self.rollouts, "scored": self.scored}

    def observe(self) -> dict[str, int]:
        """Update the stream gauges (length, pending, dead letters); returns the lengths."""
        lengths = {}
        for name, stream in self.streams().items():
            lengths[name] = stream.length()
            metrics.STREAM_LENGTH.labels(name).set(lengths[name])
            metrics.STREAM_PENDING.labels(name).set(stream.pending_count())
            metrics.DEAD_LETTERS.labels(name).set(stream.dead_letter_length())
        return lengths
