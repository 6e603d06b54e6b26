"""`rcgrpo train`: the main job. Without arguments: the tiny pretrained editor on ShapesEdit with a
private Redis, a reward server on a loopback port and local Ray."""

from deploy.driver import add_arguments, main  # noqa: F401  (the CLI's subcommand interface)
