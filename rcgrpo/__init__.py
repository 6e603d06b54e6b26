"""Region-Constrained GRPO for flow-based image editors."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rcgrpo")
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0+unknown"
