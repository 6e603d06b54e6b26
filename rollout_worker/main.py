"""`rcgrpo rollout-worker --config FILE`: one standalone rollout worker (its own process or container),
found through Redis: it takes tasks from the run's tasks stream until the run's stop flag is set."""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from services.config import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("--worker-id", default="worker-0", help="consumer name; unique per worker")
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus port, 0: off (default: the config's rollout.metrics_port)",
    )
    parser.add_argument("--max-tasks", type=int, help="exit after this many groups")


def main(args: argparse.Namespace) -> int:
    from rollout_worker.worker import RolloutWorker
    from services.config import component_config
    from services.process import configure_logging

    configure_logging(logging.INFO)
    cfg, redis_url = component_config(args, "rollout worker")
    port = cfg.rollout.metrics_port if args.metrics_port is None else args.metrics_port
    RolloutWorker(cfg, redis_url, args.worker_id, port).run(max_tasks=args.max_tasks)
    return 0
