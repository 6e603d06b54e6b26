"""Dynamic micro-batching across concurrent requests.

Requests submit (key, item) jobs, key = the reward name. A collector task on the event loop takes the
key of the oldest queued job and waits until max_batch_size jobs of that key are queued or the oldest
has waited max_wait_ms, then runs `run_batch(key, items)` (a score or an exception per item) in one
worker thread, so the event loop stays free and the model runs one batch at a time. Jobs that arrive
while a batch runs queue up and go in the next one. The queue is bounded by max_queue_items (queued
plus running): a submit that does not fit raises QueueFullError right away, which the server answers
with 503 and Retry-After.

The wait is only for company that is on its way: callers announce themselves with `expecting()`
while they decode their images, and a batch stops waiting once no announced caller is left. A lone
caller is thus never delayed, and batches still fill under concurrency.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from reward_server.metrics import RewardServerMetrics


class QueueFullError(Exception):
    def __init__(self, requested: int, pending: int, capacity: int, retry_after_s: int):
        super().__init__(
            f"the scoring queue is full ({pending} of {capacity} items pending, {requested} more requested); "
            f"retry after {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


@dataclass
class _Job:
    key: str
    item: object
    future: asyncio.Future
    arrived: float  # loop time
    seq: int


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[str, list], Sequence[float | Exception]],
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_items: int,
        retry_after_s: int = 1,
        metrics: RewardServerMetrics | None = None,
    ):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue_items = max_queue_items
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.pending = 0  # jobs queued or in the running batch
        self.expected = 0  # callers that announced jobs and have not submitted them yet
        self._queues: dict[str, deque[_Job]] = {}
        self._seq = itertools.count()
        self._arrived: asyncio.Event | None = None
        self._collector: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-batch")
        self._collector = asyncio.create_task(self._collect(), name="reward-batcher")

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
            self._collector = None
        for queue in self._queues.values():
            for job in queue:
                if not job.future.done():
                    job.future.set_exception(RuntimeError("the reward server is shutting down"))
        self._queues.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @contextmanager
    def expecting(self):
        """Around a caller's work before its submit (on the event loop): batches may wait for it."""
        self.expected += 1
        try:
            yield
        finally:
            self.expected -= 1
            if self._arrived is not None:
                self._arrived.set()

    def submit(self, jobs: Sequence[tuple[str, object]]) -> asyncio.Future:
        """Queue every (key, item) job and return a future of their scores, in order. Admission is
        all or nothing and decided now: QueueFullError is raised before anything is queued."""
        if self._collector is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self.pending + len(jobs) > self.max_queue_items:
            raise QueueFullError(len(jobs), self.pending, self.max_queue_items, self.retry_after_s)
        loop = asyncio.get_running_loop()
        futures = []
        for key, item in jobs:
            future = loop.create_future()
            self._queues.setdefault(key, deque()).append(
                _Job(key, item, future, loop.time(), next(self._seq))
            )
            futures.append(future)
        self._set_pending(self.pending + len(jobs))
        self._arrived.set()
        return asyncio.gather(*futures)

    def _set_pending(self, value: int) -> None:
        self.pending = value
        if self.metrics is not None:
            self.metrics.queue_depth.set(value)

    def _drop_cancelled(self) -> None:
        # A caller that went away (client disconnect) leaves cancelled futures behind: free their slots.
        for key, queue in list(self._queues.items()):
            kept = deque(job for job in queue if not job.future.cancelled())
            self._set_pending(self.pending - (len(queue) - len(kept)))
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self._queues:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # Oldest job first, so no reward starves behind a busier one.
            key = min(self._queues, key=lambda k: self._queues[k][0].seq)
            deadline = self._queues[key][0].arrived + self.max_wait_s
            while (
                len(self._queues.get(key, ())) < self.max_batch_size
                and self.expected > 0
                and loop.time() < deadline
            ):
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            self._drop_cancelled()
            queue = self._queues.get(key)
            if not queue:
                continue
            batch = [queue.popleft() for _ in range(min(self.max_batch_size, len(queue)))]
            if not queue:
                del self._queues[key]
            await self._run(loop, key, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, key: str, batch: list[_Job]) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.labels(reward=key).observe(len(batch))
        try:
            results = await loop.run_in_executor(
                self._executor, self.run_batch, key, [job.item for job in batch]
            )
            if len(results) != len(batch):
                raise RuntimeError(f"reward {key!r} returned {len(results)} scores for {len(batch)} items")
        except asyncio.CancelledError:  # stop() while a batch runs
            for job in batch:
                job.future.cancel()
            raise
        except Exception as error:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
        else:
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, Exception):  # this item alone failed
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        finally:
            self._set_pending(self.pending - len(batch))
