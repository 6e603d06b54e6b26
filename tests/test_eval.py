import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from deploy import cli
from rcgrpo import rewards
from rcgrpo.clip_scores import build_tiny_clip, load_clip, to_uint8
from rcgrpo.compbench_metrics import CompBenchMetrics, task_means
from rcgrpo.config import MethodConfig
from rcgrpo.data.shapes import generate_shapes_edit
from rcgrpo.evaluate import evaluate, generate_edits, quantize, sample_seed, save_grid
from rcgrpo.sampler import rollout

# Few Euler steps and a small CompBench resize keep these fast; the official 512 size is checked
# against the official evaluator in test_compbench_metrics.py and changes nothing asserted here.
CFG = MethodConfig(num_steps=2, steps_per_anchor=1)
FAST = ["--num-steps", "2", "--metric-size", "64"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


def _run(monkeypatch, *argv):
    # only this subcommand: other helpers' subcommand modules may not exist yet in this tree
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"eval": cli.SUBCOMMANDS["eval"]})
    return cli.main(["eval", *map(str, argv)])


def test_evaluate_shapes_rows_aggregates_and_files(tiny_editor, clip_dir, tmp_path):
    samples = generate_shapes_edit(2, split="test", seed=0)
    clip = load_clip(clip_dir)
    metrics = CompBenchMetrics(clip, lpips=None, size=64)
    result = evaluate(tiny_editor, samples, CFG, seed=0, compbench=metrics, keep_edits=True)

    # plain deterministic ODE from the sample's own seeded noise
    sample = samples[1]
    cond = tiny_editor.encode_condition(sample.source[None], [sample.instruction], CFG.guidance_scale)
    h, w = tiny_editor.latent_size(64, 64)
    noise = torch.randn(
        1,
        tiny_editor.latent_channels,
        h,
        w,
        generator=torch.Generator().manual_seed(sample_seed(0, sample.id)),
    )
    manual = rollout(tiny_editor, cond, noise, CFG.num_steps).images[0]
    assert torch.equal(result.edits[1], quantize(manual))
    # rolled out together or alone: the same edits up to one 8-bit level of float noise
    batched = generate_edits(tiny_editor, samples, CFG, seed=0, batch_size=2)
    assert all((a - b).abs().max() <= 1 / 255 + 1e-6 for a, b in zip(batched, result.edits, strict=True))

    assert result.metrics == [
        "region_adherence",
        "background_psnr",
        "background_ssim",
        "LC-T",
        "LC-I",
        "PSNR",
        "SSIM",
    ]
    assert result.missing.keys() == {"LPIPS"}
    for row, sample, edit in zip(result.rows, samples, result.edits, strict=True):
        assert row["id"] == sample.id and row["task"] == sample.kind
        args = (edit[None], sample.source[None], sample.mask[None])
        assert row["background_psnr"] == rewards.background_psnr(*args).item()
        assert row["background_ssim"] == rewards.background_ssim(*args).item()
        expected = rewards.region_adherence(edit[None], sample.target[None], sample.mask[None]).item()
        assert row["region_adherence"] == expected
        (bench,) = metrics.score([sample.source], [edit], [sample.mask], [sample.target], [sample.caption])
        assert {m: row[m] for m in bench} == bench
    for metric in result.metrics:
        assert result.overall[metric] == pytest.approx(np.mean([r[metric] for r in result.rows]), rel=1e-12)
    assert result.tasks == task_means(result.rows, result.metrics)
    assert result.groups == {}  # CompBench's groups only for CompBench data

    saved = json.loads(result.write_json(tmp_path / "metrics.json").read_text())
    assert saved["num_samples"] == 2 and saved["overall"] == pytest.approx(result.overall)
    assert saved["missing"]["LPIPS"] == result.missing["LPIPS"]
    with result.write_csv(tmp_path / "samples.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == [s.id for s in samples]
    for parsed, row in zip(table, result.rows, strict=True):
        assert {m: float(parsed[m]) for m in result.metrics} == {m: row[m] for m in result.metrics}

    grid = np.asarray(Image.open(save_grid(tmp_path / "grid.png", samples, result.edits, max_rows=2)))
    assert grid.shape == (2 * 64, 3 * 64, 3)
    for col, image in enumerate((samples[1].source, result.edits[1], samples[1].target)):
        assert np.array_equal(grid[64:, col * 64 : (col + 1) * 64], to_uint8(image))
    assert "overall" in result.table() and "LPIPS: missing" in result.table()


def test_cli_eval_on_shapes_writes_consistent_outputs(
    tiny_editor_dir, clip_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    rc = _run(
        monkeypatch,
        "--editor",
        tiny_editor_dir,
        "--data",
        "shapes",
        "--limit",
        2,
        "--clip",
        clip_dir,
        "--out",
        out,
        *FAST,
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "LC-T" in printed and "region_adherence" in printed
    summary = json.loads((out / "metrics.json").read_text())
    with (out / "samples.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["num_samples"] == 2
    for metric in summary["metrics"]:
        assert summary["overall"][metric] == pytest.approx(
            np.mean([float(r[metric]) for r in rows]), rel=1e-9
        )
    assert Image.open(out / "grid.png").size == (3 * 64, 2 * 64)


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _fake_compbench(root):
    """A CompBench release tree with two local tasks and implicit reasoning, 44x52 pictures."""
    rng = np.random.default_rng(0)
    tasks = root / "tasks"

    def pictures():
        source = rng.integers(0, 256, (44, 52, 3), dtype=np.uint8)
        target = rng.integers(0, 256, (44, 52, 3), dtype=np.uint8)
        mask = np.zeros((44, 52), dtype=np.uint8)
        top, left = rng.integers(2, 20), rng.integers(2, 25)
        mask[top : top + 15, left : left + 20] = 255
        return source, target, mask

    for task, caption in (("add", "a red circle"), ("remove", "background")):
        entries = []
        for k in range(2):
            name = f"hash{k}/0/{k}.png"
            source, target, mask = pictures()
            _write_png(tasks / task / "input_image" / name, source)
            _write_png(tasks / task / "edited_image" / name, target)
            _write_png(tasks / task / "mask" / name, mask)
            entries.append({"image_path": name, "instruction": f"{task} the thing", "caption": caption})
        (tasks / task / "metadata.json").write_text(json.dumps(entries))
    source, target, mask = pictures()
    implicit = tasks / "implicit_reasoning"
    _write_png(implicit / "ori_images" / "scene.png", source)
    _write_png(implicit / "edited_images" / "scene.png", target)
    _write_png(implicit / "masks" / "scene.png", mask)
    line = {"image_name": "scene.png", "instruction": "make it evening", "caption": "a lamp"}
    (implicit / "implicit_info.jsonl").write_text(json.dumps(line) + "\n")
    return root


def test_results_layout_round_trip_gives_identical_metrics(tiny_editor_dir, clip_dir, tmp_path, monkeypatch):
    data = f"compbench:{_fake_compbench(tmp_path / 'bench')}"
    results = tmp_path / "editing_results"
    rc = _run(
        monkeypatch,
        "--editor",
        tiny_editor_dir,
        "--data",
        data,
        "--clip",
        clip_dir,
        "--out",
        tmp_path / "ran",
        "--results-layout",
        results,
        "--model",
        "tiny",
        *FAST,
    )
    assert rc == 0
    # where CompBench's eval_all.py looks for them, at the source's size
    for path in (
        "tiny_local/add/hash0/0/0.png",
        "tiny_local/remove/hash1/0/1.png",
        "tiny_implicit/scene.png",
    ):
        assert Image.open(results / "tiny" / path).size == (52, 44)
    rc = _run(
        monkeypatch,
        "--edits",
        results,
        "--model",
        "tiny",
        "--data",
        data,
        "--clip",
        clip_dir,
        "--out",
        tmp_path / "rescored",
        "--metric-size",
        "64",
    )
    assert rc == 0
    for name in ("metrics.json", "samples.csv"):
        assert (tmp_path / "ran" / name).read_text() == (tmp_path / "rescored" / name).read_text()
    summary = json.loads((tmp_path / "ran" / "metrics.json").read_text())
    assert summary["num_samples"] == 5
    assert set(summary["tasks"]) == {"add", "remove", "implicit_reasoning"}
    local = summary["groups"]["Local Editing"]
    assert local["tasks"] == 2
    assert local["PSNR"] == round(
        (summary["tasks"]["add"]["PSNR"] + summary["tasks"]["remove"]["PSNR"]) / 2, 3
    )
    assert not math.isnan(summary["groups"]["Implicit Reasoning"]["LC-I"])


def test_bad_data_spec_is_a_cli_error_naming_the_field(tiny_editor_dir, tmp_path, monkeypatch, capsys):
    for spec, words in (("imagenet:/x", "unknown dataset 'imagenet'"), ("compbench", "needs a path")):
        rc = _run(monkeypatch, "--editor", tiny_editor_dir, "--data", spec, "--out", tmp_path)
        err = capsys.readouterr().err
        assert rc == 2 and "--data" in err and words in err
    rc = _run(monkeypatch, "--edits", tmp_path, "--data", "shapes", "--out", tmp_path)
    assert rc == 2 and "--model" in capsys.readouterr().err


def test_cli_group_spread_reports_what_the_update_could_select_per_kind(tmp_path, monkeypatch, capsys):
    from rcgrpo.config import MethodConfig
    from rcgrpo.editor import load_editor
    from rcgrpo.evaluate import within_group_spread
    from rcgrpo.tiny_editor import SHIPPED_EDITOR_DIR

    out = tmp_path / "out"
    argv = [
        "--data",
        "shapes",
        "--limit",
        4,
        "--out",
        out,
        "--group-spread",
        "--group-size",
        3,
        "--s-in",
        1.0,
    ]
    assert _run(monkeypatch, *argv, *FAST) == 0
    printed = capsys.readouterr().out
    assert "RDP groups, G = 3, s_in = 1.0, s_out = 0.0" in printed and "groups with a success" in printed
    spread = json.loads((out / "group_spread.json").read_text())
    # the shipped editor and the same groups as the library call: same seed, same group noise
    cfg = MethodConfig(num_steps=2, steps_per_anchor=2, group_size=3, anchors=3, s_in=1.0)
    expected = within_group_spread(
        load_editor(SHIPPED_EDITOR_DIR, device="cpu"), generate_shapes_edit(4, split="test", seed=0), cfg
    )
    assert spread.keys() == expected.keys()
    for task, row in spread.items():
        assert row == pytest.approx(expected[task]), task
    assert sum(row["groups"] for row in spread.values()) == 4
    rc = _run(monkeypatch, "--edits", tmp_path, "--model", "m", "--data", "shapes", "--group-spread")
    assert rc == 2 and "--group-spread: only with --editor" in capsys.readouterr().err
