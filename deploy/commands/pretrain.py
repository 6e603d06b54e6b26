"""`rcgrpo pretrain --out DIR`: train the tiny Kontext editor on ShapesEdit (supervised flow matching),
reproducibly from a seed on CPU, and write it with a model card."""

from __future__ import annotations

# the PretrainConfig fields a user sets from the command line
FLAGS = [
    "seed",
    "train_samples",
    "vae_from",
    "init_from",
    "vae_steps",
    "flow_steps",
    "flow_seconds",
    "flow_batch_size",
    "flow_learning_rate",
    "flow_cycle_steps",
    "edit_loss_weight",
    "sigma_sampling",
    "train_text_encoders",
    "text_encoder_learning_rate",
    "device",
]


def add_arguments(parser):
    from rcgrpo.pretrain import PretrainConfig
    from services.config import add_section_arguments

    parser.add_argument("--out", required=True, help="directory to write the editor to")
    add_section_arguments(parser, PretrainConfig, FLAGS)
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
    from services.config import load_run_config, section_from_arguments

    cfg = section_from_arguments(PretrainConfig, args, FLAGS)
    torch.set_num_threads(args.threads)
    path, facts = pretrain(args.out, cfg, args.eval_samples)
    # the same words through the CLI (rcgrpo pretrain ...) or the module (python -m deploy.commands.pretrain ...)
    words = sys.argv[2:] if sys.argv[1:2] == ["pretrain"] else sys.argv[1:]
    command = "rcgrpo pretrain " + " ".join(words)
    # the spread is measured at the default run's exploration: what its update will have to select on
    scores = model_card_scores(path, cfg, args.eval_samples, load_run_config().method)
    card = write_model_card(path, cfg, facts, command, scores, args.eval_samples)
    print(card.read_text())
    return 0


# `python -m deploy.commands.pretrain`: without the other commands' dependencies (a GPU machine has no Ray)
if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="rcgrpo pretrain", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
