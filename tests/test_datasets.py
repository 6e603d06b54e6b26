import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rcgrpo.data import CompBenchDataset, CompBenchParquet, ManifestDataset

W, H = 8, 6  # every fake image is 8 wide, 6 high


def _rgb(value: int) -> np.ndarray:
    image = np.full((H, W, 3), value, dtype=np.uint8)
    image[0, 0] = (255, 0, 51)  # one distinct pixel to check orientation and channel order
    return image


def _mask() -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[1:3, 2:5] = 255
    mask[4, 4] = 200  # >= 0.5 after /255: in
    mask[5, 5] = 100  # < 0.5: out
    return mask


EXPECTED_MASK = torch.from_numpy((_mask() >= 128).astype(np.float32))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(array))


def _local_task(root, task, names, value):
    for name in names:
        _write(root / task / "input_image" / name, _rgb(value))
        _write(root / task / "edited_image" / name, _rgb(value + 10))
        _write(root / task / "mask" / name, _mask())
    metadata = [
        {"image_path": n, "instruction": f"{task} thing {i}", "caption": f"a thing {i}"}
        for i, n in enumerate(names)
    ]
    (root / task / "metadata.json").write_text(json.dumps(metadata))


@pytest.fixture
def compbench_tree(tmp_path):
    root = tmp_path / "CompBench" / "tasks"
    _local_task(root, "add", ["001ca3cb/0/00003.png", "001ca3cb/1/00007.png"], 51)
    _local_task(root, "remove", ["0a0b0c0d/0/00001.png"], 102)
    _local_task(root, "replace", ["ffeeddcc/2/00010.png"], 153)
    implicit = root / "implicit_reasoning"
    _write(implicit / "ori_images" / "02b72b8d_2_00016.png", _rgb(204))
    _write(implicit / "edited_images" / "02b72b8d_2_00016.png", _rgb(214))
    _write(implicit / "masks" / "02b72b8d_2_00016.png", _mask())
    (implicit / "implicit_info.jsonl").write_text(
        json.dumps(
            {"image_name": "02b72b8d_2_00016.png", "instruction": "make it ripe", "caption": "a ripe banana"}
        )
        + "\n"
    )
    # A mask-less task folder, as in the release.
    _write(root / "act_loc_view" / "action" / "ori_images" / "00000.png", _rgb(0))
    (root / "act_loc_view" / "action" / "masks").mkdir(parents=True)
    return root


# -- CompBench on disk -----------------------------------------------------------------------------


