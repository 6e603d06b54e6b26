"""The control plane at cluster scale, by simulation: rollout workers, reward consumers and the learner
without a model, against the real Redis bus (services.bus.RunBus, the embedded redis-server with its AOF).

Every simulated component makes the bus calls its real counterpart makes per group (rollout_worker,
reward_server.stream, learner), with payloads of the real sizes times --payload-scale (a machine with
little memory runs the bytes scaled down; the bytes results are scaled back up and say so), and
compute times drawn around the given ones, divided by --speedup (the bus sees --speedup times the real
message rate: a conservative test).

    capacity  one client, then --capacity-clients concurrent ones (processes, a run each), drives
              groups through the whole path back to back (control-plane messages, 1 KiB parts);
              Redis's own CPU seconds per group give the group messages per second one Redis core
              sustains, INFO commandstats the commands per group, and the requests the clients
              write (a pipeline is one) the round trips per group. A lone client leaves Redis idle
              between requests, so each round trip pays a wakeup; concurrent ones amortise it, as
              a cluster's workers do.
              --per-item replays the per-item calls the components made before batching.
    scale     16 / 64 / 256 worker threads, reward consumers (one per 32 workers), a learner sized to keep
              up: group messages/s, p50/p99 latency from a worker's publish to the learner's read, bus
              time per group of a worker and of the learner (bookkeeping), Redis memory; the bus share
              of a worker's and of the learner's iteration at the real compute times.

--blob-store directory puts the groups' payloads in files (blob_store "directory"): Redis then
carries the messages alone.

    nice -n 10 .venv/bin/python bench/bench_control_plane.py --workers 16 64 256
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import tempfile
import threading
import time

import redis
import torch

from reward_server.settings import StreamSettings
from services.blobstore import FetchedBlobs
from services.bus import RunBus
from services.codec import Message, encode_message
from services.config import RunConfig
from services.record import GroupKey, GroupMeta, GroupScores, RolloutGroup, Task, decode_rollout_group
from services.redis_server import EmbeddedRedis

MIB = 1024**2
# FLUX.1 Kontext at 1024^2, G = 12, bf16 (docs/SCALE.md, `rcgrpo plan`): the training blob with the
# flagship's 5 kept states, the PNG parts (14 x ~2.5 MiB for photographs), a LoRA version
TRAIN_BLOB_BYTES = int(34.58 * MIB)
IMAGE_PART_BYTES = int(2.5 * MIB)
IMAGE_PARTS = 14  # source, 12 edits, mask
LORA_BYTES = 104_595_456
GROUP_SIZE = 12
REWARD_READ_COUNT = StreamSettings().read_count  # groups a reward server takes per read


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def redis_calls(client: redis.Redis) -> int:
    return sum(stat["calls"] for stat in client.info("commandstats").values())


def redis_command_us(client: redis.Redis) -> dict[str, int]:
    """Microseconds Redis spent in each command so far (a script's commands count in it and alone)."""
    return {name.removeprefix("cmdstat_"): stat["usec"] for name, stat in client.info("commandstats").items()}


def meta(cfg: RunConfig, group_id: str, version: int, scored: bool) -> GroupMeta:
    scores = None
    if scored:
        scores = GroupScores(scores=[{"r": 0.5}] * GROUP_SIZE, totals=[0.5] * GROUP_SIZE)
    return GroupMeta(
        key=GroupKey(run=cfg.name, group_id=group_id, policy_version=version),
        instruction="replace the cup with a vase",
        group_size=GROUP_SIZE,
        height=1024,
        width=1024,
        kept_states=[0, 1, 2, 3, 4],
        acd=[0.6] * GROUP_SIZE,
        rewards={"lc_t": 0.01, "background_psnr": 0.02, "background_ssim": 1.0, "acd": 0.5},
        scores=scores,
    )


class Sim:
    """The bus calls of each component for one group, with payload sizes and per-item / batched calls."""

    def __init__(self, bus: RunBus, payload_scale: float, per_item: bool):
        self.bus, self.per_item = bus, per_item
        self.train_bytes = os.urandom(max(1024, int(TRAIN_BLOB_BYTES * payload_scale)))
        self.image_bytes = [
            os.urandom(max(1024, int(IMAGE_PART_BYTES * payload_scale))) for _ in range(IMAGE_PARTS)
        ]
        self.lora = torch.zeros(max(1024, int(LORA_BYTES * payload_scale)), dtype=torch.uint8)
        self.policy_version: int | None = None
        self.next_reclaim = 0.0
        self.taken: list | None = None  # the task a worker asked for with its last completion
        self.redelivered: set[str] = set()  # the reward consumer's reclaimed entries of its last take

    # rollout worker: find a task (with the policy version and the stop flag), store the group and
    # complete the task
    def worker_take(self, consumer: str, block_ms: int | None = 200) -> list:
        if self.taken is not None:
            taken, self.taken = self.taken, None
            return taken
        tasks = self.bus.tasks
        if self.per_item or time.monotonic() >= self.next_reclaim:
            self.next_reclaim = time.monotonic() + 30_000 / 4000
            reclaimed = tasks.reclaim(consumer, 30_000, count=1, max_deliveries=3)
            if reclaimed:  # the worker then asks for the version (one GET)
                self.policy_version = self.bus.lora.latest_version()
                return reclaimed
        if self.per_item:  # EXISTS stop, GET version, then the read
            self.bus.stop_requested()
            self.policy_version = self.bus.lora.latest().policy_version  # GET + HGETALL
            return tasks.read(consumer, count=1, block_ms=block_ms)
        entries, self.policy_version, _ = self.bus.take_task(consumer, block_ms)
        return entries

    def worker_publish(self, entry, consumer: str = "w0", block_ms: int | None = 200) -> None:
        """The group's blobs and completion; the worker's next task asked for in the same round trip
        (unless a look for reclaimable tasks is due), as rollout_worker does."""
        bus, version = self.bus, self.policy_version
        task = Task.from_fields(entry.fields)
        key = GroupKey(run=bus.cfg.name, group_id=task.group_id, policy_version=version)
        done_key, result = bus.keys.task_done(task.group_id), bus.rollouts.name

        def fields(train, refs) -> dict:
            message = Message(
                meta=meta(bus.cfg, task.group_id, version, False).model_dump(), refs={"train": train, **refs}
            )
            return encode_message(message) | {"published_at": repr(time.time())}

        if self.per_item:  # one blob per PNG part, one round trip each, then the completion
            train = bus.train_blobs.put(self.train_bytes, name=key.id)
            refs = {f"edit/{i}": bus.blobs.put(data) for i, data in enumerate(self.image_bytes)}
            bus.tasks.complete(entry.id, done_key, result, fields(train, refs))
            return
        # the worker's: the training blob and the codec's bundle (every large part in one blob) queued
        # with the completion and the next task's read, one round trip
        take_next = time.monotonic() < self.next_reclaim
        with bus.client.pipeline(transaction=False) as pipe:
            train = bus.train_blobs.queued(pipe).put(self.train_bytes, name=key.id)
            # every group's images differ (the blobs are content-addressed, and scoring one deletes it)
            bundle = task.group_id.encode() + b"".join(self.image_bytes)
            refs = {"edit/bundle": bus.blobs.queued(pipe).put(bundle)}
            bus.tasks.queue_complete(pipe, entry.id, done_key, result, fields(train, refs))
            if take_next:
                bus.queue_take_task(pipe, consumer, block_ms)
            replies = pipe.execute()
        if take_next:
            self.taken, self.policy_version, _ = bus.task_taken(replies)

    # reward consumer: read a batch, fetch the images, skip the scored, complete the rest
    def reward_take(self, consumer: str, count: int = 16, block_ms: int | None = 200) -> list:
        stream, entries = self.bus.rollouts, []
        if self.per_item or time.monotonic() >= self.next_reclaim:
            self.next_reclaim = time.monotonic() + 30_000 / 4000
            entries = stream.reclaim(consumer, 30_000, count=count, max_deliveries=3)
        self.redelivered = {entry.id for entry in entries}
        return entries + stream.read(consumer, count=count, block_ms=block_ms)

    def reward_fetch(self, entries) -> list:
        bus = self.bus
        if self.per_item:
            for entry in entries:
                for ref in _image_refs(entry):
                    bus.blobs.get(ref)
        else:  # the reward server's: every group's images in one MGET
            FetchedBlobs(bus.blobs, [ref for entry in entries for ref in _image_refs(entry)])
        return [(entry, decode_rollout_group(entry.fields)) for entry in entries]

    def reward_complete(self, groups) -> None:
        bus, stream = self.bus, self.bus.rollouts
        done_key = lambda g: bus.keys.reward_done(g.meta.key.id)  # noqa: E731
        if self.per_item:
            for _, group in groups:
                bus.client.exists(done_key(group))
        elif redelivered := [group for entry, group in groups if entry.id in self.redelivered]:
            with bus.client.pipeline(transaction=False) as pipe:  # only what was delivered before
                for group in redelivered:
                    pipe.exists(done_key(group))
                pipe.execute()
        items = []
        for entry, group in groups:
            scored = RolloutGroup(
                meta(bus.cfg, group.meta.key.group_id, group.meta.key.policy_version, True), group.train
            )
            message = Message(meta=scored.meta.model_dump(), refs={"train": scored.train})
            fields = encode_message(message) | {"published_at": entry.fields[b"published_at"]}
            items.append((entry.id, done_key(group), fields))
        if self.per_item:  # the images were left to expire
            for entry_id, key, fields in items:
                stream.complete(entry_id, key, bus.scored.name, fields)
        else:
            stream.complete_many(items, bus.scored.name)
            bus.blobs.delete(*[ref for entry, _ in groups for ref in _image_refs(entry)])

    # learner: read scored groups, fetch their tensors, (update), publish, ack and free at checkpoints
    def learner_read(self, consumer: str, count: int, block_ms: int = 200) -> list:
        return self.bus.scored.read(consumer, count=count, block_ms=block_ms)

    def learner_fetch(self, entries) -> list:
        groups = [decode_rollout_group(e.fields) for e in entries]
        if self.per_item:
            for g in groups:
                self.bus.train_blobs.get(g.train)
        else:
            self.bus.train_blobs.get_many([g.train for g in groups])
        return groups

    def learner_publish(self, version: int) -> None:
        """The LoraStore's publish (blob, record, prune), of a LoRA of the scaled size."""
        self.bus.lora.publish({"lora": self.lora}, policy_version=version)

    def learner_checkpoint(self, entry_ids: list[str], groups: list) -> None:
        self.bus.scored.ack(*entry_ids)
        if self.per_item:
            for g in groups:
                self.bus.train_blobs.delete(g.train)
        else:
            self.bus.train_blobs.delete(*[g.train for g in groups])

    def learner_observe(self, stats: dict) -> None:
        """The stream gauges and the step's stats (one SET each, the earlier way)."""
        if self.per_item:
            for stream in self.bus.streams().values():
                stream.length(), stream.pending_count(), stream.dead_letter_length()
            self.bus.client.set(self.bus.keys.learner_stats, json.dumps(stats))
        else:
            self.bus.observe(learner_stats=stats)


def _image_refs(entry):
    from services.codec import decode_message

    return [ref for name, ref in decode_message(entry.fields).refs.items() if name.startswith("edit/")]


def new_bus(url: str, name: str, blob_dir: str | None) -> RunBus:
    """The run's bus; blob_dir: its payloads as files there (blob_store "directory")."""
    store = "redis" if blob_dir is None else "directory"
    return RunBus(RunConfig(name=name, blob_store=store, blob_dir=blob_dir), url)


def drive(url, name, groups, per_item, groups_per_step, blob_dir, ready, results) -> None:
    """Groups through the whole path back to back on run `name`, once `ready` lets every client start;
    puts (groups done, requests written) on `results`."""
    bus = new_bus(url, name, blob_dir)
    sim = Sim(bus, payload_scale=0.0, per_item=per_item)  # 1 KiB parts: the messages, next to nothing
    sim.learner_publish(0)
    sends, send = [0], redis.connection.Connection.send_packed_command

    def counted_send(connection, *args, **kwargs):  # one per request written: a pipeline is one
        sends[0] += 1
        return send(connection, *args, **kwargs)

    redis.connection.Connection.send_packed_command = counted_send
    ready.wait()
    done = 0
    version = 0
    while done < groups:
        tasks = [Task(f"g{done + i:07d}", done + i, done + i).to_fields() for i in range(groups_per_step)]
        if per_item:
            for fields in tasks:
                bus.tasks.publish(fields)
        else:  # the driver's: one round trip
            bus.tasks.publish_many(tasks)
        bus.set_task_cursor(done + groups_per_step)
        worked = 0
        while worked < groups_per_step:  # the last completion's take finds none: the next take asks again
            for entry in sim.worker_take("w0", block_ms=None):
                sim.worker_publish(entry, "w0", block_ms=None)
                worked += 1
        scored_now = 0
        while scored_now < groups_per_step:  # the reward server's reads of read_count groups
            entries = sim.reward_take("r0", count=REWARD_READ_COUNT, block_ms=None)
            sim.reward_complete(sim.reward_fetch(entries))
            scored_now += len(entries)
        scored = sim.learner_read("l0", count=groups_per_step, block_ms=None)
        groups_read = sim.learner_fetch(scored)
        version += 1
        sim.learner_publish(version)
        sim.learner_observe({"step": version})
        sim.learner_checkpoint([e.id for e in scored], groups_read)
        done += len(scored)
    redis.connection.Connection.send_packed_command = send
    results.put((done, sends[0]))


def concurrently(url: str, target, client_args: list[tuple]) -> tuple[list, dict]:
    """Run target(*args, ready, results) in one forked process per args tuple, all started together
    once each has set up (`ready`); their results, and what Redis spent meanwhile: wall seconds, CPU
    seconds, commands and microseconds per command."""
    context = multiprocessing.get_context("fork")
    ready, results = context.Barrier(len(client_args) + 1), context.Queue()
    processes = [context.Process(target=target, args=(*args, ready, results)) for args in client_args]
    for process in processes:
        process.start()
    client = redis.Redis.from_url(url)
    ready.wait()
    cpu0, calls0, us0, t0 = (
        redis_cpu(client),
        redis_calls(client),
        redis_command_us(client),
        time.perf_counter(),
    )
    finished = [results.get() for _ in processes]
    us = redis_command_us(client)
    spent = {
        "wall": time.perf_counter() - t0,
        "cpu": redis_cpu(client) - cpu0,
        "calls": redis_calls(client) - calls0,
        "command_us": {name: total - us0.get(name, 0) for name, total in us.items()},
    }
    for process in processes:
        process.join()
    return finished, spent


def capacity(
    url: str, groups: int, per_item: bool, groups_per_step: int, blob_dir: str | None, clients: int = 1
) -> dict:
    """`clients` processes, each driving `groups` through the whole path on its own run; Redis CPU and
    commands per group. One client leaves Redis idle between its requests, so that every round trip
    pays for a wakeup; several keep it serving many ready connections per wakeup, as a cluster's
    workers do (the requests are the same)."""
    store = "redis" if blob_dir is None else "directory"
    name = f"cap-{'item' if per_item else 'batch'}-{groups_per_step}-{store}-{clients}"
    finished, spent = concurrently(
        url,
        drive,
        [(url, f"{name}-{i}", groups, per_item, groups_per_step, blob_dir) for i in range(clients)],
    )
    done, round_trips = (sum(column) for column in zip(*finished, strict=True))
    cpu = spent["cpu"]
    return {
        "mode": "per-item" if per_item else "batched",
        "blob_store": store,
        "clients": clients,
        "groups_per_step": groups_per_step,
        "groups": done,
        "client_groups_per_s": done / spent["wall"],
        "redis_busy_share": cpu / spent["wall"],
        "redis_cpu_ms_per_group": 1000 * cpu / done,
        "groups_per_s_per_redis_core": done / cpu,
        "commands_per_group": spent["calls"] / done,
        "round_trips_per_group": round_trips / done,
        "command_us_per_group": {
            name: round(us / done, 1)
            for name, us in sorted(spent["command_us"].items(), key=lambda item: -item[1])
            if us >= 0.5 * done
        },
    }


def _ping(url: str, count: int, ready, results) -> None:
    client = redis.Redis.from_url(url)
    client.ping()
    ready.wait()
    for _ in range(count):
        client.ping()
    results.put(count)


def round_trip_cost(url: str, clients: int, count: int = 40_000) -> dict:
    """Redis CPU per PING round trip from `clients` concurrent processes: what a round trip costs
    Redis beyond its commands, and how much of it concurrency amortises."""
    finished, spent = concurrently(url, _ping, [(url, count // clients)] * clients)
    return {"ping_clients": clients, "redis_cpu_us_per_round_trip": 1e6 * spent["cpu"] / sum(finished)}


def scale(url: str, workers: int, args) -> dict:
    """Workers, reward consumers and a learner as threads, for args.duration_s seconds."""
    name = f"scale-{workers}-{args.blob_store}"
    speed = args.speedup
    rollout_s, score_s, update_s = args.rollout_s / speed, args.score_s / speed, args.update_s / speed
    # a learner sized to keep up: every update takes the groups the workers made meanwhile
    groups_per_step = max(8, math.ceil(workers * args.update_s / args.rollout_s))
    consumers = max(1, workers // 32)
    stop = threading.Event()
    lock = threading.Lock()
    worker_bus_s, learner_bus_s, latencies, learner_steps = [], [], [], []
    memory_peak = [0]

    def feeder():
        bus = new_bus(url, name, args.blob_dir)
        cursor = 0
        while not stop.is_set():
            # keep about two tasks per worker queued (the driver feeds ahead of the learner)
            queued = bus.tasks.length() - bus.tasks.pending_count()
            if queued < workers:
                with bus.client.pipeline(transaction=False) as pipe:
                    for i in range(workers):
                        pipe.xadd(
                            bus.tasks.name, Task(f"g{cursor + i:07d}", cursor + i, cursor + i).to_fields()
                        )
                    pipe.execute()
                cursor += workers
                bus.set_task_cursor(cursor)
            stop.wait(0.05)

    def worker(i: int):
        bus = new_bus(url, name, args.blob_dir)
        sim = Sim(bus, args.payload_scale, args.per_item)
        rng = random.Random(i)
        while not stop.is_set():
            t = time.perf_counter()
            entries = sim.worker_take(f"w{i}")
            read_s = time.perf_counter() - t
            for entry in entries:
                stop.wait(rollout_s * rng.uniform(0.75, 1.25))  # the rollout
                t = time.perf_counter()
                sim.worker_publish(entry, f"w{i}")
                with lock:
                    worker_bus_s.append(read_s + time.perf_counter() - t)

    def reward(i: int):
        bus = new_bus(url, name, args.blob_dir)
        sim = Sim(bus, args.payload_scale, args.per_item)
        while not stop.is_set():
            entries = sim.reward_take(f"r{i}")
            if entries:
                groups = sim.reward_fetch(entries)
                stop.wait(score_s * len(groups))  # batched scoring
                sim.reward_complete(groups)

    def learner():
        bus = new_bus(url, name, args.blob_dir)
        sim = Sim(bus, args.payload_scale, args.per_item)
        version = 0  # published before any worker starts, as the driver does
        held_ids, held_groups = [], []
        while not stop.is_set():
            batch, bus_s = [], 0.0
            while len(batch) < groups_per_step and not stop.is_set():
                # a non-blocking read, so that waiting for the workers is not counted as bus time
                t = time.perf_counter()
                entries = sim.learner_read("l0", count=groups_per_step - len(batch), block_ms=None)
                if not entries:
                    stop.wait(0.01)
                    continue
                now = time.time()
                with lock:
                    latencies.extend(now - float(e.fields[b"published_at"]) for e in entries)
                groups = sim.learner_fetch(entries)
                bus_s += time.perf_counter() - t
                batch += list(zip(entries, groups, strict=True))
            if len(batch) < groups_per_step:
                break
            stop.wait(update_s)  # the update
            t = time.perf_counter()
            version += 1
            sim.learner_publish(version)
            sim.learner_observe({"step": version})
            held_ids += [e.id for e, _ in batch]
            held_groups += [g for _, g in batch]
            if version % args.checkpoint_every == 0:
                sim.learner_checkpoint(held_ids, held_groups)
                held_ids, held_groups = [], []
            bus_s += time.perf_counter() - t
            with lock:
                learner_bus_s.append(bus_s)
                learner_steps.append(len(batch))

    def monitor():
        client = redis.Redis.from_url(url)
        while not stop.is_set():
            memory_peak[0] = max(memory_peak[0], client.info("memory")["used_memory"])
            stop.wait(0.5)

    threads = [
        threading.Thread(target=feeder),
        threading.Thread(target=learner),
        threading.Thread(target=monitor),
    ]
    threads += [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    threads += [threading.Thread(target=reward, args=(i,)) for i in range(consumers)]
    Sim(new_bus(url, name, args.blob_dir), args.payload_scale, args.per_item).learner_publish(0)
    client = redis.Redis.from_url(url)
    cpu0 = redis_cpu(client)
    for t in threads:
        t.start()
    time.sleep(args.warmup_s)
    with lock:
        worker_bus_s.clear(), latencies.clear(), learner_bus_s.clear(), learner_steps.clear()
    t0, cpu_m = time.perf_counter(), redis_cpu(client)
    time.sleep(args.duration_s)
    with lock:
        n, wb, lat = len(worker_bus_s), list(worker_bus_s), sorted(latencies)
        lb, steps = list(learner_bus_s), list(learner_steps)
    wall, cpu = time.perf_counter() - t0, redis_cpu(client) - cpu_m
    stop.set()
    for t in threads:
        t.join(timeout=30)
    del cpu0
    quantile = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else math.nan  # noqa: E731
    worker_bus = statistics.mean(wb) if wb else math.nan
    learner_bus_per_step = statistics.mean(lb) if lb else math.nan
    return {
        "workers": workers,
        "reward_consumers": consumers,
        "groups_per_step": groups_per_step,
        "groups_per_s": n / wall,
        "real_groups_per_s": workers / args.rollout_s,
        "latency_p50_s": quantile(0.5),
        "latency_p99_s": quantile(0.99),
        "redis_cpu_share": cpu / wall,
        "worker_bus_ms_per_group": 1000 * worker_bus,
        "learner_bus_ms_per_group": 1000 * learner_bus_per_step / (sum(steps) / len(steps))
        if steps
        else math.nan,
        "learner_steps": len(steps),
        "worker_bus_share": worker_bus / (args.rollout_s + worker_bus),
        "learner_bus_share": learner_bus_per_step / (args.update_s + learner_bus_per_step),
        "redis_memory_peak_mib": memory_peak[0] / MIB,
        # the payloads' bytes are scaled, the messages' are not: in files, Redis holds the messages alone
        "redis_memory_peak_real_gib": memory_peak[0]
        / (args.payload_scale if args.blob_dir is None else 1)
        / 1024**3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="*", default=[16, 64, 256], help="none: capacity only")
    parser.add_argument("--capacity-groups", type=int, default=800)
    parser.add_argument(
        "--capacity-groups-per-step",
        type=int,
        nargs="+",
        default=[8, 64],
        help="groups per learner update (and per reward read) in the capacity runs: the per-update "
        "calls are shared by this many groups (8: the tiny run's batch; a 256-worker run's is hundreds)",
    )
    parser.add_argument(
        "--capacity-clients",
        type=int,
        nargs="+",
        default=[1, 16],
        help="concurrent clients (processes, each its own run) of the capacity runs",
    )
    parser.add_argument("--per-item", action="store_true", help="the per-item calls made before batching")
    parser.add_argument("--payload-scale", type=float, default=1 / 128)
    parser.add_argument("--rollout-s", type=float, default=40.0, help="one group on one worker (real)")
    parser.add_argument("--score-s", type=float, default=0.25, help="scoring one group (real)")
    parser.add_argument("--update-s", type=float, default=60.0, help="one learner update (real)")
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--speedup", type=float, default=8.0)
    parser.add_argument("--warmup-s", type=float, default=8.0)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument(
        "--blob-store",
        choices=["redis", "directory"],
        default="redis",
        help="where the groups' payloads go (blob_store); directory: a temporary one on this disk",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory(prefix="rcgrpo-payloads-") as payloads:
        args.blob_dir = payloads if args.blob_store == "directory" else None
        results = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
            "args": vars(args),
            "capacity": [capacity(server.url, args.capacity_groups, True, 8, args.blob_dir)]
            + [
                capacity(server.url, math.ceil(args.capacity_groups / c), False, n, args.blob_dir, c)
                for c in args.capacity_clients
                for n in args.capacity_groups_per_step
            ],
        }
        results["round_trips"] = [round_trip_cost(server.url, c) for c in sorted({1, *args.capacity_clients})]
        for row in results["capacity"] + results["round_trips"]:
            print(json.dumps(row))
        results["scale"] = []
        for workers in args.workers:
            row = scale(server.url, workers, args)
            results["scale"].append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
