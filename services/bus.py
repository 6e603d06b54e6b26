"""Everything one training run shares through Redis, built from its RunConfig: the three work
streams (tasks -> rollouts -> scored), the LoRA store, the blob stores and the stop flag."""

from __future__ import annotations

import json

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from services import metrics
from services.blobstore import BlobStore, DirectoryBlobStore
from services.config import RunConfig
from services.keys import ROLLOUTS_GROUP, SCORED_GROUP, TASKS_GROUP
from services.lora_store import LoraStore
from services.streams import DEFAULT_DONE_TTL_S, StreamEntry, WorkStream

# a lost Redis (restarted, or failing over) is retried with backoff for about a minute before a
# component gives up: long enough for the driver to restart an embedded one on its append-only file
REDIS_RETRIES = 40
REDIS_RETRY_BACKOFF = ExponentialBackoff(cap=2.0, base=0.05)


class RunBus:
    def __init__(self, cfg: RunConfig, redis_url: str):
        self.cfg = cfg
        self.redis_url = redis_url
        self.client = redis.Redis.from_url(
            redis_url,
            retry=Retry(REDIS_RETRY_BACKOFF, REDIS_RETRIES),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self.keys = keys = cfg.keys
        self.tasks = WorkStream(self.client, keys.tasks, TASKS_GROUP)
        self.rollouts = WorkStream(self.client, keys.rollouts, ROLLOUTS_GROUP)
        self.scored = WorkStream(self.client, keys.scored, SCORED_GROUP)
        for stream in (self.tasks, self.rollouts, self.scored):
            stream.ensure_group()
        weights = None
        if cfg.learner.lora_store == "directory":
            weights = DirectoryBlobStore(cfg.learner.lora_dir or cfg.run_dir / "weights", prefix="lora-")
        self.lora = LoraStore(self.client, namespace=keys.lora, blobs=weights)
        # rollout-group images too large to inline (full-size edits): read once, by the reward server;
        # groups' training tensors, under their group key: deleted once a checkpoint holds their update,
        # and kept meanwhile as long as the reward server's done keys (in Redis; files stay until deleted)
        if cfg.blob_store == "directory":
            self.blobs = DirectoryBlobStore(cfg.blob_path, prefix="blob-")
            self.train_blobs = DirectoryBlobStore(cfg.blob_path, prefix="train-")
        else:
            self.blobs = BlobStore(self.client, prefix=keys.blob_prefix)
            self.train_blobs = BlobStore(self.client, prefix=keys.train_prefix, ttl_s=DEFAULT_DONE_TTL_S)

    # what a driver and a learner in separate processes tell each other (learner.external)
    def set_task_cursor(self, cursor: int) -> None:
        self.client.set(self.keys.tasks_cursor, cursor)

    def task_cursor(self) -> int:
        return int(self.client.get(self.keys.tasks_cursor) or 0)

    def learner_stats(self) -> dict | None:
        raw = self.client.get(self.keys.learner_stats)
        return None if raw is None else json.loads(raw)

    def set_groups_consumed(self, count: int) -> None:
        self.client.set(self.keys.groups_consumed, count)

    def groups_consumed(self) -> int:
        """Distinct groups the learner has trained on or dropped (as it last said)."""
        return int(self.client.get(self.keys.groups_consumed) or 0)

    def groups_lost(self) -> int:
        """Tasks and rollout groups dead-lettered (delivered max_deliveries times): they never reach the
        learner, so the driver replaces them."""
        return self.tasks.dead_letter_length() + self.rollouts.dead_letter_length()

    def report_rejected_lora(self, policy_version: int, reason: str) -> None:
        """A worker refused this published version (it failed verification)."""
        self.client.hset(self.keys.lora_rejected, str(policy_version), reason)

    def rejected_loras(self) -> dict[int, str]:
        """Every policy version a worker refused, with the reason."""
        refused = self.client.hgetall(self.keys.lora_rejected)
        return {int(version): reason.decode() for version, reason in refused.items()}

    def rejected_lora(self) -> tuple[int, str] | None:
        """The newest refused policy version and why, if it is still the latest; else None."""
        latest = self.lora.latest()
        if latest is None:
            return None
        reason = self.client.hget(self.keys.lora_rejected, str(latest.policy_version))
        return None if reason is None else (latest.policy_version, reason.decode())

    def request_stop(self) -> None:
        self.client.set(self.keys.stop, b"1")

    def clear_stop(self) -> None:
        self.client.delete(self.keys.stop)

    def stop_requested(self) -> bool:
        return bool(self.client.exists(self.keys.stop))

    def take_task(self, consumer: str, block_ms: int) -> tuple[list[StreamEntry], int | None, bool]:
        """A new task for `consumer` (waiting up to block_ms), then the newest policy version and the
        stop flag as of its arrival: what a worker asks before every group, in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            self.queue_take_task(pipe, consumer, block_ms)
            return self.task_taken(pipe.execute())

    def queue_take_task(self, pipe: redis.client.Pipeline, consumer: str, block_ms: int) -> None:
        """take_task() queued on `pipe`, behind what it holds (a worker's completion of its last task):
        task_taken() reads its answer from the pipeline's replies."""
        self.tasks.queue_read(pipe, consumer, count=1, block_ms=block_ms)
        pipe.get(self.lora.latest_key).exists(self.keys.stop)

    def task_taken(self, replies: list) -> tuple[list[StreamEntry], int | None, bool]:
        """take_task()'s answer from the replies of a pipeline that ended with queue_take_task()."""
        response, version, stop = replies[-3:]
        return self.tasks.entries_read(response), None if version is None else int(version), bool(stop)

    def streams(self) -> dict[str, WorkStream]:
        return {"tasks": self.tasks, "rollouts": self.rollouts, "scored": self.scored}

    def observe(self, learner_stats: dict | None = None) -> dict[str, int]:
        """Update the stream gauges (length, pending, dead letters); returns the lengths. learner_stats:
        the learner's last step, stored in the same round trip for learner_stats() (what a driver follows
        when the learner is external)."""
        with self.client.pipeline(transaction=False) as pipe:  # one round trip for the 9 numbers
            for stream in self.streams().values():
                pipe.xlen(stream.name).xpending(stream.name, stream.group).xlen(stream.dead_letter)
            if learner_stats is not None:
                pipe.set(self.keys.learner_stats, json.dumps(learner_stats))
            replies = pipe.execute()
        lengths = {}
        for i, name in enumerate(self.streams()):
            length, pending, dead = replies[3 * i : 3 * i + 3]
            lengths[name] = length
            metrics.STREAM_LENGTH.labels(name).set(length)
            metrics.STREAM_PENDING.labels(name).set(int(pending["pending"]))
            metrics.DEAD_LETTERS.labels(name).set(dead)
        return lengths
