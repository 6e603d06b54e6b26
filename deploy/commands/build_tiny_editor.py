"""`rcgrpo build-tiny-editor OUT`: a randomly initialised tiny editor (for tests and experiments)."""

from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("out", help="directory to write the FluxKontextPipeline to")
    parser.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    from rcgrpo.tiny_editor import TinyEditorSpec, build_tiny_editor

    path = build_tiny_editor(args.out, TinyEditorSpec(seed=args.seed))
    print(f"tiny editor written to {path}")
    return 0
