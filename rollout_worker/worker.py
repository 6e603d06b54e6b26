"""The rollout worker: takes editing tasks, rolls out one region-perturbed group per task with the
newest policy, and publishes it as one record for scoring (services.record). Runs as a Ray actor under
the driver or standalone (`rcgrpo rollout-worker`).
"""

from __future__ import annotations

import logging
import time

import redis
import torch

from rcgrpo.data.loading import load_samples
from rcgrpo.group import sample_group
from rcgrpo.lora import load_lora_state_dict
from services import metrics
from services.blobstore import BlobError
from services.bus import RunBus
from services.config import RunConfig
from services.policy import start_component
from services.record import (
    GroupImages,
    GroupKey,
    RolloutGroup,
    Task,
    encode_rollout_group,
    encode_train_tensors,
    group_meta,
)
from services.streams import ReclaimClock

log = logging.getLogger("rcgrpo.rollout_worker")
REJECTED_POLICY_POLL_S = 1.0  # how often a worker that refused the newest policy version looks for another
TASK_BLOCK_MS = 200  # a worker's wait for a new task per read: how soon it sees the stop flag when idle


class RolloutWorker:
    def __init__(self, cfg: RunConfig, redis_url: str, worker_id: str = "worker-0", metrics_port: int = 0):
        self.editor = start_component(cfg, cfg.rollout.torch_threads, metrics_port)
        self.cfg = cfg
        self.worker_id = worker_id
        self.bus = RunBus(cfg, redis_url)
        self.samples = load_samples(
            cfg.data.source, split=cfg.data.split, limit=cfg.data.num_samples, seed=cfg.data.seed
        )
        self.kept_states = cfg.kept_states
        self.policy_version: int | None = None
        self._reclaim = ReclaimClock(cfg.rollout.reclaim_idle_ms)  # for tasks a dead worker left
        self._took_own_pending = False
        self._taken: tuple[list, int | None, bool] | None = None  # next_entries()'s next answer

    def sync_lora(self, version: int | None = None) -> int:
        """Load policy `version` (default: the newest published; sha256-verified) unless it is already
        loaded; the loaded policy version."""
        if version is None:
            version = self.bus.lora.latest_version()
        if version is None:
            raise RuntimeError("no policy version is published yet: the learner publishes version 0 first")
        if version != self.policy_version:
            latest = self.bus.lora.get(version)
            load_lora_state_dict(self.editor.transformer, self.bus.lora.load(latest))
            self.policy_version = latest.policy_version
            metrics.ROLLOUT_POLICY_VERSION.labels(self.worker_id).set(latest.policy_version)
        return self.policy_version

    @torch.no_grad()
    def rollout_group(self, task: Task, pipe: redis.client.Pipeline) -> tuple[dict[str, bytes], torch.Tensor]:
        """Sample `task`'s group with the loaded policy, its training tensors and large images queued on
        `pipe` (or written to the payload directory) under the group key: (the record's stream fields,
        R_ACD per candidate)."""
        sample = self.samples[task.dataset_index % len(self.samples)]
        group = sample_group(self.editor, self.cfg.method, sample, task.noise_seed, self.kept_states)
        key = GroupKey(run=self.cfg.name, group_id=task.group_id, policy_version=self.policy_version)
        record = RolloutGroup(
            meta=group_meta(key, group, sample, self.cfg.rewards, self.cfg.composition),
            train=self.bus.train_blobs.queued(pipe).put(encode_train_tensors(group), name=key.id),
            images=GroupImages(sample.source, sample.mask, list(group.rollout.images.cpu()), sample.target),
        )
        return encode_rollout_group(record, blobs=self.bus.blobs.queued(pipe)), group.acd

    def process(self, entry, version: int | None = None, take_next: bool = False) -> bool:
        """Roll out one task entry with policy `version` (default: the newest) and complete it: its blobs,
        then publish + mark done + ack atomically, in one round trip. take_next: the next task (with the
        policy version and the stop flag) is asked for in the same round trip, unless a look for tasks
        dead workers left is due; next_entries() hands it out."""
        started = time.perf_counter()
        task = Task.from_fields(entry.fields)
        # a version published since the last check may be corrupt: refused and reported, the verified
        # weights stay loaded and the group is tagged with their version
        if not self.sync_lora_or_report(version) and self.policy_version is None:
            return False  # no verified weights yet: the task stays pending, for a reclaim
        take_next = take_next and self._taken is None and self._took_own_pending and self._reclaim.idle()
        with self.bus.client.pipeline(transaction=False) as pipe:
            fields, acd = self.rollout_group(task, pipe)
            done_key = self.bus.keys.task_done(task.group_id)
            completion = len(pipe)  # where its reply will be
            self.bus.tasks.queue_complete(pipe, entry.id, done_key, self.bus.rollouts.name, fields)
            if take_next:
                self.bus.queue_take_task(pipe, self.worker_id, block_ms=TASK_BLOCK_MS)
            rolled_out_s = time.perf_counter() - started  # not the round trip: it waits for the next task
            replies = pipe.execute()
        if take_next:
            self._taken = self.bus.task_taken(replies)
        published = bool(replies[completion])
        if published:
            metrics.ROLLOUT_GROUPS.labels(self.worker_id).inc()
            metrics.ROLLOUT_IMAGES.labels(self.worker_id).inc(self.cfg.method.group_size)
            metrics.ROLLOUT_ACD.labels(self.worker_id).set(float(acd.mean()))
            metrics.ROLLOUT_GROUP_SECONDS.labels(self.worker_id).observe(rolled_out_s)
        return published

    def next_entries(self) -> tuple[list, int | None, bool]:
        """Return the next task to roll out, with the newest policy version (None: ask) and whether a stop
        was requested. The task a previous process of this worker left pending (it died) comes first,
        then one another worker left pending (looked for on the ReclaimClock), else a new one."""
        if self._taken is not None:  # asked for with the last completion
            taken, self._taken = self._taken, None
            return taken
        cfg = self.cfg.rollout
        if not self._took_own_pending:
            self._took_own_pending = True
            if own := self.bus.tasks.read(self.worker_id, count=1, own_pending=True):
                return own, None, False
        if self._reclaim.due():
            reclaimed = self.bus.tasks.reclaim(
                self.worker_id, cfg.reclaim_idle_ms, count=1, max_deliveries=cfg.max_deliveries
            )
            if reclaimed:
                self._reclaim.look_again()
                return reclaimed, None, False
        return self.bus.take_task(self.worker_id, block_ms=TASK_BLOCK_MS)

    def sync_lora_or_report(self, version: int | None = None) -> bool:
        """sync_lora(version), reporting a version that fails verification instead of raising: the
        driver then has the learner publish a sound one. False while the newest version is refused."""
        try:
            self.sync_lora(version)
            return True
        except BlobError as error:
            latest = self.bus.lora.latest()
            self.bus.report_rejected_lora(latest.policy_version, f"{self.worker_id}: {error}")
            log.warning("%s refuses policy version %d: %s", self.worker_id, latest.policy_version, error)
            time.sleep(REJECTED_POLICY_POLL_S)
            return False

    def run(self, max_tasks: int | None = None) -> int:
        """Process tasks until the run's stop flag is set (or max_tasks); returns groups published."""
        published = 0
        while max_tasks is None or published < max_tasks:
            entries, version, stop = self.next_entries()
            if stop:  # a task taken as the stop came stays pending: a resumed run's worker takes it
                break
            for entry in entries:
                # the last task of max_tasks takes no next one: it would stay pending until reclaimed
                last = max_tasks is not None and published + 1 >= max_tasks
                published += self.process(entry, version, take_next=not last)
        log.info("%s stopping after %d groups", self.worker_id, published)
        return published
