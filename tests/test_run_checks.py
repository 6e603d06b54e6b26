"""bench/run_checks.py, the chaos suites' checks, read a run's streams from a live Redis (the compose
cluster's, scripts/compose-chaos.sh) the same way as from a private Redis's append-only file."""

import sys
from pathlib import Path

from services.bus import RunBus
from services.config import load_run_config
from services.record import Task
from services.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
try:
    import run_checks
finally:
    sys.path.remove(str(ROOT / "bench"))


def test_a_task_acknowledged_without_its_rollout_group_is_lost_read_live_or_from_the_aof(tmp_path):
    cfg = load_run_config(None, [f"runs_dir={tmp_path / 'runs'}", "name=checks"])
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())
    expected = ["task task-0000000: acked, no rollout group"]
    with EmbeddedRedis(tmp_path / "redis") as server:
        bus = RunBus(cfg, server.url)
        bus.tasks.publish(Task("task-0000000", 0, 1).to_fields())
        bus.tasks.publish(Task("task-0000001", 1, 2).to_fields())
        first, _ = bus.tasks.read("worker-0", count=2)
        bus.tasks.ack(first.id)  # acknowledged, no rollout group; the second is still pending: not lost
        bus.client.close()
        assert run_checks.lost_in_redis(cfg.run_dir, server.url) == expected
    assert run_checks.acknowledged_but_lost(cfg.run_dir, tmp_path / "redis") == expected