def test_compbench_disk_layout(compbench_tree):
    with pytest.warns(UserWarning, match=r"act_loc_view: the action, location and view tasks have no masks"):
        data = CompBenchDataset(compbench_tree.parent)  # the parent of tasks/ works too
    assert len(data) == 5
    samples = list(data)
    assert [s.kind for s in samples] == ["add", "add", "remove", "replace", "implicit_reasoning"]
    first = samples[0]
    assert first.id == "compbench/add/001ca3cb/0/00003.png"
    assert first.instruction == "add thing 0" and first.caption == "a thing 0"
    assert first.source.shape == (3, H, W) and first.mask.shape == (H, W)
    assert first.source[:, 1, 1].tolist() == pytest.approx([0.2, 0.2, 0.2])
    assert first.source[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert first.target[:, 1, 1].tolist() == pytest.approx([61 / 255] * 3)
    assert torch.equal(first.mask, EXPECTED_MASK)
    assert first.meta["captions"] == ["a thing 0"] and first.meta["task"] == "add"
    implicit = samples[-1]
    assert implicit.id == "compbench/implicit_reasoning/02b72b8d_2_00016.png"
    assert implicit.caption == "a ripe banana" and implicit.source[0, 3, 3].item() == pytest.approx(0.8)


def test_compbench_task_selection_and_resize(compbench_tree):
    with pytest.warns(UserWarning):
        data = CompBenchDataset(compbench_tree, tasks=["remove"], size=4)
    (sample,) = list(data)
    assert sample.kind == "remove" and sample.source.shape == (3, 4, 4) and sample.target.shape == (3, 4, 4)
    assert set(sample.mask.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="unknown CompBench task 'action'"):
        CompBenchDataset(compbench_tree, tasks=["action"])
    (compbench_tree / "replace" / "metadata.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match=r"replace has no metadata.json"):
        CompBenchDataset(compbench_tree)


def test_compbench_maskless_task_folder_is_skipped(compbench_tree):
    import shutil

    shutil.rmtree(compbench_tree / "remove" / "mask")
    with pytest.warns(UserWarning) as caught:
        data = CompBenchDataset(compbench_tree)
    messages = [str(w.message) for w in caught]
    assert any(m.endswith("remove: it has no mask/ folder") for m in messages), messages
    assert [r.task for r in data.records] == ["add", "add", "replace", "implicit_reasoning"]


def test_compbench_bad_files_are_named(compbench_tree):
    missing = compbench_tree / "add" / "mask" / "001ca3cb" / "1" / "00007.png"
    missing.unlink()
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match=str(missing)):
        CompBenchDataset(compbench_tree)
    _write(missing, np.zeros((H + 1, W), dtype=np.uint8))  # wrong size
    with pytest.warns(UserWarning):
        data = CompBenchDataset(compbench_tree)
    with pytest.raises(ValueError, match=rf"mask {missing} is 8x7 but source .*00007.png is 8x6"):
        data[1]
    broken = compbench_tree / "remove" / "input_image" / "0a0b0c0d" / "0" / "00001.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=rf"cannot read image {broken}"):
        data[2]


# -- CompBench parquet -----------------------------------------------------------------------------


def _parquet(path, rows, row_group_size=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("task", pa.string()),
            ("image_path", pa.string()),
            ("input_image", image),
            ("edited_image", image),
            ("mask", image),
            ("instruction", pa.string()),
            ("caption", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)


def _row(task, name, value, mask=True, caption="a red apple"):
    return {
        "task": task,
        "image_path": name,
        "input_image": {"bytes": _png(_rgb(value)), "path": None},
        "edited_image": {"bytes": _png(_rgb(value + 5)), "path": None},
        "mask": {"bytes": _png(_mask()), "path": None} if mask else None,
        "instruction": f"{task} it",
        "caption": caption,
    }


def test_compbench_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    rows = [
        _row("add", "aa/0/1.png", 10),
        _row("action", "00000.png", 20, mask=False),
        _row("replace", "bb/0/2.png", 30),
        _row("multi_object_add", "cc_00002.png", 40, caption="a cat|a dog"),
        _row("action", "00001.png", 50, mask=False),
    ]
    _parquet(tmp_path / "train-0.parquet", rows)
    with pytest.warns(UserWarning, match=r"skipping 2 CompBench parquet rows of task 'action': no mask"):
        data = CompBenchParquet(tmp_path)  # a directory of parquet files
    assert [s.id for s in data] == [
        "compbench/add/aa/0/1.png",
        "compbench/replace/bb/0/2.png",
        "compbench/multi_object_add/cc_00002.png",
    ]
    multi = data[2]  # third row group
    assert multi.caption == "a cat|a dog" and multi.meta["captions"] == ["a cat", "a dog"]
    assert multi.source[1, 2, 2].item() == pytest.approx(40 / 255)
    assert multi.target[1, 2, 2].item() == pytest.approx(45 / 255)
    assert torch.equal(multi.mask, EXPECTED_MASK)
    assert data[0].source[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])  # back to an earlier group


def test_compbench_parquet_plain_bytes_and_task_filter(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    row = _row("remove", "dd/1/3.png", 60)
    plain = {k: (v["bytes"] if isinstance(v, dict) else v) for k, v in row.items()}
    pq.write_table(pa.Table.from_pylist([plain, {**plain, "task": "add"}]), tmp_path / "plain.parquet")
    data = CompBenchParquet(tmp_path / "plain.parquet", tasks=["remove"], size=(3, 4))
    (sample,) = list(data)
    assert sample.kind == "remove" and sample.source.shape == (3, 3, 4) and sample.mask.shape == (3, 4)
    with pytest.raises(ValueError, match=r"no masked rows of task\(s\) replace"):
        CompBenchParquet(tmp_path / "plain.parquet", tasks=["replace"])


def test_compbench_parquet_errors(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"task": ["add"], "image_path": ["x.png"]}), tmp_path / "thin.parquet")
    with pytest.raises(ValueError, match=r"thin.parquet lacks columns input_image, edited_image, mask"):
        CompBenchParquet(tmp_path / "thin.parquet")
    with pytest.raises(FileNotFoundError, match="parquet file not found: .*nope.parquet"):
        CompBenchParquet([tmp_path / "nope.parquet"])
    bad = _row("add", "aa/0/1.png", 10)
    bad["mask"] = {"bytes": b"garbage", "path": None}
    _parquet(tmp_path / "bad.parquet", [bad])
    data = CompBenchParquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"cannot read image .*bad.parquet row 0 .*\(add/aa/0/1.png\) mask"):
        data[0]
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        CompBenchParquet(tmp_path / "bad.parquet")


