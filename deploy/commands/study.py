"""`rcgrpo study`: every variant of a study config trained at equal compute over several seeds, scored
on one held-out set, and reported as one self-contained HTML file, PNG figures and study.json."""

from study.harness import add_arguments, main  # noqa: F401  (the CLI's subcommand interface)
