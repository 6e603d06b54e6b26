"""Stream mode: score rollout groups from a Redis stream through the server's own batcher.

A consumer thread reads rollout-group records (services.record.RolloutGroup) from the rollouts stream
in a consumer group, scores the groups of one read together on the server's event loop (so the batcher
batches across them and across HTTP callers), each with the rewards and weights its record carries
(the run's, whatever this server's own defaults are), then per group publishes the record with its
scores to the scored stream, marks the group's done key and acks, atomically (WorkStream.complete). A
group whose done key (its group key) is already set is acked without a second result, so a re-delivery
yields one result. A group that cannot be decoded or scored (e.g. it asks for a reward this server
does not serve, or a reward of it could not be computed: a judge that is down) stays pending and is
never published with a made-up score; once idle it is reclaimed and retried, and after max_deliveries
it goes to the dead-letter stream (counted as outcome "dead_lettered").
"""

from __future__ import annotations

import asyncio
import logging
import threading

import redis

from reward_server.batcher import QueueFullError
from reward_server.metrics import RewardServerMetrics
from reward_server.scoring import Scorer, items_from_group
from reward_server.settings import StreamSettings
from services.blobstore import BlobError, BlobStore, DirectoryBlobStore, FetchedBlobs
from services.codec import stored_blobs
from services.keys import reward_done_key
from services.record import (
    GroupKey,
    GroupScores,
    RolloutGroup,
    decode_rollout_group,
    encode_rollout_group,
    group_key,
)
from services.redis_server import redis_url_or_embedded
from services.schemas import Composition
from services.streams import ReclaimClock, StreamEntry, WorkStream

log = logging.getLogger("rcgrpo.reward_server.stream")


