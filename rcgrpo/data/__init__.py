"""Editing datasets: the EditSample record, the synthetic ShapesEdit generator, CompBench loaders
and a JSONL manifest for a user's own data."""

from rcgrpo.data.compbench import CompBenchDataset, CompBenchParquet
from rcgrpo.data.manifest import ManifestDataset
from rcgrpo.data.sample import EditSample
from rcgrpo.data.shapes import ShapesEditConfig, generate_shapes_edit

__all__ = [
    "CompBenchDataset",
    "CompBenchParquet",
    "EditSample",
    "ManifestDataset",
    "ShapesEditConfig",
    "generate_shapes_edit",
]
