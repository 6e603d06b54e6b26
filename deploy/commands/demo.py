"""`rcgrpo demo`: one ShapesEdit task, one group rolled out with RDP and one with global noise from the
same base noise; prints each candidate's ACD and the within-group spread of the decoded background."""

from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("--editor", help="editor directory (default: the shipped tiny editor)")
    parser.add_argument("--sample", type=int, default=0, help="ShapesEdit test-split sample index")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="save the two groups' edits as a PNG grid here")


def main(args) -> int:
    import dataclasses

    import torch
    from rich.console import Console
    from rich.table import Table

    from rcgrpo.acd import acd_reward
    from rcgrpo.attention import capture_text_attention
    from rcgrpo.config import MethodConfig
    from rcgrpo.data.shapes import generate_shapes_edit
    from rcgrpo.editor import load_editor
    from rcgrpo.noise import group_noise, latent_mask, token_weights
    from rcgrpo.sampler import rollout
    from rcgrpo.tiny_editor import SHIPPED_EDITOR_DIR

    console = Console()
    editor = load_editor(args.editor or SHIPPED_EDITOR_DIR)
    sample = generate_shapes_edit(args.sample + 1, split="test", seed=args.seed)[args.sample]
    cfg = MethodConfig()
    cond = editor.encode_condition(sample.source[None], [sample.instruction], cfg.guidance_scale)
    h, w = editor.latent_size(cond.height, cond.width)
    mask_latent = latent_mask(sample.mask, (h, w))
    background = (1 - sample.mask).bool()
    table = Table(title=f"{sample.instruction!r}  (G={cfg.group_size}, s_in={cfg.s_in}, s_out={cfg.s_out})")
    table.add_column("noise")
    table.add_column("ACD per candidate")
    table.add_column("background spread (std over the group)", justify="right")
    groups = {}
    for name, rdp in (("RDP", True), ("global", False)):
        generator = torch.Generator().manual_seed(args.seed)  # same z* and d_i for both
        initial = group_noise(
            dataclasses.replace(cfg, rdp=rdp), mask_latent, (editor.latent_channels, h, w), generator
        )
        group_cond = cond.repeat(cfg.group_size)
        with capture_text_attention(editor, cfg.acd_layers) as capture:
            result = rollout(
                editor,
                group_cond,
                initial,
                cfg.num_steps,
                attention_kwargs=capture.attention_kwargs(group_cond),
            )
            acd = acd_reward(capture.attention_map(), token_weights(mask_latent) > 0.5)
        spread = result.images.std(dim=0)[:, background].mean().item()
        groups[name] = result.images
        table.add_row(name, " ".join(f"{a:.3f}" for a in acd.tolist()), f"{spread:.5f}")
    console.print(table)
    if args.out:
        from PIL import Image

        rows = [torch.cat(list(images), dim=2) for images in groups.values()]
        grid = (torch.cat(rows, dim=1).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(grid).save(args.out)
        console.print(f"edits saved to {args.out} (top: RDP, bottom: global)")
    return 0
