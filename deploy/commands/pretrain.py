"""`rcgrpo pretrain --out DIR`: train the tiny Kontext editor on ShapesEdit (supervised flow matching),
reproducibly from a seed on CPU, and write it with a model card."""

from __future__ import annotations


def add_arguments(parser):
    from rcgrpo.pretrain import PretrainConfig

    defaults = PretrainConfig()
    parser.add_argument("--out", required=True, help="directory to write the editor to")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train-samples", type=int, default=defaults.train_samples)
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--flow-steps", type=int, default=defaults.flow_steps)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the shipped editor used 2)")
    parser.add_argument(
        "--eval-samples", type=int, default=64, help="held-out samples scored for the model card"
    )


def main(args) -> int:
    import sys

    import torch

    from rcgrpo.pretrain import PretrainConfig, model_card_scores, pretrain, write_model_card

    torch.set_num_threads(args.threads)
    cfg = PretrainConfig(
        seed=args.seed,
        train_samples=args.train_samples,
        vae_steps=args.vae_steps,
        flow_steps=args.flow_steps,
        device=args.device,
    )
    path, facts = pretrain(args.out, cfg)
    command = "rcgrpo " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("rcgrpo") else "rcgrpo pretrain ..."
    scores = model_card_scores(path, cfg, args.eval_samples)
    card = write_model_card(path, cfg, facts, command, scores, args.eval_samples)
    print(card.read_text())
    return 0
