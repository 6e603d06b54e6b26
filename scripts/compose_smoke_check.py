"""The checks of scripts/compose-smoke.sh, run inside the compose cluster (`docker compose exec
ray-head python scripts/compose_smoke_check.py ...`), where Redis, Prometheus and the `runs` volume
are reachable by their compose names.

  live --learners N --rollout-workers N   while the job runs: every Prometheus target is up, the
                                          expected learner and rollout-worker targets are among them,
                                          and learner, rollout and reward-server metrics have values
  run --run-dir runs/NAME                 after the job: the LoRA and the report are in the volume, and
                                          the reward server scored the run's groups with its weights
  recovered --run-dir runs/NAME --since T after a job that lost a node at Unix time T: every step once,
                                          no group trained twice, none acknowledged and lost (the chaos
                                          suite's checks, bench/run_checks.py, on the cluster's Redis);
                                          prints the recovery time, from T to the first step after it,
                                          and the longest time between two steps from the last before T

Each prints what it checked and exits 1 with the reason on the first failure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import httpx

PROMETHEUS = "http://prometheus:9090"


def fail(message: str) -> None:
    print(f"FAIL: {message}", flush=True)
    sys.exit(1)


def query(expr: str) -> list[dict]:
    reply = httpx.get(f"{PROMETHEUS}/api/v1/query", params={"query": expr}, timeout=10).json()
    if reply["status"] != "success":
        fail(f"Prometheus refused {expr!r}: {reply}")
    return reply["data"]["result"]


def live(args: argparse.Namespace) -> None:
    """Poll Prometheus until every target is up with the expected jobs present and the run's metrics
    have values; fail at the deadline with what is still missing."""
    expected = {"prometheus": 1, "reward-server": 1, "learner": args.learners}
    expected |= {"rollout-worker": args.rollout_workers, "ray": args.ray_nodes}
    metrics = {
        "learner steps": 'max(rcgrpo_learner_step{job="learner"})',
        "learner policy version": 'max(rcgrpo_learner_policy_version{job="learner"})',
        "learner stream lengths": 'count(rcgrpo_stream_length{job="learner"})',
        "rollout groups": 'sum(rcgrpo_rollout_groups_total{job="rollout-worker"})',
        "reward-server stream groups scored": (
            'sum(rcgrpo_reward_stream_groups_total{job="reward-server", outcome="scored"})'
        ),
        "reward-server items scored": 'sum(rcgrpo_reward_items_scored_total{job="reward-server"})',
    }
    deadline = time.monotonic() + args.timeout
    while True:
        active = httpx.get(f"{PROMETHEUS}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        jobs: dict[str, int] = {}
        for target in active:
            jobs[target["labels"]["job"]] = jobs.get(target["labels"]["job"], 0) + 1
        down = [
            f"{t['labels']['job']} {t['scrapeUrl']} ({t['health']}: {t['lastError']})"
            for t in active
            if t["health"] != "up"
        ]
        values = {name: query(expr) for name, expr in metrics.items()}
        missing = [name for name, result in values.items() if not result or float(result[0]["value"][1]) < 1]
        # every rollout worker (Ray actor or container) published groups, not just one of them
        per_worker = query('sum by (instance) (rcgrpo_rollout_groups_total{job="rollout-worker"})')
        idle = args.rollout_workers - sum(float(r["value"][1]) >= 1 for r in per_worker)
        if idle:
            missing.append(f"groups from {idle} of {args.rollout_workers} rollout workers")
        if not down and jobs == expected and not missing:
            break
        if time.monotonic() > deadline:
            fail(
                f"after {args.timeout}s: targets by job {jobs} (expected {expected}); "
                f"not up: {down or 'none'}; metrics without a value >= 1: {missing or 'none'}"
            )
        time.sleep(2)
    for target in sorted(active, key=lambda t: (t["labels"]["job"], t["scrapeUrl"])):
        print(f"  target up: {target['labels']['job']:15} {target['scrapeUrl']}")
    for name, result in values.items():
        print(f"  metric: {name} = {float(result[0]['value'][1]):g}")
    for result in per_worker:
        print(f"  metric: rollout groups from {result['metric']['instance']} = {float(result['value'][1]):g}")
    print(f"OK: all {len(active)} Prometheus targets up; learner, rollout and reward-server metrics present")


def run(args: argparse.Namespace) -> None:
    import redis
    from PIL import Image
    from safetensors.torch import load_file

    from services.config import load_run_config
    from services.record import decode_rollout_group

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir / "config.yaml")  # the job's own config, as the driver wrote it

    # the LoRA, in diffusers format, trained (peft starts lora_B at zero)
    lora_path = run_dir / "lora" / "pytorch_lora_weights.safetensors"
    if not lora_path.is_file():
        fail(f"{lora_path} is missing")
    lora = load_file(lora_path)
    trained = [name for name, t in lora.items() if "lora_B" in name and t.abs().sum() > 0]
    if not lora or not trained:
        fail(f"{lora_path}: {len(lora)} tensors, none of the lora_B weights moved from zero")
    print(f"  {lora_path}: {len(lora)} tensors, {len(trained)} trained lora_B")

    # the report
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["steps"] != cfg.learner.total_steps:
        fail(f"summary.json: {summary['steps']} steps, the run asked for {cfg.learner.total_steps}")
    if cfg.eval.num_samples and not {"base", "trained", "change"} <= set(summary["eval"]):
        fail(f"summary.json has no base-vs-trained evaluation: {summary}")
    for name in ("reward_curves.png", "before_after.png"):
        with Image.open(run_dir / name) as image:
            if image.format != "PNG" or min(image.size) < 32:
                fail(f"{name}: {image.format} {image.size}")
            print(f"  {run_dir / name}: PNG {image.size[0]}x{image.size[1]}")
    print(f"  summary.json: {summary['steps']} steps, eval {json.dumps(summary.get('eval'))}")

    # the reward server's answers: every scored group of this run, with the run's reward weights
    weights = cfg.rewards  # reward.rewards and lambda_ACD: what every record carries to the scorer
    client = redis.Redis.from_url(cfg.resolved_redis_url())
    entries = client.xrange(cfg.keys.scored)
    groups = [decode_rollout_group(fields).meta for _, fields in entries]
    cursor = int(client.get(cfg.keys.tasks_cursor) or 0)
    issued = {f"task-{i:07d}" for i in range(cursor)}
    needed = cfg.learner.total_steps * cfg.learner.groups_per_step
    if len(groups) < needed:
        fail(f"{len(groups)} scored groups on {cfg.keys.scored}, the run trained on at least {needed}")
    for group in groups:
        group_id = group.key.group_id
        if group_id not in issued:
            fail(f"scored group {group_id} is not one of the {cursor} tasks the job issued")
        if group.rewards != weights:
            fail(f"group {group_id} carried weights {group.rewards}, the run's are {weights}")
        for scores, total in zip(group.scores.scores, group.scores.totals, strict=True):
            # the server's total must be the run's weighted sum, whatever its own default weights are
            expected_total = sum(weights[name] * scores[name] for name in weights)
            if not math.isclose(total, expected_total, rel_tol=1e-5, abs_tol=1e-6):
                fail(f"group {group_id}: total {total} != the run's weighted sum {expected_total}")
    print(f"  {len(groups)} scored groups (of {cursor} tasks issued), all with the run's weights {weights}")
    print(
        f"OK: run {cfg.name!r} left its LoRA and report in the runs volume; the reward server used its weights"
    )


def recovered(args: argparse.Namespace) -> None:
    import redis

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from run_checks import check_run

    from services.bus import RunBus
    from services.config import load_run_config

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir / "config.yaml")
    steps = cfg.learner.total_steps
    problems = check_run(run_dir, steps, redis_url=cfg.resolved_redis_url())
    lines = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    trained = [row["group_id"] for line in lines for row in line["group_signal"]]
    bus = RunBus(cfg, cfg.resolved_redis_url())
    try:
        consumed, lost = bus.groups_consumed(), bus.groups_lost()
        # the scored groups the learner acknowledged: delivered to its consumer group and not pending
        [group] = [
            g for g in bus.client.xinfo_groups(bus.scored.name) if g["name"].decode() == bus.scored.group
        ]
        acked = len(bus.client.xrange(bus.scored.name, max=group["last-delivered-id"])) - group["pending"]
    except redis.RedisError as error:
        fail(f"reading the run's streams: {error}")
    finally:
        bus.client.close()
    after = [line for line in lines if line["time"] > args.since]
    recoveries = json.loads((run_dir / "summary.json").read_text()).get("recoveries", {})
    print(
        f"  metrics.jsonl: steps {lines[0]['step']}..{lines[-1]['step']} of {steps}, {len(trained)} group rows "
        f"({len(set(trained))} distinct); the learner consumed {consumed} groups (trained or dropped as stale) "
        f"and acknowledged {acked} scored groups; dead-lettered {lost}; recoveries counted {recoveries or '-'}"
    )
    if not after:
        problems.append(f"no step logged after the fault at {args.since}")
    if problems:
        fail("; ".join(problems))
    # the stall the fault caused: the longest time between two steps, from the last one before it (or
    # from the fault, if it came before the first step)
    before = lines[: len(lines) - len(after)]
    times = [before[-1]["time"] if before else args.since] + [line["time"] for line in after]
    gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    print(
        f"RECOVERY_S {after[0]['time'] - args.since:.1f} (step {after[0]['step']}); longest step gap {gap:.1f} s"
    )
    print(
        f"OK: run {cfg.name!r}: steps 1..{steps} once each, no group trained twice, none acknowledged and lost"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    live_parser = sub.add_parser("live")
    live_parser.add_argument("--learners", type=int, default=1)
    live_parser.add_argument("--rollout-workers", type=int, required=True)
    live_parser.add_argument("--ray-nodes", type=int, default=2)
    live_parser.add_argument("--timeout", type=float, default=180)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--run-dir", required=True)
    recovered_parser = sub.add_parser("recovered")
    recovered_parser.add_argument("--run-dir", required=True)
    recovered_parser.add_argument("--since", type=float, required=True, help="the fault's Unix time")
    args = parser.parse_args()
    {"live": live, "run": run, "recovered": recovered}[args.check](args)


if __name__ == "__main__":
    main()
