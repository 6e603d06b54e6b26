"""The checks that make a faulted run trustworthy, shared by the chaos suites (bench/chaos.py,
bench/netfault_chaos.py) and the compose cluster's (scripts/compose-chaos.sh, through
scripts/compose_smoke_check.py): metrics.jsonl has every step exactly once, no group id is trained
twice, and no group that some stage acknowledged is lost, read back from the run's Redis (a private
Redis's append-only file, or a live server such as the compose cluster's).

Imports only the project and the standard library (no test extras), so the checks also run inside the
rcgrpo image.
"""

from __future__ import annotations

import json
from pathlib import Path


class StepWatch:
    """Follows metrics.jsonl: how many steps it holds, and when a line not seen before appears."""

    def __init__(self, path: Path):
        self.path, self.seen = path, set()

    def lines(self) -> list[str]:
        return (
            [line for line in self.path.read_text().splitlines() if line.strip()]
            if self.path.exists()
            else []
        )

    def new_lines(self) -> int:
        lines = [line for line in self.lines() if line not in self.seen]
        self.seen.update(lines)
        return len(lines)

    def steps(self) -> int:
        return len(self.lines())


def acknowledged_but_lost(run_dir: Path, redis_dir: Path | None = None) -> list[str]:
    """Groups some stage acknowledged whose result the next stage never got, read from the run's AOF (in
    redis_dir; default: the private Redis's, in the run directory)."""
    from services.redis_server import EmbeddedRedis

    with EmbeddedRedis(data_dir=redis_dir or run_dir / "redis") as server:
        return lost_in_redis(run_dir, server.url)


def lost_in_redis(run_dir: Path, redis_url: str) -> list[str]:
    """acknowledged_but_lost, read from the Redis at redis_url (the run's own, still serving)."""
    from services.blobstore import BlobError
    from services.bus import RunBus
    from services.config import RunConfig
    from services.record import Task, decode_rollout_group

    cfg = RunConfig.model_validate({**_yaml(run_dir / "config.yaml")})
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    trained = (
        set(json.loads((checkpoints[-1] / "state.json").read_text())["consumed"]) if checkpoints else set()
    )
    bus = RunBus(cfg, redis_url)
    try:

        def acked(stream) -> list:
            """Entries delivered to the stream's consumer group and acknowledged (not pending, not dead-lettered)."""
            [info] = [
                g for g in stream.client.xinfo_groups(stream.name) if g["name"].decode() == stream.group
            ]
            pending = {p["message_id"].decode() for p in _all_pending(stream)}
            dead = {f[b"dead_letter_of"].decode() for _, f in stream.client.xrange(stream.dead_letter)}
            return [
                (i.decode(), f)
                for i, f in stream.client.xrange(stream.name, max=info["last-delivered-id"])
                if i.decode() not in pending | dead
            ]

        rollouts = {
            decode_rollout_group(f).meta.key.group_id for _, f in bus.client.xrange(bus.rollouts.name)
        }
        scored = {decode_rollout_group(f).meta.key.id for _, f in bus.client.xrange(bus.scored.name)}
        tasks = [Task.from_fields(f).group_id for _, f in acked(bus.tasks)]
        lost = [f"task {group_id}: acked, no rollout group" for group_id in tasks if group_id not in rollouts]
        for _, f in acked(bus.rollouts):
            if (key := decode_rollout_group(f).meta.key.id) not in scored:
                lost.append(f"rollout group {key}: acked by the reward server, not scored")
        for _, f in acked(bus.scored):
            if (key := decode_rollout_group(f).meta.key.id) not in trained:
                lost.append(f"scored group {key}: acked by the learner, not in its last checkpoint")
        for _, f in bus.client.xrange(bus.scored.name):  # still to be trained: its tensors must be there
            group = decode_rollout_group(f)
            if group.meta.key.id not in trained:
                try:
                    bus.train_blobs.get(group.train)
                except BlobError as error:
                    lost.append(
                        f"scored group {group.meta.key.id}: not trained, its tensors are gone ({error})"
                    )
    finally:
        bus.client.close()
    return lost


def _all_pending(stream) -> list:
    return stream.client.xpending_range(stream.name, stream.group, "-", "+", 100_000)


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def check_run(
    run_dir: Path, steps: int, redis_dir: Path | None = None, redis_url: str | None = None
) -> list[str]:
    """Every check of a finished run; its Redis read from the AOF in redis_dir (default: the private
    Redis's) or, given redis_url, from that server."""
    problems = []
    lines = StepWatch(run_dir / "metrics.jsonl").lines()
    logged = [json.loads(line)["step"] for line in lines]
    if logged != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl steps {logged}, not 1..{steps} once each")
    groups = [row["group_id"] for line in lines for row in json.loads(line)["group_signal"]]
    if twice := sorted({g for g in groups if groups.count(g) > 1}):
        problems.append(f"groups trained twice: {twice}")
    for artefact in ("lora/pytorch_lora_weights.safetensors", "reward_curves.png", "summary.json"):
        if not (run_dir / artefact).exists():
            problems.append(f"no {artefact}")
    problems += lost_in_redis(run_dir, redis_url) if redis_url else acknowledged_but_lost(run_dir, redis_dir)
    return problems
