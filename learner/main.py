"""`rcgrpo learner --config FILE`: the learner as its own process or container. It publishes the
initial weights, then trains on scored groups as they arrive (the driver with learner.external=true
feeds the tasks), checkpointing every learner.checkpoint_every steps."""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from services.config import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus port, 0: off (default: the config's learner.metrics_port)",
    )


def main(args: argparse.Namespace) -> int:
    from learner.learner import Learner
    from services.config import component_config
    from services.process import configure_logging

    configure_logging(logging.INFO)
    cfg, redis_url = component_config(args, "learner")
    port = cfg.learner.metrics_port if args.metrics_port is None else args.metrics_port
    learner = Learner(cfg, redis_url, resume=args.resume, metrics_port=port)
    learner.run_standalone()
    return 0
