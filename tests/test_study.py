"""`rcgrpo study`: the study config's checks, the statistics on known numbers, and `--quick` for real
(two variants trained through the driver, every checkpoint scored, the report rendered in headless
Chromium)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from services.schemas import ID_PATTERN
from study import analysis
from study.harness import DEFAULT_STUDY_CONFIG, load_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (1400, 2400)


def study_file(tmp_path: Path, **changes) -> Path:
    """The shipped study config with `changes`, its base config path made absolute."""
    raw = yaml.safe_load(DEFAULT_STUDY_CONFIG.read_text())
    raw["base"] = str(DEFAULT_STUDY_CONFIG.parent / raw["base"])
    raw.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# -- the study config ------------------------------------------------------------------------------


def test_the_shipped_study_expands_every_variant_at_one_rollout_budget(tmp_path):
    study = load_study(DEFAULT_STUDY_CONFIG, out=tmp_path, sweeps=True)
    names = [v.name for v in study.variants]
    assert names[:8] == [
        "neighbor-grpo",
        "neighbor-grpo/no-anchor",
        "rdp",
        "rdp/no-anchor",
        "rdp+mask",
        "rdp+mask/no-anchor",
        "rc-grpo",
        "rc-grpo/no-anchor",
    ]
    assert "rc-grpo group_size=4,groups_per_step=4" in names and "rc-grpo s_in=1.0" in names
    neighbor = study.run_config(study.variants[0], seed=2)
    assert (neighbor.method.rdp, neighbor.method.mask_aware, neighbor.method.acd_weight) == (False, False, 0)
    assert neighbor.name == "neighbor-grpo-s2" and neighbor.runs_dir == tmp_path / "runs"
    base = study.eval_config()
    assert (neighbor.data.seed, neighbor.learner.seed) == (base.data.seed + 2, base.learner.seed + 2)
    assert neighbor.learner.checkpoint_every == study.eval_every and neighbor.eval.num_samples == 0
    assert study.run_config(study.variants[1], 0).method.background_anchor == 0
    slugs = [v.slug for v in study.variants]
    assert len(set(slugs)) == len(slugs) and all(re.fullmatch(ID_PATTERN, f"{s}-s0") for s in slugs)
    quick = load_study(DEFAULT_STUDY_CONFIG, out=tmp_path, quick=True, sweeps=True)
    assert [v.name for v in quick.variants] == ["neighbor-grpo", "rc-grpo"]  # never sweeps with --quick
    assert quick.run_config(quick.variants[0], 0).method.group_size == 4
    shorter = load_study(DEFAULT_STUDY_CONFIG, out=tmp_path, steps=30, eval_every=10)
    ran = shorter.run_config(shorter.variants[0], 0)
    assert (ran.learner.total_steps, ran.learner.checkpoint_every) == (30, 10)


def test_study_configs_that_cannot_compare_are_refused_before_any_run(tmp_path):
    two = {"neighbor-grpo": ["method.rdp=false"], "rc-grpo": []}
    assert len(load_study(study_file(tmp_path, variants=two, factors={}), out=tmp_path).variants) == 2
    twice = study_file(tmp_path, variants={**two, "rdp": ["method.rdp=true"]}, factors={})
    with pytest.raises(ValueError, match="variants 'rc-grpo' and 'rdp' are the same run"):
        load_study(twice, out=tmp_path)  # the base already has rdp=true
    budget = study_file(
        tmp_path,
        variants={"neighbor-grpo": ["method.rdp=false"], "rc-grpo": ["method.group_size=4"]},
        factors={},
    )
    with pytest.raises(ValueError, match="same rollout budget.*groups_per_step"):
        load_study(budget, out=tmp_path)
    clash = study_file(
        tmp_path, variants={**two, "rdp+mask": ["method.s_in=0.5"], "rdp-mask": ["method.s_in=0.4"]}
    )
    with pytest.raises(ValueError, match="'rdp\\+mask' and 'rdp-mask' have the same run name"):
        load_study(clash, out=tmp_path)
    bad_field = study_file(tmp_path, variants={"neighbor-grpo": ["method.rpd=false"], "rc-grpo": []})
    with pytest.raises(ValueError, match="variant 'neighbor-grpo' .*rpd"):
        load_study(bad_field, out=tmp_path)
    with pytest.raises(ValueError, match="baseline: 'nope' is not one of the variants"):
        load_study(study_file(tmp_path, baseline="nope"), out=tmp_path)
    with pytest.raises(ValueError, match="--only: \\['nope'\\]"):
        load_study(DEFAULT_STUDY_CONFIG, out=tmp_path, only=["nope"])


# -- the statistics ----------------------------------------------------------------------------------


def test_outcome_is_the_paired_mean_change_with_an_interval_and_steps_to_target():
    ids = [f"s{i}" for i in range(40)]
    rng = np.random.default_rng(1)
    base_rows = [
        {"id": i, "task": "t", "region_adherence": 0.1, "background_psnr": 30.0, "background_ssim": 0.9}
        for i in ids
    ]

    def run(variant, seed, adherence_by_step, psnr_change):
        scored = {
            str(step): [
                {
                    **row,
                    "region_adherence": row["region_adherence"] + gain + rng.normal(0, 0.01),
                    "background_psnr": row["background_psnr"] + psnr_change,
                }
                for row in base_rows
            ]
            for step, gain in adherence_by_step.items()
        }
        return {"variant": variant, "seed": seed, "base_rows": base_rows, "scored": scored}

    # the baseline gains 0.1 by step 40; the method more than that by step 20 at the same PSNR
    runs = [run("baseline", s, {20: 0.05, 40: 0.1}, 0.0) for s in range(3)]
    runs += [run("method", s, {20: 0.12, 40: 0.15}, 0.0) for s in range(3)]
    runs += [run("blurry", s, {20: 0.2, 40: 0.3}, -1.0) for s in range(3)]  # adherence at the cost of PSNR
    measured = analysis.outcome(runs, ["baseline", "method", "blurry"], seeds=3, bootstrap=500, ids=ids)
    curve = measured["curves"]["method"]
    assert curve["steps"] == [0, 20, 40]
    assert curve["region_adherence"]["mean"][0] == 0
    assert curve["region_adherence"]["mean"][1] == pytest.approx(0.12, abs=0.005)
    expected = np.mean(
        [
            r["scored"]["40"][i]["region_adherence"] - 0.1
            for r in runs
            if r["variant"] == "method"
            for i in range(40)
        ]
    )
    assert curve["region_adherence"]["mean"][2] == pytest.approx(expected, abs=1e-12)
    low, high = curve["region_adherence"]["low"][2], curve["region_adherence"]["high"][2]
    assert low < expected < high and high - low < 0.01  # 120 paired changes of s.d. 0.01
    reach = analysis.steps_to_target(measured["curves"], measured["boot"], "baseline", total_steps=40)
    assert reach["variants"]["baseline"]["steps"] == 40
    at_step_20 = {
        "steps": 20,
        "fraction_of_steps": 0.5,
        "low": 20,
        "high": 20,
        "reached_share": 1.0,
        "goal_share": 1.0,
    }
    method = reach["variants"]["method"]
    assert {k: method[k] for k in at_step_20} == pytest.approx(at_step_20)
    assert method["adherence_only"] == pytest.approx(at_step_20)
    assert method["psnr_vs_baseline"] == pytest.approx({"change": 0.0, "at_least_share": 1.0})
    assert reach["variants"]["baseline"]["goal_share"] == 0  # its own final step: never within half
    blurry = reach["variants"]["blurry"]
    assert blurry["steps"] is None  # never at equal or better background PSNR ...
    assert blurry["adherence_only"] == pytest.approx(at_step_20)  # ... though its adherence gets there
    assert blurry["psnr_vs_baseline"] == pytest.approx({"change": -1.0, "at_least_share": 0.0})
    verdict = analysis.goals(reach, {"blurry": {"background_std_ratio": {"background_psnr": 0.1}}}, "blurry")
    assert verdict["steps_to_target"]["met"] and not verdict["background_psnr"]["met"]
    assert verdict["background_std"]["met"]


# -- --quick for real ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    from deploy.cli import main

    out = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("RCGRPO_REWARD_URL", "RAY_ADDRESS", "REDIS_URL"):
            patch.delenv(variable, raising=False)  # the study's own Redis, Ray and reward servers
        assert main(["study", "--quick", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_quick_study_trains_every_variant_and_reports_every_number(quick_study):
    numbers = json.loads((quick_study / "study.json").read_text())
    assert list(numbers["final"]) == ["neighbor-grpo", "rc-grpo"]
    runs = numbers["runs"]
    # equal steps, equal rollout budget, the same tasks fed
    assert [r["summary"]["steps"] for r in runs] == [2, 2]
    assert len({r["rollout_budget"] for r in runs}) == 1 and len({r["tasks_fed"] for r in runs}) == 1
    base = json.loads(Path(runs[0]["base"]).read_text())["rows"]
    assert len(base) == 4 and runs[0]["base"] == runs[1]["base"]  # one base score for both
    for run in runs:
        scored = json.loads((Path(run["run_dir"]) / "study_eval.json").read_text())["rows"]
        assert sorted(scored) == ["1", "2"]
        curve = numbers["curves"][run["variant"]]
        for metric in ("region_adherence", "background_psnr", "background_ssim"):
            change = np.mean([t[metric] - b[metric] for b, t in zip(base, scored["2"], strict=True)])
            assert curve[metric]["mean"] == [
                0.0,
                pytest.approx(curve[metric]["mean"][1]),
                pytest.approx(change),
            ]
            final = numbers["final"][run["variant"]][metric]
            assert final["low"] <= final["change"] <= final["high"]
    mechanism = numbers["mechanism"]
    for variant, measures in mechanism.items():
        assert measures["steps"] == 2 and measures["all"]["groups"] == 2
        assert set(measures["all"]["term_std"]) == {
            "region_adherence",
            "background_psnr",
            "background_ssim",
            "acd",
        }
        assert all(math.isfinite(measures["all"][k]) for k in ("policy_entropy", "ratio_deviation_p90"))
        assert measures["tasks"], variant  # per task kind
    # global noise spreads the background across the group; RDP with s_out = 0 barely does
    ratio = mechanism["rc-grpo"]["background_std_ratio"]["background_psnr"]
    psnr_std = {v: mechanism[v]["all"]["term_std"]["background_psnr"] for v in mechanism}
    assert ratio == pytest.approx(psnr_std["rc-grpo"] / psnr_std["neighbor-grpo"]) and ratio < 1
    assert numbers["goals"]["background_std"]["measured"]["background_psnr"] == ratio
    steps_goal = numbers["goals"]["steps_to_target"]
    reach = numbers["steps_to_target"]["variants"]["rc-grpo"]
    assert steps_goal["met_share"] == reach["adherence_only"]["goal_share"]
    assert numbers["goals"]["background_psnr"]["measured"] == reach["psnr_vs_baseline"]["change"]
    for name in numbers["figures"]:
        with Image.open(quick_study / numbers["figures"][name]) as figure:
            assert figure.format == "PNG" and min(figure.size) > 50
    with Image.open(quick_study / numbers["figures"]["grid"]) as grid:  # source, base, 2 variants, target
        assert grid.width == 5 * 128


@pytest.mark.slow
def test_a_finished_study_is_not_trained_or_scored_again(quick_study):
    from deploy.cli import main

    watched = [*quick_study.glob("runs/*/summary.json"), *quick_study.glob("runs/*/study_eval.json")]
    watched += [*quick_study.glob("runs/*/metrics.jsonl"), *quick_study.glob("base/*.json")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    assert len(before) == 7
    assert main(["study", "--quick", "--out", str(quick_study)]) == 0
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    # the report counts what the study cost over both invocations, not only the idle second one
    meta = json.loads((quick_study / "study.json").read_text())["meta"]
    first, second = meta["invocations"][-2:]
    assert second["seconds"] == meta["seconds"] < first["seconds"]
    assert meta["total_seconds"] == pytest.approx(sum(i["seconds"] for i in meta["invocations"]), abs=0.2)


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium_with_every_figure(quick_study, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run must apt-get install chromium")
        pytest.skip("chromium not installed (Debian: apt-get install chromium); CI installs it")
    report = quick_study / "report.html"
    page = report.read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: nothing from the network
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    figures = len(json.loads((quick_study / "study.json").read_text())["figures"])
    assert page.count("<img ") == figures
    # the page's script marks the body once every <img> has decoded with a width
    assert f'data-images="{figures}/{figures}"' in dom and 'data-loaded="true"' in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(shot) as image:
        assert image.size == WINDOW
        pixels = np.asarray(image.convert("RGB"), dtype=float)
    not_white = (pixels < 240).any(axis=-1).mean()
    colourful = (pixels.max(axis=-1) - pixels.min(axis=-1) > 60).mean()  # curves, bars, edits
    assert pixels.std() > 20 and 0.05 < not_white < 0.9 and colourful > 0.01, (
        pixels.std(),
        not_white,
        colourful,
    )
