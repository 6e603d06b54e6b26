"""The study's report: study.json (every number), PNG figures and one self-contained HTML file (the
figures inline as base64 PNG, no script or style from the network). Drawn with PIL, like
deploy/report.py.

Figures: learning curves (change from base against the step, mean over seeds and samples with a 95%
band), bars of the final changes with their intervals, bars of the mechanism measures, and a
before/after grid: the same held-out samples edited by the base editor and by every variant.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from rcgrpo.evaluate import json_safe
from study import analysis

PALETTE = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (23, 190, 207),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
)
LABELS = {
    "region_adherence": "region adherence",
    "background_psnr": "background PSNR (dB)",
    "background_ssim": "background SSIM",
    "LPIPS": "background LPIPS (CompBench)",
}
FONT = ImageFont.load_default(size=13)
SMALL = ImageFont.load_default(size=11)


def _signed(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.{digits}f}" if isinstance(value, float) else str(value)


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = high - low
    step = 10 ** math.floor(math.log10(span / count))
    for multiple in (1, 2, 5, 10):
        if span / (step * multiple) <= count:
            step *= multiple
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _legend(draw, left: int, top: int, width: int, entries) -> int:
    """Coloured swatches and labels in rows; returns the y below them."""
    x, y = left, top
    for label, colour in entries:
        w = 22 + int(draw.textlength(label, font=SMALL)) + 16
        if x + w > left + width:
            x, y = left, y + 16
        draw.rectangle([x, y + 3, x + 14, y + 11], fill=colour)
        draw.text((x + 18, y), label, fill=(0, 0, 0), font=SMALL)
        x += w
    return y + 18


def line_chart(title: str, series: list[dict], size=(560, 340)) -> Image.Image:
    """series: {label, colour, x, mean, low, high}; lines with translucent 95% bands, a zero line."""
    width, height = size
    legend_rows = 1 + sum(len(s["label"]) for s in series) * 7 // (width - 40)
    image = Image.new("RGBA", (width, height + 16 * legend_rows), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 62, 28, width - 12, height - 34
    values = [v for s in series for key in ("mean", "low", "high") for v in s[key] if math.isfinite(v)]
    xs = [x for s in series for x in s["x"]]
    low, high = (min(values + [0.0]), max(values + [0.0])) if values else (-1.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 1.0, high + 1.0
    pad = (high - low) * 0.06
    low, high = low - pad, high + pad
    x_low, x_high = (min(xs), max(xs)) if xs else (0, 1)
    x_high = x_high if x_high > x_low else x_low + 1

    def px(x, y):
        return (
            left + (right - left) * (x - x_low) / (x_high - x_low),
            bottom - (bottom - top) * (y - low) / (high - low),
        )

    draw.text((left, 6), title, fill=(0, 0, 0), font=FONT)
    for tick in _nice_ticks(low, high):
        _, y = px(x_low, tick)
        draw.line([left, y, right, y], fill=(235, 235, 235))
        draw.text((4, y - 7), f"{tick:.3g}", fill=(80, 80, 80), font=SMALL)
    for tick in sorted(set(xs)) if len(set(xs)) <= 14 else _nice_ticks(x_low, x_high, 8):
        x, _ = px(tick, low)
        draw.text((x - 8, bottom + 4), f"{tick:g}", fill=(80, 80, 80), font=SMALL)
    draw.text(((left + right) // 2 - 30, bottom + 18), "learner step", fill=(80, 80, 80), font=SMALL)
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    draw.line([px(x_low, 0.0), px(x_high, 0.0)], fill=(120, 120, 120), width=1)
    bands = Image.new("RGBA", image.size, (0, 0, 0, 0))
    band_draw = ImageDraw.Draw(bands)
    for s in series:
        upper = [px(x, v) for x, v in zip(s["x"], s["high"], strict=True) if math.isfinite(v)]
        lower = [px(x, v) for x, v in zip(s["x"], s["low"], strict=True) if math.isfinite(v)]
        if len(upper) > 1 and len(lower) == len(upper):
            band_draw.polygon(upper + lower[::-1], fill=(*s["colour"], 48))
    image = Image.alpha_composite(image, bands)
    draw = ImageDraw.Draw(image)
    for s in series:
        points = [px(x, v) for x, v in zip(s["x"], s["mean"], strict=True) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=s["colour"], width=3)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=s["colour"])
    _legend(draw, left, height - 6, right - left, [(s["label"], s["colour"]) for s in series])
    return image.convert("RGB")


def bar_chart(title: str, bars: list[dict], size=(560, None), reference: float | None = 0.0) -> Image.Image:
    """bars: {label, colour, value, low, high}; horizontal bars with interval whiskers."""
    width = size[0]
    row = 24
    label_w = 10 + max(
        (int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(b["label"], font=SMALL)) for b in bars),
        default=0,
    )
    height = 60 + row * len(bars)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top = label_w + 8, width - 70, 30
    values = [
        v
        for b in bars
        for v in (b["value"], b.get("low"), b.get("high"))
        if v is not None and math.isfinite(v)
    ]
    low, high = (
        (min(values + [reference or 0.0]), max(values + [reference or 0.0])) if values else (-1.0, 1.0)
    )
    if high - low < 1e-9:
        low, high = low - 1.0, high + 1.0
    pad = (high - low) * 0.05
    low, high = low - pad, high + pad

    def px(v):
        return left + (right - left) * (v - low) / (high - low)

    draw.text((8, 6), title, fill=(0, 0, 0), font=FONT)
    for tick in _nice_ticks(low, high):
        draw.line([px(tick), top, px(tick), top + row * len(bars)], fill=(235, 235, 235))
        draw.text((px(tick) - 10, top + row * len(bars) + 4), f"{tick:.3g}", fill=(80, 80, 80), font=SMALL)
    if reference is not None:
        draw.line([px(reference), top, px(reference), top + row * len(bars)], fill=(90, 90, 90))
    for n, b in enumerate(bars):
        y = top + n * row
        draw.text((8, y + 5), b["label"], fill=(0, 0, 0), font=SMALL)
        value = b["value"]
        if value is None or not math.isfinite(value):
            draw.text((left + 4, y + 5), "no data", fill=(120, 120, 120), font=SMALL)
            continue
        start = px(reference if reference is not None else low)
        draw.rectangle([min(start, px(value)), y + 4, max(start, px(value)), y + row - 4], fill=b["colour"])
        lo, hi = b.get("low"), b.get("high")
        if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
            mid = y + row // 2
            draw.line([px(lo), mid, px(hi), mid], fill=(0, 0, 0), width=2)
            draw.line([px(lo), mid - 5, px(lo), mid + 5], fill=(0, 0, 0), width=2)
            draw.line([px(hi), mid - 5, px(hi), mid + 5], fill=(0, 0, 0), width=2)
        draw.text((right + 6, y + 5), f"{value:.3g}", fill=(0, 0, 0), font=SMALL)
    return image


def before_after_grid(samples, columns: list[tuple[str, list[Path]]], scale: int = 2) -> Image.Image:
    """Rows: samples; columns: source, then each (label, edit PNGs), then the target."""
    from rcgrpo.clip_scores import to_uint8

    cell = samples[0].source.shape[-1] * scale
    header, caption = 30, 14
    image = Image.new("RGB", ((len(columns) + 2) * cell, header + len(samples) * (cell + caption)), "white")
    draw = ImageDraw.Draw(image)
    labels = ["source", *(label for label, _ in columns), "target"]
    for col, label in enumerate(labels):
        words, lines = label.split("/"), []
        lines = [words[0]] + ["/" + w for w in words[1:]]
        for k, text in enumerate(lines[:2]):
            draw.text((col * cell + 3, 2 + 13 * k), text[:22], fill=(0, 0, 0), font=SMALL)

    def paste(picture: Image.Image, col: int, row: int) -> None:
        y = header + row * (cell + caption) + caption
        image.paste(picture.resize((cell, cell), Image.NEAREST), (col * cell, y))

    for row, sample in enumerate(samples):
        draw.text((2, header + row * (cell + caption)), sample.instruction[:90], fill=(0, 0, 0), font=SMALL)
        paste(Image.fromarray(to_uint8(sample.source)), 0, row)
        for col, (_, paths) in enumerate(columns, 1):
            with Image.open(paths[row]) as edit:
                paste(edit.convert("RGB"), col, row)
        target = sample.target if sample.target is not None else sample.source
        paste(Image.fromarray(to_uint8(target)), len(columns) + 1, row)
    return image


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ci(entry: dict, digits: int = 4) -> str:
    return f"{_signed(entry['change'], digits)} [{_signed(entry['low'], digits)}, {_signed(entry['high'], digits)}]"


def write_report(study, runs: list[dict], meta: dict, samples, console) -> dict:
    """Compute every number (study/analysis.py), draw the figures, write study.json and
    report.html under the study directory; returns their paths."""
    out = study.out
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    ids = [s.id for s in samples]
    for run in runs:
        run["base_rows"] = json.loads(Path(run["base"]).read_text())["rows"]
        run["scored"] = json.loads((Path(run["run_dir"]) / "study_eval.json").read_text())["rows"]
    variants = [v.name for v in study.variants]
    colours = {name: PALETTE[n % len(PALETTE)] for n, name in enumerate(variants)}
    measured = analysis.outcome(runs, variants, study.seeds, study.bootstrap, ids)
    curves = measured["curves"]
    base_rows = runs[0]["base_rows"]
    metrics = analysis.study_metrics(base_rows)
    base_means = {m: analysis._mean([r[m] for r in base_rows]) for m in metrics}
    final = analysis.final_changes(curves, base_means)
    reach = analysis.steps_to_target(curves, measured["boot"], study.config.baseline, study.steps)
    mechanisms = analysis.mechanism(runs, variants, study.config.baseline)
    verdict = analysis.goals(reach, mechanisms, study.config.headline)

    # -- figures -------------------------------------------------------------------------------------
    main_variants = [v.name for v in study.variants if v.kind == "variant"]
    paths = {}
    for metric in metrics:
        chart = line_chart(
            f"{LABELS[metric]}: change from base (mean, 95% CI over seeds x samples)",
            [
                {
                    "label": v,
                    "colour": colours[v],
                    "x": curves[v]["steps"],
                    **{k: curves[v][metric][k] for k in ("mean", "low", "high")},
                }
                for v in main_variants
            ],
        )
        paths[f"curve_{metric}"] = figures / f"curve_{metric}.png"
        chart.save(paths[f"curve_{metric}"])
        bars = bar_chart(
            f"{LABELS[metric]}: final change from base, 95% CI",
            [
                {
                    "label": v,
                    "colour": colours[v],
                    "value": final[v][metric]["change"],
                    "low": final[v][metric]["low"],
                    "high": final[v][metric]["high"],
                }
                for v in variants
            ],
        )
        paths[f"final_{metric}"] = figures / f"final_{metric}.png"
        bars.save(paths[f"final_{metric}"])
    background = mechanisms[study.config.baseline]["background_terms"]
    for name, title, pick in [
        *[
            (
                f"std_{term}",
                f"within-group std of {term} (unweighted)",
                lambda m, t=term: m["all"]["term_std"].get(t),
            )
            for term in background
        ],
        ("std_acd", "within-group std of R_ACD", lambda m: m["all"]["term_std"].get("acd")),
        (
            "advantage_corr",
            "corr(A of total, A of instruction term)",
            lambda m: m["all"]["advantage_instruction_corr"],
        ),
    ]:
        chart = bar_chart(
            title,
            [{"label": v, "colour": colours[v], "value": pick(mechanisms[v])} for v in variants],
        )
        paths[name] = figures / f"{name}.png"
        chart.save(paths[name])
    grid_rows = min(study.grid_samples, len(samples))
    if grid_rows:
        seed0 = {r["variant"]: r for r in runs if r["seed"] == 0}
        base_grid = Path(runs[0]["base"]).with_name(Path(runs[0]["base"]).stem + "_grid")
        columns = [("base editor", sorted(base_grid.glob("*.png"))[:grid_rows])]
        columns += [
            (v, sorted((Path(seed0[v]["run_dir"]) / "study_grid").glob("*.png"))[:grid_rows])
            for v in variants
        ]
        paths["grid"] = figures / "before_after.png"
        before_after_grid(samples[:grid_rows], columns).save(paths["grid"])

    numbers = {
        "meta": meta,
        "metrics": metrics,
        "base": base_means,
        "final": final,
        "curves": curves,
        "steps_to_target": reach,
        "mechanism": mechanisms,
        "goals": verdict,
        "runs": [{k: v for k, v in r.items() if k not in ("base_rows", "scored")} for r in runs],
        "figures": {name: str(path.relative_to(out)) for name, path in paths.items()},
    }
    json_path = out / "study.json"
    json_path.write_text(json.dumps(json_safe(numbers), indent=1, allow_nan=False) + "\n")
    html_path = out / "report.html"
    html_path.write_text(_html(numbers, paths, variants, study))
    return {"html": html_path, "json": json_path, "figures": paths, "numbers": numbers}


def _html(numbers: dict, paths: dict, variants: list[str], study) -> str:
    meta, metrics, final, reach, mechanisms, verdict = (
        numbers[k] for k in ("meta", "metrics", "final", "steps_to_target", "mechanism", "goals")
    )
    esc = html.escape

    def img(name: str, alt: str) -> str:
        return f'<img src="{_data_uri(paths[name])}" alt="{esc(alt)}">' if name in paths else ""

    def reached(r: dict) -> str:
        steps = "not reached" if r["steps"] is None else f"{r['steps']} ({r['fraction_of_steps']:.2f}x)"
        return f"{steps} [{r['low'] if r['low'] is not None else '-'}, {r['high'] if r['high'] is not None else 'not reached'}]"

    headline_rows = []
    for v in variants:
        r = reach["variants"][v]
        ratio = mechanisms[v]["background_std_ratio"]
        headline_rows.append(
            [esc(v)]
            + [_ci(final[v][m]) for m in metrics]
            + [
                reached(r),
                reached(r["adherence_only"]),
                ", ".join(f"{esc(k)} {_signed(x, 3).lstrip('+')}" for k, x in ratio.items()),
            ]
        )
    fraction = verdict["steps_to_target"]["measured"]
    measured = [
        ("not reached" if fraction is None else f"{fraction:.2f}x the steps")
        + f" (within {analysis.HEADLINE_STEP_FRACTION:g}x in {verdict['steps_to_target']['met_share']:.0%} of the bootstrap draws)",
        f"{verdict['background_psnr']['measured']:+.2f} dB against {esc(meta['baseline'])}'s"
        f" (at least as good in {verdict['background_psnr']['met_share']:.0%} of the bootstrap draws)",
        ", ".join(  # the comparison written out: 0.2000009 prints as 0.200 and fails the goal
            f"{esc(k)} {v:.3f}x {'&le;' if v <= analysis.HEADLINE_STD_RATIO else '&gt;'} "
            f"{analysis.HEADLINE_STD_RATIO:g}x"
            for k, v in verdict["background_std"]["measured"].items()
        ),
    ]
    goal_rows = [
        [esc(g["goal"]), text, "<b>yes</b>" if g["met"] else "<b>no</b>"]
        for g, text in zip(verdict.values(), measured, strict=True)
    ]
    terms = list(next(iter(mechanisms.values()))["all"]["term_std"])
    mech_header = [
        "variant",
        "task",
        "groups",
        *[f"std {t}" for t in terms],
        "corr(A, A_instr)",
        "instr. share",
        "corr(ACD, instr)",
    ]
    step_header = ["variant", "steps", *analysis.STEP_MEASURES]
    mech_rows, step_rows = [], []
    for v in variants:
        m = mechanisms[v]
        for task, values in [("all", m["all"]), *m["tasks"].items()]:
            mech_rows.append(
                [esc(v), esc(task), str(values["groups"])]
                + [_signed(values["term_std"][t]).lstrip("+") for t in terms]
                + [
                    _signed(values[k])
                    for k in ("advantage_instruction_corr", "instruction_share", "acd_instruction_corr")
                ]
            )
        step_rows.append(
            [esc(v), str(m["steps"])] + [_signed(m["all"][k]).lstrip("+") for k in analysis.STEP_MEASURES]
        )
    run_rows = [
        [
            esc(r["variant"]),
            str(r["seed"]),
            str(r["summary"]["steps"]),
            str(r["tasks_fed"]),
            str(r["rollout_budget"]),
            f"{r['summary']['seconds']:.0f}",
        ]
        for r in numbers["runs"]
    ]
    variant_rows = [
        [esc(v), esc(" ".join(d["overrides"]) or "(the base config)"), d["kind"]]
        for v, d in meta["variants"].items()
    ]
    seeds_note = (
        "With one seed the intervals cover the held-out samples only."
        if meta["seeds"] == 1
        else f"Intervals resample the {meta['seeds']} seeds and the {meta['eval_samples']} samples together."
    )
    weak_target = (
        f" <b>{esc(meta['baseline'])} did not improve adherence, so its target says little.</b>"
        if not reach["target"]["region_adherence"] > 0
        else ""
    )
    base_text = ", ".join(f"{esc(LABELS[m])} {numbers['base'][m]:.4f}" for m in metrics)
    figures = "".join(f"<figure>{img(f'curve_{m}', f'learning curve of {m}')}</figure>" for m in metrics)
    bars = "".join(f"<figure>{img(f'final_{m}', f'final change of {m}')}</figure>" for m in metrics)
    mech_figures = "".join(
        f"<figure>{img(name, name)}</figure>"
        for name in paths
        if name.startswith("std_") or name == "advantage_corr"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>RC-GRPO study</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #111; max-width: 1800px; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; font-size: 13px; }}
th, td {{ border: 1px solid #bbb; padding: 3px 7px; text-align: right; }}
th {{ background: #eee; }} td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 6px; vertical-align: top; }}
code, pre {{ background: #f4f4f4; padding: 2px 4px; }} pre {{ padding: 8px; overflow-x: auto; }}
</style></head>
<body data-loaded="false">
<h1>RC-GRPO study</h1>
<p><code>{esc(meta["command"])}</code><br>{esc(meta["machine"])}; {esc(meta["date"])}; this invocation {meta["seconds"]:.0f} s, {len(meta["invocations"])} invocation(s) of this study {meta["total_seconds"]:.0f} s (each run's own time is in the runs table).
{meta["seeds"]} seed(s) x {meta["steps"]} steps per variant, scored every {meta["eval_every"]} steps on
{meta["eval_samples"]} held-out samples, paired per sample against the base editor. {seeds_note}
Baseline: <b>{esc(meta["baseline"])}</b>; method under study: <b>{esc(meta["headline"])}</b>.</p>
<h2>Goals</h2>
{_table(["goal", "measured", "met"], goal_rows)}
<h2>Outcome: change from the base editor at the last step, 95% CI</h2>
<p>Base editor: {base_text}. Steps-to-target: the first
scored step with mean adherence change at least {esc(meta["baseline"])}'s final {_signed(reach["target"]["region_adherence"])}
and background-PSNR change at least its final {_signed(reach["target"]["background_psnr"])} dB (as a share of the {meta["steps"]} steps, with its bootstrap interval);
the adherence alone: the same whatever the background.{weak_target}</p>
{_table(["variant", *[LABELS[m] for m in metrics], "steps-to-target", "steps to its adherence alone", "background std / baseline's"], headline_rows)}
<h2>Learning curves</h2>
{figures}
<h2>Final changes</h2>
{bars}
<h2>Mechanism: within-group reward spread and the learning signal</h2>
<p>Over every step of every seed. std: the within-group std of each reward term (unweighted); corr(A, A_instr): the
correlation of the advantages of the total reward with those of the instruction term alone; instr. share:
Cov(total, instruction) / Var(total); corr(ACD, instr): R_ACD against the instruction reward.</p>
{mech_figures}
{_table(mech_header, mech_rows)}
{_table(step_header, step_rows)}
<h2>Before / after: the same held-out samples, seed 0, last step</h2>
<figure>{img("grid", "before and after grid")}</figure>
<h2>Variants and runs</h2>
{_table(["variant", "overrides of the base config", "kind"], variant_rows)}
{_table(["variant", "seed", "steps", "rollout groups fed", "rollout budget (images)", "seconds"], run_rows)}
<h3>Base config</h3>
<pre>{esc(meta["base_config_text"])}</pre>
<script>
(function () {{
  function check() {{
    var images = Array.prototype.slice.call(document.images);
    var loaded = images.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }});
    document.body.setAttribute("data-images", loaded.length + "/" + images.length);
    document.body.setAttribute("data-loaded", loaded.length === images.length ? "true" : "false");
  }}
  if (document.readyState === "complete") check(); else window.addEventListener("load", check);
}})();
</script>
</body></html>
"""
