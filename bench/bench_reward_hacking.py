"""How often a reward hack outscores a correct edit, under the plain weighted sum and the gated
composition, on ShapesEdit.

Per sample: correct edits (the ground truth plus Gaussian noise of standard deviation sigma, the
quality of a generator from near perfect to poor) and hacks: the unedited source, and repaints whose
edit region is exactly the ground truth with the rest replaced (by another scene, by the inverted
source, by uniform noise, by one flat colour, by a 9x9 box blur of the source). Scored by the reward
server's own scorer (reward_server.scoring: the registered rewards, their unit ranges and
Scorer.total), with the tiny run's weights; it prints, per hack and sigma, on how many samples the
hack scores at least as high as the correct edit, and which detector flags the hack.

    .venv/bin/python bench/bench_reward_hacking.py [--samples 64] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from rcgrpo.data.shapes import generate_shapes_edit
from reward_server.metrics import RewardServerMetrics
from reward_server.scoring import Item, Scorer, compute_reward
from reward_server.settings import RewardServerSettings
from services.schemas import Composition

WEIGHTS = {
    "region_adherence": 1.0,
    "background_psnr": 0.25,
    "background_ssim": 1.0,
}  # configs/tiny_shapes.yaml
DETECTORS = ("no_edit", "repainted")
SIGMAS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.08)


def q(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def totals(scorer: Scorer, samples, edits: list[torch.Tensor], composition: Composition):
    """Per sample the composed total of its edit, and the detector flags."""
    items = [
        Item(edit=edit, source=q(s.source), mask=q(s.mask), target=q(s.target))
        for s, edit in zip(samples, edits, strict=True)
    ]
    names = [*WEIGHTS, *DETECTORS]
    scores = {name: compute_reward(scorer.served[name], items, {}) for name in names}
    per_item = [{name: scores[name][i] for name in WEIGHTS} for i in range(len(items))]
    total = torch.tensor([scorer.total(s, WEIGHTS, composition) for s in per_item], dtype=torch.float64)
    flags = {name: sum(scores[name]) for name in DETECTORS}
    return total, flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor", type=float, default=0.1, help="a of the gate")
    parser.add_argument("--slope", type=float, default=1.0, help="b of the gate")
    args = parser.parse_args()
    torch.set_num_threads(1)

    settings = RewardServerSettings(
        insecure_no_auth=True, rewards={**WEIGHTS, **dict.fromkeys(DETECTORS, 0.0)}
    )
    scorer = Scorer(settings, RewardServerMetrics())
    plain = Composition()
    gated = Composition(
        kind="gated", instruction_terms=["region_adherence"], floor=args.floor, slope=args.slope
    )
    samples = generate_shapes_edit(args.samples, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)

    def repaint(background: torch.Tensor, s) -> torch.Tensor:
        inside = s.mask[None]
        return q(s.target * inside + background * (1 - inside))

    hacks = {
        "unedited": [q(s.source) for s in samples],
        "repaint other scene": [
            repaint(samples[(k + 1) % len(samples)].source, s) for k, s in enumerate(samples)
        ],
        "repaint inverted": [repaint(1 - s.source, s) for s in samples],
        "repaint noise": [repaint(torch.rand(s.source.shape, generator=g), s) for s in samples],
        "repaint flat": [
            repaint(s.target.mean(dim=(1, 2), keepdim=True).expand_as(s.source), s) for s in samples
        ],
        "repaint blur": [repaint(F.avg_pool2d(s.source[None], 9, 1, 4)[0], s) for s in samples],
    }
    hack_scores = {
        name: (totals(scorer, samples, e, plain), totals(scorer, samples, e, gated))
        for name, e in hacks.items()
    }
    print(
        f"{args.samples} ShapesEdit samples (seed {args.seed}), weights {WEIGHTS}, gate a={args.floor} b={args.slope}"
    )
    print(
        "samples on which the hack scores >= the correct edit, plain sum / gated, per noise sigma of the correct edit"
    )
    print(
        f"{'hack':22s} {'flagged no_edit/repainted':>26s} " + " ".join(f"{f'sigma {s}':>13s}" for s in SIGMAS)
    )
    correct = {}
    for sigma in SIGMAS:
        edits = [q(s.target + sigma * torch.randn(s.target.shape, generator=g)) for s in samples]
        correct[sigma] = (totals(scorer, samples, edits, plain), totals(scorer, samples, edits, gated))
    for name, ((plain_total, flags), (gated_total, _)) in hack_scores.items():
        cells = []
        for sigma in SIGMAS:
            (plain_correct, _), (gated_correct, _) = correct[sigma]
            cells.append(
                f"{int((plain_total >= plain_correct).sum()):>6d}/{int((gated_total >= gated_correct).sum()):<6d}"
            )
        flagged = f"{flags['no_edit']:.0f}/{flags['repainted']:.0f}"
        print(f"{name:22s} {flagged:>26s} " + " ".join(cells))
    flags = {sigma: correct[sigma][0][1] for sigma in SIGMAS}
    print(
        "correct edits flagged no_edit/repainted: "
        + ", ".join(f"sigma {s}: {f['no_edit']:.0f}/{f['repainted']:.0f}" for s, f in flags.items())
    )


if __name__ == "__main__":
    main()