# -- manifest --------------------------------------------------------------------------------------


def _manifest_files(tmp_path):
    _write(tmp_path / "images" / "a.png", _rgb(51))
    _write(tmp_path / "masks" / "a.png", _mask())
    _write(tmp_path / "edited" / "a.png", _rgb(102))


def test_manifest(tmp_path):
    _manifest_files(tmp_path)
    lines = [
        {
            "source": "images/a.png",
            "mask": "masks/a.png",
            "instruction": "make it red",
            "caption": "a red box",
        },
        {
            "source": "images/a.png",
            "mask": "masks/a.png",
            "target": "edited/a.png",
            "instruction": "remove it",
            "caption": "background",
            "id": "mine",
            "kind": "remove",
            "meta": {"note": 1},
        },
    ]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("# my edits\n" + "\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = ManifestDataset(manifest)
    first, second = list(data)
    assert first.id == "data:2" and first.target is None and first.kind == ""
    assert first.source[:, 3, 3].tolist() == pytest.approx([0.2] * 3) and torch.equal(
        first.mask, EXPECTED_MASK
    )
    assert second.id == "mine" and second.kind == "remove" and second.meta["note"] == 1
    assert second.target[:, 3, 3].tolist() == pytest.approx([0.4] * 3)
    assert second.meta["line"] == 3 and second.meta["target_path"] == str(tmp_path / "edited" / "a.png")


@pytest.mark.parametrize(
    "entry, error, message",
    [
        (
            {"source": "images/a.png", "mask": "masks/a.png", "instruction": "x"},
            ValueError,
            r"data.jsonl:1: missing required key\(s\) caption",
        ),
        (
            {
                "source": "images/a.png",
                "mask": "masks/a.png",
                "instruction": "x",
                "caption": "y",
                "taget": "e.png",
            },
            ValueError,
            r"data.jsonl:1: unknown key\(s\) taget",
        ),
        (
            {"source": "images/b.png", "mask": "masks/a.png", "instruction": "x", "caption": "y"},
            FileNotFoundError,
            r"data.jsonl:1: source image file not found: .*images/b.png",
        ),
        ("{not json", ValueError, r"data.jsonl:1: invalid JSON"),
    ],
)
def test_manifest_errors(tmp_path, entry, error, message):
    _manifest_files(tmp_path)
    manifest = tmp_path / "data.jsonl"
    manifest.write_text(entry if isinstance(entry, str) else json.dumps(entry))
    with pytest.raises(error, match=message):
        ManifestDataset(manifest)


def test_manifest_duplicate_ids_and_mask_size(tmp_path):
    _manifest_files(tmp_path)
    entry = {
        "source": "images/a.png",
        "mask": "masks/a.png",
        "instruction": "x",
        "caption": "y",
        "id": "same",
    }
    manifest = tmp_path / "data.jsonl"
    manifest.write_text(json.dumps(entry) + "\n" + json.dumps(entry))
    with pytest.raises(ValueError, match=r"data.jsonl:2: duplicate id 'same' \(first on line 1\)"):
        ManifestDataset(manifest)
    _write(tmp_path / "masks" / "small.png", np.zeros((3, 3), dtype=np.uint8))
    manifest.write_text(json.dumps({**entry, "mask": "masks/small.png"}))
    data = ManifestDataset(manifest)
    with pytest.raises(ValueError, match=r"mask .*small.png is 3x3 but source .*a.png is 8x6"):
        data[0]
