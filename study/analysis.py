"""The numbers of a study (study/harness.py): outcome and mechanism measures of every variant.

Outcome: the change from the base editor of each held-out metric, per sample (paired: same sample,
same initial noise), averaged over seeds and samples, at every scored step; 95% intervals from a
bootstrap that resamples seeds and samples together (the same draws for every variant and step, so
steps-to-target gets an interval too). Steps-to-target: the first scored step at which a variant's
mean adherence change reaches the baseline's final one with a background-PSNR change at least the
baseline's final one.

Mechanism: from the runs' metrics.jsonl, per variant and per task kind, the within-group std of each
reward term (std_i r_ij, unweighted), corr(A of the total, A of the instruction terms), the ACD std
and corr(R_ACD, instruction reward); per variant, pi_old's entropy, the clip fraction and |r - 1|.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from rcgrpo.evaluate import HEADLINE
from services.config import load_run_config

ADHERENCE, PSNR = "region_adherence", "background_psnr"
STEP_MEASURES = (  # metrics.jsonl keys, one value per learner step
    "policy_entropy",
    "effective_neighbours",
    "clip_fraction",
    "ratio_deviation_p50",
    "ratio_deviation_p90",
    "approx_kl",
)
HEADLINE_STD_RATIO = 0.2  # the goal: the headline's background-reward std at most this x the baseline's
HEADLINE_STEP_FRACTION = 0.5  # the goal: the baseline's final adherence in at most this share of its steps
HEADLINE_DRAW_SHARE = 0.9  # ... in at least this share of the bootstrap draws


def _rows_by_id(rows: list[dict]) -> dict[str, dict]:
    return {row["id"]: row for row in rows}


def _differences(base: list[dict], trained: list[dict], ids: list[str], metric: str) -> np.ndarray:
    """trained - base per sample, in `ids` order; NaN where either is not finite."""
    b, t = _rows_by_id(base), _rows_by_id(trained)
    out = np.array([t[i][metric] - b[i][metric] if i in t else math.nan for i in ids], dtype=float)
    out[~np.isfinite(out)] = math.nan
    return out


def _interval(draws: np.ndarray) -> tuple[float, float]:
    finite = draws[np.isfinite(draws)]
    if len(finite) == 0:
        return math.nan, math.nan
    return float(np.quantile(finite, 0.025)), float(np.quantile(finite, 0.975))


def study_metrics(rows: list[dict]) -> list[str]:
    """The held-out metrics the rows hold: the ShapesEdit ones, and LPIPS where it was scored."""
    return [m for m in (*HEADLINE, "LPIPS") if m in rows[0]]


def outcome(runs: list[dict], variants: list[str], seeds: int, bootstrap: int, ids: list[str]) -> dict:
    """Learning curves and final changes with 95% intervals, and steps-to-target, for every variant.

    runs: one entry per (variant, seed) with "base_rows" and "scored" ({step: rows}).
    """
    rng = np.random.default_rng(0)
    seed_draws = rng.integers(0, seeds, size=(bootstrap, seeds))
    sample_draws = rng.integers(0, len(ids), size=(bootstrap, len(ids)))
    curves, boot = {}, {}
    for variant in variants:
        own = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        steps = sorted(set.intersection(*(set(int(s) for s in r["scored"]) for r in own)))
        curves[variant], boot[variant] = {"steps": [0, *steps]}, {}
        for metric in study_metrics(own[0]["base_rows"]):
            # (steps + 1, seeds, samples): step 0 is the base editor itself, a change of 0
            diffs = np.stack(
                [np.zeros((len(own), len(ids)))]
                + [
                    np.stack([_differences(r["base_rows"], r["scored"][str(s)], ids, metric) for r in own])
                    for s in steps
                ]
            )
            resampled = diffs[:, seed_draws[:, :, None], sample_draws[:, None, :]]  # (T, B, S, N)
            with warnings.catch_warnings():  # an all-NaN slice is NaN on purpose
                warnings.simplefilter("ignore", RuntimeWarning)
                means = np.nanmean(resampled, axis=(2, 3))  # (T, B)
                point = np.nanmean(diffs, axis=(1, 2))
            boot[variant][metric] = means
            intervals = [_interval(m) for m in means]
            curves[variant][metric] = {
                "mean": [float(v) for v in point],
                "low": [lo for lo, _ in intervals],
                "high": [hi for _, hi in intervals],
                # per seed, mean over samples: how far apart the seeds are
                "per_seed": [[float(v) for v in np.nanmean(d, axis=1)] for d in diffs],
            }
    return {"curves": curves, "boot": boot}


def final_changes(curves: dict, base_means: dict) -> dict:
    """Each variant's change at its last scored step, with its interval and the base's mean."""
    return {
        variant: {
            metric: {
                "step": curve["steps"][-1],
                "base": base_means[metric],
                "change": curve[metric]["mean"][-1],
                "low": curve[metric]["low"][-1],
                "high": curve[metric]["high"][-1],
            }
            for metric in base_means
        }
        for variant, curve in curves.items()
    }


def _first_reach(adherence: np.ndarray, psnr: np.ndarray, target_a, target_p, steps: list[int]) -> np.ndarray:
    """adherence, psnr: (T, ...) curves; the first step where both reach their targets, else inf."""
    reached = (adherence >= target_a) & (psnr >= target_p)
    first = np.argmax(reached, axis=0)
    return np.where(reached.any(axis=0), np.asarray(steps, dtype=float)[first], math.inf)


def _reach(point: float, draws: np.ndarray, total_steps: int) -> dict:
    """A first-reach step (inf: never) and its bootstrap draws, as the report gives them."""
    low, high = (float(np.quantile(draws, q, method="inverted_cdf")) for q in (0.025, 0.975))
    return {
        "steps": None if math.isinf(point) else int(point),
        "fraction_of_steps": None if math.isinf(point) else point / total_steps,
        "low": None if math.isinf(low) else int(low),
        "high": None if math.isinf(high) else int(high),  # None: not reached in >2.5% of the draws
        "reached_share": float(np.isfinite(draws).mean()),
        # the draws in which the goal's step budget suffices (HEADLINE_STEP_FRACTION of the steps)
        "goal_share": float((draws <= HEADLINE_STEP_FRACTION * total_steps).mean()),
    }


def steps_to_target(curves: dict, boot: dict, baseline: str, total_steps: int) -> dict:
    """Steps each variant needs to reach the baseline's final mean adherence change at equal or better
    background-PSNR change, and ("adherence_only") whatever the background; intervals from the shared
    bootstrap draws (inf: not reached in a draw). "psnr_vs_baseline": the variant's final PSNR change
    less the baseline's, and the share of draws in which it is at least the baseline's."""
    base_curve = curves[baseline]
    target = {
        "region_adherence": base_curve[ADHERENCE]["mean"][-1],
        "background_psnr": base_curve[PSNR]["mean"][-1],
    }
    draws_a, draws_p = boot[baseline][ADHERENCE][-1], boot[baseline][PSNR][-1]
    out = {"target": target, "baseline": baseline, "total_steps": total_steps, "variants": {}}
    for variant, curve in curves.items():
        steps = curve["steps"]
        adherence, psnr = np.array(curve[ADHERENCE]["mean"]), np.array(curve[PSNR]["mean"])
        point = _first_reach(adherence, psnr, target[ADHERENCE], target[PSNR], steps)
        draws = _first_reach(boot[variant][ADHERENCE], boot[variant][PSNR], draws_a, draws_p, steps)
        # any background: a PSNR target of -inf
        point_a = _first_reach(adherence, psnr, target[ADHERENCE], -math.inf, steps)
        draws_only_a = _first_reach(boot[variant][ADHERENCE], boot[variant][PSNR], draws_a, -math.inf, steps)
        psnr_gap = boot[variant][PSNR][-1] - draws_p
        out["variants"][variant] = {
            **_reach(float(point), draws, total_steps),
            "adherence_only": _reach(float(point_a), draws_only_a, total_steps),
            "psnr_vs_baseline": {
                "change": curve[PSNR]["mean"][-1] - target[PSNR],
                "at_least_share": float((psnr_gap >= 0).mean()),
            },
        }
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _group_measures(groups: list[dict], terms: list[str]) -> dict:
    acd = [g.get("acd_instruction_corr", math.nan) for g in groups]
    return {
        "groups": len(groups),
        "term_std": {name: _mean([g["term_std"].get(name, math.nan) for g in groups]) for name in terms},
        "advantage_instruction_corr": _mean([g["advantage_instruction_corr"] for g in groups]),
        "instruction_share": _mean([g["instruction_share"] for g in groups]),
        "acd_instruction_corr": _mean(acd),
    }


def mechanism(runs: list[dict], variants: list[str], baseline: str) -> dict:
    """Per variant: the learning-signal measures over every step of every seed, overall and per task."""
    out = {}
    for variant in variants:
        steps, groups = [], []
        own = [r for r in runs if r["variant"] == variant]
        for run in own:
            path = Path(run["run_dir"]) / "metrics.jsonl"
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    steps.append(row)
                    groups += row.get("group_signal", [])
        cfg = load_run_config(Path(own[0]["run_dir"]) / "config.yaml")
        terms = list(cfg.rewards)
        background = [n for n in terms if n not in cfg.reward.instruction_terms and n != "acd"]
        tasks = sorted({g["task"] for g in groups})
        out[variant] = {
            "instruction_terms": cfg.reward.instruction_terms,
            "background_terms": background,
            "steps": len(steps),
            "all": {
                **_group_measures(groups, terms),
                **{name: _mean([row.get(name, math.nan) for row in steps]) for name in STEP_MEASURES},
            },
            "tasks": {
                task: _group_measures([g for g in groups if g["task"] == task], terms) for task in tasks
            },
        }
    reference = out[baseline]["all"]["term_std"]
    for measures in out.values():
        measures["background_std_ratio"] = {
            name: measures["all"]["term_std"][name] / reference[name]
            if reference.get(name) and math.isfinite(reference[name]) and reference[name] > 0
            else math.nan
            for name in measures["background_terms"]
        }
    return out


def goals(steps: dict, mechanisms: dict, headline: str) -> dict:
    """The study's goals for the headline variant, each with its measured number and whether it holds."""
    reach = steps["variants"][headline]
    ratios = mechanisms[headline]["background_std_ratio"]
    worst = max((r for r in ratios.values() if math.isfinite(r)), default=math.nan)
    baseline = steps["baseline"]
    return {
        "steps_to_target": {
            "goal": f"{headline} reaches {baseline}'s final adherence change in at most "
            f"{HEADLINE_STEP_FRACTION:g}x its {steps['total_steps']} steps in at least "
            f"{HEADLINE_DRAW_SHARE:.0%} of the bootstrap draws",
            "measured": reach["adherence_only"]["fraction_of_steps"],
            "met": reach["adherence_only"]["goal_share"] >= HEADLINE_DRAW_SHARE,
            "met_share": reach["adherence_only"]["goal_share"],
        },
        "background_psnr": {
            "goal": f"{headline}'s background PSNR change no worse than {baseline}'s",
            "measured": reach["psnr_vs_baseline"]["change"],
            # the point estimate decides "met"; this says how often the bootstrap draws agree
            "met": reach["psnr_vs_baseline"]["change"] >= 0,
            "met_share": reach["psnr_vs_baseline"]["at_least_share"],
        },
        "background_std": {
            "goal": f"{headline}'s within-group std of every background reward term at most "
            f"{HEADLINE_STD_RATIO:g}x {steps['baseline']}'s",
            "measured": ratios,
            "met": math.isfinite(worst) and worst <= HEADLINE_STD_RATIO,
        },
    }