class StreamConsumer:
    def __init__(
        self,
        settings: StreamSettings,
        scorer: Scorer,
        loop: asyncio.AbstractEventLoop,
        metrics: RewardServerMetrics,
    ):
        self.settings = settings
        self.scorer = scorer
        self.loop = loop
        self.metrics = metrics
        if settings.redis_url is not None:
            self.redis_url, self._embedded = settings.redis_url, None
        else:
            self.redis_url, self._embedded = redis_url_or_embedded()
            log.info("stream mode on %s", self.redis_url)
        self.client = redis.Redis.from_url(self.redis_url)
        self.work = WorkStream(self.client, settings.rollouts, settings.group)
        if settings.blob_dir is not None:
            self.blobs = DirectoryBlobStore(settings.blob_dir)
        else:
            self.blobs = BlobStore(self.client, prefix=settings.blob_prefix)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reward-stream", daemon=True)

    def start(self) -> None:
        self.work.ensure_group()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self.client.close()
        if self._embedded is not None:
            self._embedded.stop()

    def _run(self) -> None:
        s = self.settings
        reclaim = ReclaimClock(s.reclaim_idle_ms)
        while not self._stopping.is_set():
            try:
                entries = []
                if reclaim.due():
                    dead = self.work.dead_letter_exhausted(s.max_deliveries, min_idle_ms=s.reclaim_idle_ms)
                    if dead:
                        self.metrics.stream_groups.labels(outcome="dead_lettered").inc(len(dead))
                        log.error("rollout entries %s failed %d times: dead-lettered", dead, s.max_deliveries)
                    entries = self.work.reclaim(s.consumer, min_idle_ms=s.reclaim_idle_ms, count=s.read_count)
                    if entries:
                        reclaim.look_again()
                redelivered = {entry.id for entry in entries}
                entries += self.work.read(s.consumer, count=s.read_count, block_ms=s.block_ms)
                if entries:
                    self.process(entries, redelivered)
            except redis.RedisError as error:
                log.warning("redis error in stream mode (retrying): %s", error)
                self._stopping.wait(1.0)

    def done_key(self, key: GroupKey) -> str:
        return reward_done_key(self.settings.namespace, key.id)

    def process(self, entries: list[StreamEntry], redelivered: set[str]) -> None:
        """Score the groups of one read together, then complete each. `redelivered`: the ids of entries
        delivered before (reclaimed). Only those can have been scored already, so only their done keys
        are looked up first; a first delivery of a group scored under another entry is still published
        once, by its completion's done key."""
        keyed = []
        for entry in entries:
            try:
                keyed.append((entry, group_key(entry.fields)))
            except ValueError as error:
                self._leave_pending(entry, str(error))
        asked = [(entry, key) for entry, key in keyed if entry.id in redelivered]
        seen = set()
        if asked:
            with self.client.pipeline(transaction=False) as pipe:  # which were scored before: one round trip
                for _, key in asked:
                    pipe.exists(self.done_key(key))
                seen = {entry.id for (entry, _), done in zip(asked, pipe.execute(), strict=True) if done}
        if seen:  # a re-delivery: one result only, and its images are not fetched again
            self.work.ack(*seen)
            self.metrics.stream_groups.labels(outcome="duplicate").inc(len(seen))
        fresh = [entry for entry, _ in keyed if entry.id not in seen]
        images = self._fetch_images(fresh)
        todo = []
        for entry in fresh:
            try:
                group = decode_rollout_group(entry.fields, images)
                if group.images is None:
                    raise ValueError(f"group {group.meta.key.id!r} has no images to score")
                # the run's rewards and weights, as the group carries them
                chosen = self.scorer.choose(list(group.meta.rewards), group.meta.rewards)
                items = items_from_group(group)
            except (ValueError, BlobError) as error:  # BadInputError (unserved reward, bad sizes) too
                self._leave_pending(entry, str(error))
                continue
            composition = group.meta.composition or Composition()
            todo.append((entry, group, chosen, items, composition))
        if not todo:
            return
        # One coroutine submits every group before the batcher looks again, so they share batches.
        outcomes = asyncio.run_coroutine_threadsafe(
            self._score_all([(chosen, items, composition) for _, _, chosen, items, composition in todo]),
            self.loop,
        ).result()
        completions, images = [], []
        for (entry, group, *_), outcome in zip(todo, outcomes, strict=True):
            if isinstance(
                outcome, Exception
            ):  # stays pending: reclaimed later, dead-lettered at max_deliveries
                self.metrics.errors.labels(kind="stream_failed").inc()
                self.metrics.stream_groups.labels(outcome="failed").inc()
                log.warning("rollout group %s was not scored: %s", group.meta.key.id, outcome)
                continue
            scores = GroupScores(scores=[s.scores for s in outcome], totals=[s.total for s in outcome])
            scored = RolloutGroup(group.meta.model_copy(update={"scores": scores}), group.train)
            completions.append((entry.id, self.done_key(group.meta.key), encode_rollout_group(scored)))
            images += stored_blobs(entry.fields)
        if not completions:
            return
        published = self.work.complete_many(
            completions, self.settings.scored, result_maxlen=self.settings.scored_maxlen
        )
        # scored and acked: nothing reads the images again (a re-delivery is acked by its done key),
        # so free them now instead of holding every group's PNGs for the blob TTL
        self.blobs.delete(*images)
        for first in published:
            self.metrics.stream_groups.labels(outcome="scored" if first else "duplicate").inc()

    def _fetch_images(self, entries: list[StreamEntry]) -> BlobStore | FetchedBlobs:
        """Every entry's stored images in one round trip; if one is missing or corrupt, the store itself,
        so that each group fetches its own and only that one fails."""
        refs = []
        for entry in entries:
            try:
                refs += stored_blobs(entry.fields)
            except ValueError:  # a malformed entry: its own decode says why
                continue
        try:
            return FetchedBlobs(self.blobs, refs)
        except BlobError:
            return self.blobs

    async def _score_all(self, groups: list[tuple]) -> list:
        return await asyncio.gather(*[self._score(*group) for group in groups], return_exceptions=True)

    async def _score(self, chosen, items, composition):
        while True:
            try:
                return await self.scorer.score(items, chosen, source="stream", composition=composition)
            except QueueFullError as error:  # HTTP callers filled the queue: wait our turn
                if self._stopping.is_set():
                    raise
                await asyncio.sleep(error.retry_after_s)

    def _leave_pending(self, entry: StreamEntry, reason: str) -> None:
        self.metrics.errors.labels(kind="stream_bad_message").inc()
        self.metrics.stream_groups.labels(outcome="failed").inc()
        log.warning(
            "rollout entry %s cannot be scored (left pending for dead-lettering): %s", entry.id, reason
        )
