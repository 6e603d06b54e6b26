"""CompBench loaders: the on-disk release layout and the parquet release (docs/METHOD.md section 7).

On disk (the directory `download_from_hf.py` of the CompBench repository writes):

    tasks/{add,remove,replace}/{input_image,edited_image,mask}/<hash>/<idx>/<frame>.png
    tasks/{add,remove,replace}/metadata.json          [{image_path, instruction, caption}, ...]
    tasks/implicit_reasoning/{ori_images,edited_images,masks}/<name>.png
    tasks/implicit_reasoning/implicit_info.jsonl      {image_name, instruction, caption} per line

Only these masked single-edit tasks are loaded; other task folders (action/location/view have no
masks; multi-turn and multi-object editing) are skipped with a warning. Parquet: columns task,
image_path, input_image, edited_image, mask, instruction, caption, images as PNG bytes or as
{"bytes": ...} dicts (the Hugging Face Image feature); rows without a mask are skipped with one
warning per task. A multi-object caption "a|b" stays the sample's caption; meta["captions"] holds
the list.

Both datasets index cheaply on construction (every file's existence is checked then) and decode
images on access, so a full benchmark never sits in memory.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rcgrpo.data.sample import EditSample, load_sample

LOCAL_TASKS = ("add", "remove", "replace")
IMPLICIT_TASK = "implicit_reasoning"
DISK_TASKS = (*LOCAL_TASKS, IMPLICIT_TASK)
PARQUET_COLUMNS = ("task", "image_path", "input_image", "edited_image", "mask", "instruction", "caption")
# Folder names inside tasks/ for each task: (source, target, mask, info file, info key of the image)
_LAYOUT = {
    **{t: ("input_image", "edited_image", "mask", "metadata.json", "image_path") for t in LOCAL_TASKS},
    IMPLICIT_TASK: ("ori_images", "edited_images", "masks", "implicit_info.jsonl", "image_name"),
}
_SKIP_REASONS = {
    "act_loc_view": "the action, location and view tasks have no masks",
    "multi_turn_editing": "multi-turn and multi-object editing are not single masked edits",
}


def _captions(caption: str) -> list[str]:
    return [c.strip() for c in caption.split("|")] if caption else []


def _meta(task: str, image_path: str, caption: str) -> dict:
    """What every CompBench sample records about where it came from (plus its loader's file names)."""
    return {"dataset": "compbench", "task": task, "image_path": image_path, "captions": _captions(caption)}


@dataclass
class _DiskRecord:
    id: str
    task: str
    image_path: str
    source: Path
    target: Path
    mask: Path
    instruction: str
    caption: str


def _read_info(path: Path) -> list[dict]:
    """metadata.json (a JSON list) or a JSONL file, as a list of dicts; errors name the file."""
    try:
        if path.suffix == ".json":
            entries = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(entries, list):
                raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
        else:
            entries = [
                json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from error
    return entries


class CompBenchDataset:
    """CompBench's masked single-edit tasks from the release directory (`tasks/` or its parent)."""

    def __init__(
        self,
        root: str | Path,
        tasks: tuple[str, ...] | list[str] | None = None,
        size: int | tuple[int, int] | None = None,
    ):
        root = Path(root)
        if (root / "tasks").is_dir():
            root = root / "tasks"
        if not root.is_dir():
            raise FileNotFoundError(f"CompBench root {root} is not a directory")
        self.root, self.size = root, size
        for task in tasks or ():
            if task not in DISK_TASKS:
                raise ValueError(f"unknown CompBench task {task!r} (loadable: {', '.join(DISK_TASKS)})")
            if not (root / task).is_dir():
                raise FileNotFoundError(f"CompBench task folder {root / task} not found")
        wanted = tuple(tasks) if tasks else DISK_TASKS
        for folder in sorted(p.name for p in root.iterdir() if p.is_dir()):
            if folder not in DISK_TASKS:
                reason = _SKIP_REASONS.get(folder, "not a CompBench task this loader reads")
                warnings.warn(f"skipping CompBench folder {root / folder}: {reason}", stacklevel=2)
        self.records: list[_DiskRecord] = []
        for task in wanted:
            if (root / task).is_dir():
                self.records += self._index_task(task)
        if not self.records:
            raise ValueError(f"no CompBench samples found under {root} (tasks: {', '.join(wanted)})")

    def _index_task(self, task: str) -> list[_DiskRecord]:
        source_dir, target_dir, mask_dir, info_name, key = _LAYOUT[task]
        folder = self.root / task
        if not (folder / mask_dir).is_dir():
            warnings.warn(
                f"skipping CompBench task folder {folder}: it has no {mask_dir}/ folder", stacklevel=3
            )
            return []
        info_path = folder / info_name
        if not info_path.is_file():
            raise FileNotFoundError(f"CompBench task folder {folder} has no {info_name}")
        records = []
        for number, entry in enumerate(_read_info(info_path)):
            where = f"{info_path} entry {number}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
            missing = [k for k in (key, "instruction", "caption") if k not in entry]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(missing)}")
            name = entry[key]
            paths = [folder / sub / name for sub in (source_dir, target_dir, mask_dir)]
            for path in paths:
                if not path.is_file():
                    raise FileNotFoundError(f"{where}: image file not found: {path}")
            records.append(
                _DiskRecord(
                    f"compbench/{task}/{name}",
                    task,
                    name,
                    *paths,
                    str(entry["instruction"]),
                    str(entry["caption"]),
                )
            )
        return records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EditSample:
        r = self.records[index]
        return load_sample(
            r.id,
            r.source,
            r.mask,
            r.target,
            r.instruction,
            r.caption,
            kind=r.task,
            meta={
                **_meta(r.task, r.image_path, r.caption),
                "source_path": str(r.source),
                "target_path": str(r.target),
                "mask_path": str(r.mask),
            },
            names={"source": str(r.source), "mask": str(r.mask), "target": str(r.target)},
            size=self.size,
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _import_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(
            "reading CompBench parquet files needs pyarrow; install it with `pip install pyarrow`"
        ) from error
    return pq


def _image_bytes(cell, what: str) -> bytes:
    """A parquet image cell as encoded bytes: raw bytes or the HF Image feature's {"bytes": ...}."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if not isinstance(cell, bytes) or not cell:
        raise ValueError(f"{what}: expected PNG bytes or a dict with 'bytes', got {type(cell).__name__}")
    return cell


@dataclass
class _ParquetRecord:
    file: int  # index into CompBenchParquet.files
    row_group: int
    row: int  # within the row group
    id: str
    task: str
    image_path: str
    instruction: str
    caption: str


class CompBenchParquet:
    """CompBench from its parquet release: one file or several (e.g. a directory's *.parquet)."""

    def __init__(
        self,
        paths: str | Path | list[str | Path],
        tasks: tuple[str, ...] | list[str] | None = None,
        size: int | tuple[int, int] | None = None,
    ):
        pq = _import_parquet()
        if isinstance(paths, (str, Path)) and Path(paths).is_dir():
            files = sorted(Path(paths).glob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"no .parquet files in {paths}")
        else:
            files = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self.files, self.size = files, size
        self.records: list[_ParquetRecord] = []
        without_mask: Counter[str] = Counter()
        for file_index, path in enumerate(files):
            if not path.is_file():
                raise FileNotFoundError(f"parquet file not found: {path}")
            try:
                parquet = pq.ParquetFile(path)
            except Exception as error:  # pyarrow raises its own ArrowInvalid and OSError types
                raise ValueError(f"cannot read parquet file {path}: {error}") from error
            missing = [c for c in PARQUET_COLUMNS if c not in parquet.schema_arrow.names]
            if missing:
                raise ValueError(f"parquet file {path} lacks columns {', '.join(missing)}")
            for group in range(parquet.num_row_groups):
                # Index without decoding images: read the text columns and whether a mask is present.
                table = parquet.read_row_group(
                    group, columns=["task", "image_path", "instruction", "caption"]
                )
                masks = parquet.read_row_group(group, columns=["mask"]).column("mask").to_pylist()
                for row, (entry, mask) in enumerate(zip(table.to_pylist(), masks, strict=True)):
                    task = str(entry["task"])
                    if tasks and task not in tasks:
                        continue
                    if mask is None or (isinstance(mask, dict) and mask.get("bytes") is None):
                        without_mask[task] += 1
                        continue
                    self.records.append(
                        _ParquetRecord(
                            file_index,
                            group,
                            row,
                            f"compbench/{task}/{entry['image_path']}",
                            task,
                            str(entry["image_path"]),
                            str(entry["instruction"] or ""),
                            str(entry["caption"] or ""),
                        )
                    )
        for task, count in sorted(without_mask.items()):
            warnings.warn(f"skipping {count} CompBench parquet rows of task {task!r}: no mask", stacklevel=2)
        if tasks:
            found = {r.task for r in self.records}
            absent = [t for t in tasks if t not in found]
            if absent:
                raise ValueError(
                    f"no masked rows of task(s) {', '.join(absent)} in {[str(f) for f in files]}"
                )
        if not self.records:
            raise ValueError(f"no masked CompBench rows in {[str(f) for f in files]}")
        self._cached_group: tuple[tuple[int, int], list[dict]] | None = None

    def _row_images(self, record: _ParquetRecord) -> dict:
        # Samples are usually read in order, so keep the decoded row group of the last access.
        key = (record.file, record.row_group)
        if self._cached_group is None or self._cached_group[0] != key:
            pq = _import_parquet()
            table = pq.ParquetFile(self.files[record.file]).read_row_group(
                record.row_group, columns=["input_image", "edited_image", "mask"]
            )
            self._cached_group = (key, table.to_pylist())
        return self._cached_group[1][record.row]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EditSample:
        r = self.records[index]
        cells = self._row_images(r)
        where = f"{self.files[r.file]} row {r.row} of row group {r.row_group} ({r.task}/{r.image_path})"
        names = {"source": f"{where} input_image", "mask": f"{where} mask", "target": f"{where} edited_image"}
        target = cells["edited_image"]
        return load_sample(
            r.id,
            _image_bytes(cells["input_image"], names["source"]),
            _image_bytes(cells["mask"], names["mask"]),
            None if target is None else _image_bytes(target, names["target"]),
            r.instruction,
            r.caption,
            kind=r.task,
            meta={
                **_meta(r.task, r.image_path, r.caption),
                "parquet": str(self.files[r.file]),
            },
            names=names,
            size=self.size,
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))
