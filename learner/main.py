"""`rcgrpo learner --config FILE`: the learner as its own process or container. It publishes the
initial weights, then trains on scored groups as they arrive (the driver with learner.external=true
feeds the tasks), checkpointing every learner.checkpoint_every steps."""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--redis-url", help="default: the config's redis_url, else REDIS_URL")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--metrics-port", type=int, default=9100, help="Prometheus port (0: off)")


def main(args: argparse.Namespace) -> int:
    from learner.learner import Learner
    from services.config import load_run_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_run_config(args.config, args.overrides)
    redis_url = args.redis_url or cfg.resolved_redis_url()
    if redis_url is None:
        raise ValueError("--redis-url: a standalone learner needs the run's Redis (set it, redis_url or REDIS_URL)")
    learner = Learner(cfg, redis_url, resume=args.resume, metrics_port=args.metrics_port)
    learner.run_standalone()
    return 0
