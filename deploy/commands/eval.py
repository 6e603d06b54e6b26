"""`rcgrpo eval`: run an editor (optionally with a LoRA) over a dataset and score it, or score edits
already saved in CompBench's results layout (--edits).

Writes <out>/metrics.json (aggregates), <out>/samples.csv (one row per sample) and <out>/grid.png
(source | edit | ground truth for a few samples), and prints the metrics table. With --group-spread,
also <out>/group_spread.json: per kind, what the update would have to select on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# the MethodConfig fields that set how the edits are sampled, and how --group-spread's groups are
SAMPLING_FLAGS = ["num_steps", "guidance_scale"]
GROUP_FLAGS = ["group_size", "s_in", "s_out"]


def add_arguments(parser):
    from rcgrpo.config import MethodConfig
    from rcgrpo.tiny_editor import SHIPPED_EDITOR_DIR
    from services.config import add_section_arguments

    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--editor",
        default=SHIPPED_EDITOR_DIR,
        help="FluxKontextPipeline directory to sample edits with (default: the shipped tiny editor)",
    )
    source.add_argument(
        "--edits",
        metavar="RESULTS_DIR",
        help="score edits already in CompBench's results layout (needs --model)",
    )
    parser.add_argument("--lora", help="diffusers LoRA directory to load into the editor")
    parser.add_argument("--data", required=True, help="shapes | compbench:PATH | jsonl:PATH")
    parser.add_argument("--split", default="test", help="ShapesEdit split (default: test)")
    parser.add_argument(
        "--limit", type=int, help="evaluate the first N samples (ShapesEdit: generate N, default 64)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data (ShapesEdit) and of the initial noise"
    )
    parser.add_argument(
        "--clip", metavar="DIR", help="local CLIP directory for LC-T / LC-I (CompBench: ViT-L/14)"
    )
    parser.add_argument("--out", default="rcgrpo-eval", help="output directory (default: rcgrpo-eval)")
    parser.add_argument(
        "--results-layout",
        metavar="RESULTS_DIR",
        help="also save the edits in CompBench's results layout here",
    )
    parser.add_argument("--model", help="model name in the results layout (with --results-layout or --edits)")
    add_section_arguments(parser, MethodConfig, SAMPLING_FLAGS)
    parser.add_argument(
        "--group-spread",
        action="store_true",
        help="also sample an RDP group per sample (--group-size, --s-in, --s-out; their defaults are the method's) and "
        "report per kind what GRPO has to select on: within-group std and successes (group_spread.json)",
    )
    add_section_arguments(parser, MethodConfig, GROUP_FLAGS)
    parser.add_argument(
        "--batch-size", type=int, default=1, help="samples of the same size rolled out together"
    )
    parser.add_argument(
        "--max-area", type=int, help="sample at most this many pixels (e.g. 1048576 for Kontext)"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: bfloat16 on CUDA)")
    parser.add_argument(
        "--metric-size",
        type=int,
        default=512,
        help="CompBench metrics resize to this square size (official: 512)",
    )
    parser.add_argument("--grid-rows", type=int, default=4, help="samples drawn in grid.png")


def main(args) -> int:

    from rcgrpo.clip_scores import load_clip
    from rcgrpo.compbench_metrics import CompBenchMetrics
    from rcgrpo.config import MethodConfig
    from rcgrpo.data.loading import load_samples
    from rcgrpo.evaluate import (
        read_results_layout,
        save_grid,
        score_edits,
        write_results_layout,
    )

    if (args.edits or args.results_layout) and not args.model:
        raise ValueError("--model: a model name is needed with --edits and --results-layout")
    if args.edits and args.lora:
        raise ValueError("--lora: only with --editor (--edits scores saved edits)")
    if args.edits and args.group_spread:
        raise ValueError("--group-spread: only with --editor (it samples groups)")
    samples = load_samples(args.data, split=args.split, limit=args.limit, seed=args.seed)
    if not samples:
        raise ValueError(f"--data: {args.data!r} has no samples")
    clip = load_clip(args.clip) if args.clip else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.edits:
        samples, edits, missing = read_results_layout(args.edits, args.model, samples)
        if missing:
            print(
                f"{len(missing)} samples have no edit in {args.edits} (skipped), e.g. {missing[0]}",
                file=sys.stderr,
            )
        if not samples:
            raise FileNotFoundError(f"--edits: no edits for model {args.model!r} found in {args.edits}")
    else:
        from rcgrpo.editor import load_editor
        from rcgrpo.evaluate import generate_edits, spread_table, within_group_spread
        from rcgrpo.lora import load_trained_lora

        # K and B may not exceed the grid and G: the training fields are validated where only sampling reads them
        k = min(MethodConfig.model_fields["steps_per_anchor"].default, args.num_steps)
        b = min(MethodConfig.model_fields["anchors"].default, args.group_size)
        cfg = MethodConfig(
            num_steps=args.num_steps,
            guidance_scale=args.guidance_scale,
            steps_per_anchor=k,
            group_size=args.group_size,
            anchors=b,
            s_in=args.s_in,
            s_out=args.s_out,
        )
        editor = load_editor(args.editor, dtype=args.dtype, device=args.device)
        if args.lora:
            if not Path(args.lora).is_dir():
                raise FileNotFoundError(f"--lora: {args.lora!r} is not a directory")
            load_trained_lora(editor.pipe, args.lora)
        edits = generate_edits(
            editor, samples, cfg, args.seed, batch_size=args.batch_size, max_area=args.max_area, progress=True
        )
        if args.results_layout:
            paths = write_results_layout(args.results_layout, args.model, samples, edits)
            print(f"{len(paths)} edits written to {Path(args.results_layout) / args.model}")
        if args.group_spread:
            spread = within_group_spread(editor, samples, cfg, args.seed)
            (out / "group_spread.json").write_text(json.dumps(spread, indent=2) + "\n")
            print(f"RDP groups, G = {cfg.group_size}, s_in = {cfg.s_in}, s_out = {cfg.s_out}:")
            print(spread_table(spread))

    metrics = CompBenchMetrics(clip, size=args.metric_size)
    result = score_edits(samples, edits, clip=clip, compbench=metrics)
    result.write_json(out / "metrics.json")
    result.write_csv(out / "samples.csv")
    save_grid(out / "grid.png", samples, edits, max_rows=args.grid_rows)
    print(result.table(), end="")
    print(f"metrics: {out / 'metrics.json'}  per sample: {out / 'samples.csv'}  grid: {out / 'grid.png'}")
    return 0
