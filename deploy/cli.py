"""The `rcgrpo` command. Each subcommand lives in its own module exposing `add_arguments(parser)`
and `main(args) -> int`; only the chosen module's heavy dependencies are imported.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import rcgrpo

SUBCOMMANDS = {
    "demo": (
        "deploy.commands.demo",
        "roll out one RDP group on the tiny editor and print ACD and background spread",
    ),
    "build-tiny-editor": (
        "deploy.commands.build_tiny_editor",
        "write a randomly initialised tiny editor directory",
    ),
    "reward-server": ("reward_server.main", "serve rewards over authenticated HTTP (and a Redis stream)"),
    "eval": ("deploy.commands.eval", "score an editor, or saved edits, on ShapesEdit or CompBench"),
    "train": (
        "deploy.commands.train",
        "the main job: RC-GRPO training with Ray, Redis and the reward server",
    ),
    "study": (
        "deploy.commands.study",
        "RC-GRPO against Neighbor GRPO and its ablations at equal compute, over seeds, with a report",
    ),
    "pretrain": ("deploy.commands.pretrain", "pretrain the tiny Kontext editor on ShapesEdit"),
    "plan": (
        "deploy.commands.plan",
        "estimate a run's GPU memory, payload bytes and times; check that it fits before launch",
    ),
    "rollout-worker": ("rollout_worker.main", "a standalone rollout worker (found through Redis)"),
    "learner": ("learner.main", "a standalone learner (found through Redis)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rcgrpo", description="Region-Constrained GRPO for flow-based image editors"
    )
    parser.add_argument("--version", action="version", version=f"rcgrpo {rcgrpo.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # hide the torchvision fallback notice
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return module.main(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"rcgrpo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
