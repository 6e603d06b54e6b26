"""A JSONL manifest for a user's own editing data.

One JSON object per line:

    {"source": "images/0001.png", "mask": "masks/0001.png", "instruction": "make the car red",
     "caption": "a red car", "target": "edited/0001.png", "id": "car-1", "kind": "recolour",
     "meta": {...}}

source, mask, instruction and caption are required; target, id, kind and meta are optional. Paths
are relative to the manifest's directory (absolute paths work too). Masks are greyscale images,
white = region to edit, of the source's pixel size. Blank lines and lines starting with "#" are
ignored. Any other key is an error (it is most likely a misspelt one).
"""

from __future__ import annotations

import json
from pathlib import Path

from rcgrpo.data.sample import EditSample, load_sample

REQUIRED_KEYS = ("source", "mask", "instruction", "caption")
OPTIONAL_KEYS = ("target", "id", "kind", "meta")


class ManifestDataset:
    """EditSamples listed in a JSONL manifest; every referenced file is checked on construction,
    images are decoded on access."""

    def __init__(self, path: str | Path, size: int | tuple[int, int] | None = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        self.path, self.size = path, size
        self.entries: list[dict] = []
        seen: dict[str, int] = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error})") from error
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
            missing = [k for k in REQUIRED_KEYS if k not in entry]
            if missing:
                raise ValueError(f"{where}: missing required key(s) {', '.join(missing)}")
            unknown = sorted(set(entry) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
            if unknown:
                raise ValueError(
                    f"{where}: unknown key(s) {', '.join(unknown)} "
                    f"(allowed: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)})"
                )
            if not isinstance(entry.get("meta", {}), dict):
                raise ValueError(f"{where}: meta must be a JSON object")
            files = {}
            for key in ("source", "mask", "target"):
                if entry.get(key) is None:
                    continue
                file = path.parent / entry[key]
                if not file.is_file():
                    raise FileNotFoundError(f"{where}: {key} image file not found: {file}")
                files[key] = file
            sample_id = str(entry.get("id", f"{path.stem}:{number}"))
            if sample_id in seen:
                raise ValueError(f"{where}: duplicate id {sample_id!r} (first on line {seen[sample_id]})")
            seen[sample_id] = number
            self.entries.append(
                {
                    "id": sample_id,
                    "files": files,
                    "instruction": str(entry["instruction"]),
                    "caption": str(entry["caption"]),
                    "kind": str(entry.get("kind", "")),
                    "meta": {**entry.get("meta", {}), "manifest": str(path), "line": number},
                }
            )
        if not self.entries:
            raise ValueError(f"manifest {path} lists no samples")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> EditSample:
        e = self.entries[index]
        files = e["files"]
        return load_sample(
            e["id"],
            files["source"],
            files["mask"],
            files.get("target"),
            e["instruction"],
            e["caption"],
            kind=e["kind"],
            meta={**e["meta"], **{f"{k}_path": str(v) for k, v in files.items()}},
            names={k: str(v) for k, v in files.items()},
            size=self.size,
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))
