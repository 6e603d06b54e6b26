"""The samples a data spec names: `shapes` (generated), `compbench:PATH` or `jsonl:PATH` (read)."""

from __future__ import annotations

from pathlib import Path

from rcgrpo.data.sample import EditSample

DATA_SPECS = "shapes, compbench:PATH or jsonl:PATH"
DEFAULT_SHAPES_SAMPLES = 64


def parse_data_spec(spec: str) -> tuple[str, Path | None]:
    """ "shapes" | "compbench:PATH" | "jsonl:PATH" -> (dataset, path); ValueError naming --data otherwise."""
    name, _, path = spec.partition(":")
    if name == "shapes":
        if path:
            raise ValueError(f"--data: 'shapes' takes no path (got {spec!r})")
        return name, None
    if name in ("compbench", "jsonl"):
        if not path:
            raise ValueError(f"--data: {name!r} needs a path, as in {name}:PATH (got {spec!r})")
        if not Path(path).exists():
            raise FileNotFoundError(f"--data: {name} path {path!r} does not exist")
        return name, Path(path)
    raise ValueError(f"--data: unknown dataset {name!r} in {spec!r}; expected {DATA_SPECS}")


def load_samples(spec: str, split: str = "test", limit: int | None = None, seed: int = 0) -> list[EditSample]:
    """The samples a --data spec names: the first `limit` of them (ShapesEdit: `limit` generated, default 64)."""
    name, path = parse_data_spec(spec)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1 (got {limit})")
    if name == "shapes":
        from rcgrpo.data.shapes import generate_shapes_edit

        return generate_shapes_edit(limit or DEFAULT_SHAPES_SAMPLES, split=split, seed=seed)
    if name == "compbench":
        from rcgrpo.data.compbench import CompBenchDataset, CompBenchParquet

        is_parquet = path.suffix == ".parquet" or (
            path.is_dir() and not (path / "tasks").is_dir() and any(path.glob("*.parquet"))
        )
        dataset = CompBenchParquet(path) if is_parquet else CompBenchDataset(path)
    else:
        from rcgrpo.data.manifest import ManifestDataset

        dataset = ManifestDataset(path)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return [dataset[i] for i in range(count)]
