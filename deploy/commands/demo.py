"""`rcgrpo demo`: one ShapesEdit task, one group rolled out with RDP and one with global noise from the
same base noise; prints each candidate's ACD and the within-group spread of the decoded background."""

from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("--editor", help="editor directory (default: the shipped tiny editor)")
    parser.add_argument("--sample", type=int, default=0, help="ShapesEdit test-split sample index")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="save the two groups' edits as a PNG grid here")


def main(args) -> int:

    import torch
    from rich.console import Console
    from rich.table import Table

    from rcgrpo.config import MethodConfig
    from rcgrpo.data.shapes import generate_shapes_edit
    from rcgrpo.editor import load_editor
    from rcgrpo.group import sample_group
    from rcgrpo.tiny_editor import SHIPPED_EDITOR_DIR

    console = Console()
    editor = load_editor(args.editor or SHIPPED_EDITOR_DIR)
    sample = generate_shapes_edit(args.sample + 1, split="test", seed=args.seed)[args.sample]
    cfg = MethodConfig()
    background = (1 - sample.mask).bool()
    table = Table(title=f"{sample.instruction!r}  (G={cfg.group_size}, s_in={cfg.s_in}, s_out={cfg.s_out})")
    table.add_column("noise")
    table.add_column("ACD per candidate")
    table.add_column("background spread (std over the group)", justify="right")
    groups = {}
    for name, rdp in (("RDP", True), ("global", False)):
        # the same seed: the same z* and d_i for both
        group = sample_group(editor, cfg.model_copy(update={"rdp": rdp}), sample, noise_seed=args.seed)
        images = group.rollout.images
        spread = images.std(dim=0)[:, background].mean().item()
        groups[name] = images
        table.add_row(name, " ".join(f"{a:.3f}" for a in group.acd.tolist()), f"{spread:.5f}")
    console.print(table)
    if args.out:
        from PIL import Image

        rows = [torch.cat(list(images), dim=2) for images in groups.values()]
        grid = (torch.cat(rows, dim=1).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(grid).save(args.out)
        console.print(f"edits saved to {args.out} (top: RDP, bottom: global)")
    return 0
