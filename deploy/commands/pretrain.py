"""`rcgrpo pretrain --out DIR`: train the tiny Kontext editor on ShapesEdit (supervised flow matching),
reproducibly from a seed on CPU, and write it with a model card."""

from __future__ import annotations


def add_arguments(parser):
    from rcgrpo.pretrain import PretrainConfig

    defaults = PretrainConfig()
    parser.add_argument("--out", required=True, help="directory to write the editor to")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train-samples", type=int, default=defaults.train_samples)
    parser.add_argument(
        "--vae-from", help="reuse the VAE of this trained editor directory (skips the VAE stage)"
    )
    parser.add_argument(
        "--init-from",
        help="continue training this trained editor directory (its VAE, text encoders and transformer)",
    )
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--flow-steps", type=int, default=defaults.flow_steps)
    parser.add_argument("--flow-learning-rate", type=float, default=defaults.flow_learning_rate)
    parser.add_argument(
        "--flow-cycle-steps",
        type=int,
        default=defaults.flow_cycle_steps,
        help="steps per cosine learning-rate cycle; the editor is saved and scored after each (0: one cycle)",
    )
    parser.add_argument("--edit-loss-weight", type=float, default=defaults.edit_loss_weight)
    parser.add_argument(
        "--sigma-sampling", choices=("uniform", "logit_normal"), default=defaults.sigma_sampling
    )
    parser.add_argument(
        "--train-text-encoders",
        action="store_true",
        help="also train the CLIP and T5 text encoders with the flow loss",
    )
    parser.add_argument(
        "--text-encoder-learning-rate", type=float, default=defaults.text_encoder_learning_rate
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: a second thread only spins on a shared 2-core machine)",
    )
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
        vae_from=args.vae_from,
        init_from=args.init_from,
        vae_steps=args.vae_steps,
        flow_steps=args.flow_steps,
        flow_learning_rate=args.flow_learning_rate,
        flow_cycle_steps=args.flow_cycle_steps,
        edit_loss_weight=args.edit_loss_weight,
        sigma_sampling=args.sigma_sampling,
        train_text_encoders=args.train_text_encoders,
        text_encoder_learning_rate=args.text_encoder_learning_rate,
        device=args.device,
    )
    path, facts = pretrain(args.out, cfg, args.eval_samples)
    command = "rcgrpo " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("rcgrpo") else "rcgrpo pretrain ..."
    scores = model_card_scores(path, cfg, args.eval_samples)
    card = write_model_card(path, cfg, facts, command, scores, args.eval_samples)
    print(card.read_text())
    return 0
