"""Work queues on Redis streams with consumer groups (Redis 6.2 commands only).

Delivery is at-least-once: an entry stays pending until its consumer acks it, which it does only once
its work is durable. Entries left pending by a dead consumer are reclaimed by another after
`min_idle_ms` (XAUTOCLAIM); entries delivered `max_deliveries` times go to a dead-letter stream instead.
Because a reclaimed entry can be processed twice, completion is idempotent: `complete()` writes the
result, marks a done key and acks in one Lua script, and a second completion of the same key only acks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from services.codec import as_str

DEFAULT_DONE_TTL_S = 24 * 3600


@dataclass
class StreamEntry:
    id: str
    fields: dict[bytes, bytes]


def _check_client(client: redis.Redis):
    kwargs = client.connection_pool.connection_kwargs
    # Payload fields are binary (safetensors, PNG): a decoding client would corrupt or reject them.
    if kwargs.get("decode_responses"):
        raise ValueError("streams need a redis client with decode_responses=False (payloads are binary)")
    if kwargs.get("protocol") not in (None, 2, "2"):
        raise ValueError(f"streams parse RESP2 replies; got a client with protocol={kwargs['protocol']}")


def _entries(raw) -> list[StreamEntry]:
    return [StreamEntry(id=as_str(entry_id), fields=fields) for entry_id, fields in raw]


# KEYS: stream, done key, result stream. ARGV: group, entry id, done ttl ms, result maxlen (0: none),
# then result fields as name, value pairs. Returns 1 if this call completed the entry, 0 if it was done.
_COMPLETE_LUA = """
local claimed = redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3])
if claimed then
    if tonumber(ARGV[4]) > 0 then
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
    else
        redis.call('XADD', KEYS[3], '*', unpack(ARGV, 5))
    end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if claimed then return 1 else return 0 end
