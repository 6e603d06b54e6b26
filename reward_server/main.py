"""`rcgrpo reward-server --config configs/reward_server.yaml`: serve rewards over HTTP (and, with
--stream, from a Redis stream). The token comes from RCGRPO_REWARD_TOKEN or --token-file."""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML settings file, e.g. the shipped configs/reward_server.yaml")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8600)")
    parser.add_argument("--token-file", help="file holding the bearer token (else RCGRPO_REWARD_TOKEN)")
    parser.add_argument(
        "--insecure-no-auth", action="store_true", help="serve without auth (local development only)"
    )
    parser.add_argument("--stream", action="store_true", help="also consume rollout groups from Redis")
    parser.add_argument("--redis-url", help="Redis for stream mode (default: REDIS_URL, else embedded)")
    parser.add_argument(
        "--no-batching", action="store_true", help="run model-based rewards one item at a time"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def main(args: argparse.Namespace) -> int:
    from reward_server.app import create_app
    from reward_server.settings import load_settings
    from services.config import shipped_config
    from services.http import serve
    from services.process import configure_logging

    overrides = {}
    for name in ("host", "port", "token_file"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.insecure_no_auth:
        overrides["insecure_no_auth"] = True
    config = None if args.config is None else shipped_config(args.config)
    settings = load_settings(config, **overrides)
    # Nested sections replace whole: apply flags on the loaded values.
    if args.stream or args.redis_url:
        settings.stream = settings.stream.model_copy(
            update={"enabled": True, **({"redis_url": args.redis_url} if args.redis_url else {})}
        )
    if args.no_batching:
        settings.batching = settings.batching.model_copy(update={"enabled": False})
    configure_logging(args.log_level.upper())
    if settings.insecure_no_auth:
        logging.getLogger("rcgrpo.reward_server").warning("auth is DISABLED (--insecure-no-auth)")
    app = create_app(settings)
    serve(app, settings.host, settings.port, log_level=args.log_level)
    return 0