"""

# KEYS: stream, dead-letter stream. ARGV: group, entry id, deliveries.
# Moves the entry only if it is still pending, so two consumers never dead-letter it twice.
_DEAD_LETTER_LUA = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then return 0 end
local fields = {'dead_letter_of', ARGV[2], 'stream', KEYS[1], 'group', ARGV[1], 'deliveries', ARGV[3]}
local found = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #found > 0 then
    local original = found[1][2]
    for i = 1, #original do fields[#fields + 1] = original[i] end
end
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class ReclaimClock:
    """When a consumer looks for entries another consumer left pending. An entry is reclaimable only
    once idle for idle_ms, so looking every quarter of that (not before every read) saves the commands
    of a look per read and delays a takeover by at most a quarter of idle_ms."""

    def __init__(self, idle_ms: int):
        self.period_s = idle_ms / 4000
        self._next = 0.0  # monotonic time of the next look

    def due(self) -> bool:
        """Whether to look now; if so, the next look is a period away."""
        if time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.period_s
        return True

    def look_again(self) -> None:
        """A look found entries: there may be more, so the next is due at once."""
        self._next = 0.0

    def idle(self) -> bool:
        """Whether no look is due before the next period ends."""
        return time.monotonic() < self._next


class WorkStream:
    """One stream consumed by one consumer group.

    `maxlen` trims the stream approximately on publish (None: never). The dead-letter stream is
    `{name}:dead` unless given.
    """

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        group: str,
        maxlen: int | None = None,
        dead_letter: str | None = None,
    ):
        _check_client(client)
        self.client = client
        self.name = name
        self.group = group
        self.maxlen = maxlen
        self.dead_letter = dead_letter or f"{name}:dead"
        self._move_to_dead_letter = client.register_script(_DEAD_LETTER_LUA)

    def ensure_group(self, start_id: str = "0") -> None:
        """Create the stream and group if absent; a no-op if the group exists."""
        try:
            self.client.xgroup_create(self.name, self.group, id=start_id, mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def publish(self, fields: Mapping[str, bytes | str | int | float]) -> str:
        return self.publish_many([fields])[0]

    def publish_many(self, entries: list[Mapping[str, bytes | str | int | float]]) -> list[str]:
        """Several entries, in order, in one round trip (a pipeline); their ids."""
        with self.client.pipeline(transaction=False) as pipe:
            for fields in entries:
                if not fields:
                    raise ValueError("a stream entry needs at least one field")
                pipe.xadd(self.name, dict(fields), maxlen=self.maxlen, approximate=True)
            return [as_str(entry_id) for entry_id in pipe.execute()]

    def read(
        self, consumer: str, count: int | None = 1, block_ms: int | None = None, own_pending: bool = False
    ) -> list[StreamEntry]:
        """New entries for `consumer` (they stay pending until acked). block_ms=None: don't block.

        own_pending: instead, the entries already delivered to `consumer` and not acked (what a
        restarted consumer of the same name left behind)."""
        with self.client.pipeline(transaction=False) as pipe:
            self.queue_read(pipe, consumer, count, block_ms, own_pending)
            return self.entries_read(pipe.execute()[0])

    def queue_read(
        self,
        pipe: redis.client.Pipeline,
        consumer: str,
        count: int | None = 1,
        block_ms: int | None = None,
        own_pending: bool = False,
    ) -> None:
        """read() queued on `pipe`: commands queued after it run once it returns; entries_read() parses
        its reply."""
        start = "0" if own_pending else ">"
        pipe.xreadgroup(self.group, consumer, {self.name: start}, count=count, block=block_ms)

    @staticmethod
    def entries_read(response) -> list[StreamEntry]:
        # RESP2 reply: [[stream, entries]] for the one stream read.
        return _entries(response[0][1]) if response else []

    def ack(self, *entry_ids: str) -> int:
        return self.client.xack(self.name, self.group, *entry_ids) if entry_ids else 0

    def complete(
        self,
        entry_id: str,
        key: str,
        result_stream: str,
        result_fields: Mapping[str, bytes | str | int | float],
        done_ttl_s: float = DEFAULT_DONE_TTL_S,
        result_maxlen: int | None = None,
        pipe: redis.client.Pipeline | None = None,
    ) -> bool:
        """Atomically: publish `result_fields` to `result_stream` and mark `key` done unless it already
        is, then ack `entry_id`. True if this call published the result. `pipe`: as in complete_many."""
        items = [(entry_id, key, result_fields)]
        return self.complete_many(items, result_stream, done_ttl_s, result_maxlen, pipe)[0]

    def complete_many(
        self,
        items: list[tuple[str, str, Mapping[str, bytes | str | int | float]]],
        result_stream: str,
        done_ttl_s: float = DEFAULT_DONE_TTL_S,
        result_maxlen: int | None = None,
        pipe: redis.client.Pipeline | None = None,
    ) -> list[bool]:
        """`complete` for several (entry id, done key, result fields) in one round trip (a pipeline;
        each completion is still its own atomic script). `pipe`: a pipeline already holding writes the
        results refer to (their blobs): they go first, in the same round trip."""
        own = contextlib.nullcontext(pipe) if pipe is not None else self.client.pipeline(transaction=False)
        with own as pipe:
            for entry_id, key, result_fields in items:
                self.queue_complete(
                    pipe, entry_id, key, result_stream, result_fields, done_ttl_s, result_maxlen
                )
            replies = pipe.execute()
        return [bool(done) for done in replies[len(replies) - len(items) :]]

    def queue_complete(
        self,
        pipe: redis.client.Pipeline,
        entry_id: str,
        key: str,
        result_stream: str,
        result_fields: Mapping[str, bytes | str | int | float],
        done_ttl_s: float = DEFAULT_DONE_TTL_S,
        result_maxlen: int | None = None,
    ) -> None:
        """complete() queued on `pipe`: its reply, 1 if it published the result, is where it was queued."""
        if not result_fields:
            raise ValueError("a result entry needs at least one field")
        args = [self.group, entry_id, int(done_ttl_s * 1000), result_maxlen or 0]
        for field_name, value in result_fields.items():
            args += [field_name, value]
        # EVAL, not a registered script: in a pipeline that costs a SCRIPT EXISTS round trip per
        # execute, while Redis finds EVAL's compiled body by its sha1
        pipe.eval(_COMPLETE_LUA, 3, self.name, key, result_stream, *args)

    def dead_letter_exhausted(self, max_deliveries: int, min_idle_ms: int = 0, count: int = 100) -> list[str]:
        """Move pending entries delivered >= max_deliveries times (and idle >= min_idle_ms) to the
        dead-letter stream; returns their ids."""
        pending = self.client.xpending_range(self.name, self.group, "-", "+", count, idle=min_idle_ms)
        moved = []
        for item in pending:
            if item["times_delivered"] >= max_deliveries:
                entry_id = as_str(item["message_id"])
                args = [self.group, entry_id, item["times_delivered"]]
                if self._move_to_dead_letter(keys=[self.name, self.dead_letter], args=args):
                    moved.append(entry_id)
        return moved

    def reclaim(
        self, consumer: str, min_idle_ms: int, count: int = 10, max_deliveries: int | None = None
    ) -> list[StreamEntry]:
        """Take over entries pending longer than min_idle_ms (their consumer presumably died).

        With max_deliveries, entries already delivered that many times go to the dead-letter stream
        instead of being handed out again.
        """
        if max_deliveries is not None:
            self.dead_letter_exhausted(max_deliveries, min_idle_ms=min_idle_ms)
        claimed = []
        start = "0-0"
        while len(claimed) < count:
            response = self.client.xautoclaim(
                self.name, self.group, consumer, min_idle_ms, start_id=start, count=count - len(claimed)
            )
            start, entries = as_str(response[0]), response[1]
            # Redis 6.2 answers an entry trimmed from the stream while pending with no id and no
            # fields, and keeps it pending: skip it here; max_deliveries dead-letters it later.
            claimed += _entries((entry_id, fields) for entry_id, fields in entries if fields is not None)
            if start == "0-0":
                break
        return claimed

    def length(self) -> int:
        return self.client.xlen(self.name)

    def pending_count(self) -> int:
        summary = self.client.xpending(self.name, self.group)
        return int(summary["pending"])

    def dead_letter_length(self) -> int:
        return self.client.xlen(self.dead_letter)
