"""`rcgrpo study`: RC-GRPO against Neighbor GRPO and every ablation, at equal compute, on the same tasks
and held-out set, with several seeds; then the report (study/report.py).

A study config (configs/study_tiny.yaml) names one base run config and the variants as `--set`-style
overrides of it. Every (variant, seed) is a real `rcgrpo train` run (deploy.driver.run), one after the
other, all in one private Redis and one Ray that the study starts (each run keeps its own reward server:
a reward server consumes one run's streams). Seed s sets data.seed and learner.seed to the base's + s
(other training samples, task order, group noise and anchors); the held-out set is the base config's
for every run. Each run checkpoints every `eval_every` steps; the study scores every checkpoint's LoRA
on the held-out set, paired per sample against the base editor (same samples, same initial noise).

Resumable: a run with summary.json is not trained again, a run with checkpoints resumes, and a
checkpoint already scored is not scored again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from rcgrpo.config import ConfigSection
from services.config import CONFIGS_DIR, RunConfig, load_run_config, shipped_config
from services.process import configure_logging

DEFAULT_STUDY_CONFIG = CONFIGS_DIR / "study_tiny.yaml"
EVAL_FILE = "study_eval.json"  # per run: held-out rows of every scored checkpoint
GRID_DIR = "study_grid"  # per run: the final checkpoint's edits of the grid samples, PNG
INVOCATIONS_FILE = "invocations.jsonl"  # one line per finished invocation: what a resumed study cost
# the study process scores between trainings, alone on the machine: every core
SCORING_THREADS = os.cpu_count() or 1
log = logging.getLogger("rcgrpo.study")


class QuickSettings(ConfigSection):
    """What --quick changes: a smoke test of the whole study in about a minute."""

    seeds: int = Field(1, ge=1)
    steps: int = Field(2, ge=1)
    eval_every: int = Field(1, ge=1)
    eval_samples: int = Field(4, ge=2)
    grid_samples: int = Field(2, ge=0)
    bootstrap: int = Field(200, ge=10)
    variants: list[str] = Field(default_factory=list)  # empty: all (sweeps never run with --quick)
    overrides: list[str] = Field(default_factory=list)  # on top of every run's


class StudyConfig(ConfigSection):
    base: Path  # the base run config; relative paths are relative to the study file
    overrides: list[str] = Field(default_factory=list)  # applied to the base for every run
    seeds: int = Field(3, ge=1)
    steps: int | None = Field(None, ge=1)  # learner.total_steps of every run; None: the base's
    eval_every: int = Field(10, ge=1)  # steps between scored checkpoints (the learning curves)
    eval_samples: int | None = Field(None, ge=2)  # held-out samples; None: the base's eval.num_samples
    grid_samples: int = Field(4, ge=0)  # held-out samples drawn in the before/after grid
    bootstrap: int = Field(2000, ge=10)  # resamples of (seeds x samples) for the 95% intervals
    baseline: str  # the variant whose final adherence is the steps-to-target target (Neighbor GRPO)
    headline: str  # the method under study (full RC-GRPO); sweeps vary it
    variants: dict[str, list[str]] = Field(min_length=1)  # name -> overrides of the base
    # name -> overrides: every variant also runs with each factor's overrides, as "<variant>/<name>"
    factors: dict[str, list[str]] = Field(default_factory=dict)
    # name -> points, each a list of overrides of the headline variant: "<headline> <overrides>"
    sweeps: dict[str, list[list[str]]] = Field(default_factory=dict)
    quick: QuickSettings = Field(default_factory=QuickSettings)

    @model_validator(mode="after")
    def _names(self):
        for field_name in ("baseline", "headline"):
            if getattr(self, field_name) not in self.variants:
                raise ValueError(
                    f"{field_name}: {getattr(self, field_name)!r} is not one of the variants {list(self.variants)}"
                )
        return self


@dataclass(frozen=True)
class Variant:
    name: str  # as the report shows it
    overrides: tuple[str, ...]  # of the base run config
    kind: str  # "variant" | "sweep"

    @property
    def slug(self) -> str:
        """The variant's part of its runs' names (Redis keys allow [A-Za-z0-9_.:-])."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name).strip("-")[:56]


@dataclass
class Study:
    """A study config resolved against its base: what to run and how to score it."""

    config: StudyConfig
    base_path: Path
    out: Path
    variants: list[Variant]
    seeds: int
    steps: int
    eval_every: int
    eval_samples: int
    grid_samples: int
    bootstrap: int
    overrides: tuple[str, ...]  # for every run: the study's, then --quick's

    def run_config(self, variant: Variant, seed: int, redis_url: str | None = None) -> RunConfig:
        base = load_run_config(self.base_path, self.overrides)
        return load_run_config(
            self.base_path,
            [
                *self.overrides,
                *variant.overrides,
                f"name={variant.slug}-s{seed}",
                f"runs_dir={self.out / 'runs'}",
                f"learner.total_steps={self.steps}",
                f"learner.checkpoint_every={self.eval_every}",
                f"data.seed={base.data.seed + seed}",
                f"learner.seed={base.learner.seed + seed}",
                "eval.num_samples=0",  # the study scores the checkpoints itself
                *([f"redis_url={redis_url}"] if redis_url else []),
            ],
        )

    def eval_config(self) -> RunConfig:
        """The held-out set every run is scored on: the base config's, with eval_samples samples."""
        return load_run_config(self.base_path, [*self.overrides, f"eval.num_samples={self.eval_samples}"])


def load_study(
    path: str | Path,
    out: str | Path | None = None,
    seeds: int | None = None,
    steps: int | None = None,
    eval_every: int | None = None,
    quick: bool = False,
    only: list[str] | None = None,
    sweeps: bool = False,
) -> Study:
    """Read a study config, expand its variants, factors and sweeps, and check them before any run:
    every override valid, no two variants the same run, every variant at the same rollout budget."""
    path = shipped_config(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: study config {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'study'}: {e['msg']}" for e in error.errors()
        )
        raise ValueError(f"invalid study config {str(path)!r}: {problems}") from None
    base_path = config.base if config.base.is_absolute() else path.parent / config.base
    if not base_path.is_file():
        raise FileNotFoundError(f"base: run config {str(base_path)!r} does not exist")

    variants = []
    for name, overrides in config.variants.items():
        variants.append(Variant(name, tuple(overrides), "variant"))
        for factor, extra in config.factors.items():
            variants.append(Variant(f"{name}/{factor}", (*overrides, *extra), "variant"))
    if sweeps and not quick:
        headline = config.variants[config.headline]
        for points in config.sweeps.values():
            for point in points:
                label = ",".join(
                    item.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + item.split("=", 1)[-1] for item in point
                )
                variants.append(Variant(f"{config.headline} {label}", (*headline, *point), "sweep"))
    names = [v.name for v in variants]
    if quick and config.quick.variants:
        unknown = [n for n in config.quick.variants if n not in names]
        if unknown:
            raise ValueError(f"quick.variants: {unknown} are not among the study's variants {names}")
        variants = [v for v in variants if v.name in config.quick.variants]
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"--only: {unknown} are not among the study's variants {names}")
        keep = {*only, config.baseline, config.headline}  # what the outcome measures compare with
        variants = [v for v in variants if v.name in keep]
    for required in (config.baseline, config.headline):
        if required not in [v.name for v in variants]:
            raise ValueError(
                f"quick.variants: the study needs its {required!r} variant (baseline and headline)"
            )

    settings = config.quick if quick else config
    default_out = Path("runs") / f"study-{path.stem}{'-quick' if quick else ''}"
    base = load_run_config(base_path, [*config.overrides, *(config.quick.overrides if quick else [])])
    study = Study(
        config=config,
        base_path=base_path,
        out=Path(out) if out is not None else default_out,
        variants=variants,
        seeds=seeds or settings.seeds,
        steps=steps or (config.quick.steps if quick else config.steps or base.learner.total_steps),
        eval_every=eval_every or settings.eval_every,
        eval_samples=settings.eval_samples if quick else (config.eval_samples or base.eval.num_samples),
        grid_samples=settings.grid_samples,
        bootstrap=settings.bootstrap,
        overrides=(*config.overrides, *(config.quick.overrides if quick else ())),
    )
    _check_variants(study)
    return study


def rollout_budget(cfg: RunConfig) -> int:
    """Images rolled out for training: steps x groups per step x G."""
    return cfg.learner.total_steps * cfg.learner.groups_per_step * cfg.method.group_size


def _check_variants(study: Study) -> None:
    seen: dict[str, str] = {}
    budgets: dict[str, int] = {}
    slugs: dict[str, str] = {}
    for variant in study.variants:
        if variant.slug in slugs:  # their runs would share a directory and Redis keys
            raise ValueError(
                f"variants {slugs[variant.slug]!r} and {variant.name!r} have the same run name "
                f"{variant.slug!r}: rename one"
            )
        slugs[variant.slug] = variant.name
        try:
            cfg = study.run_config(variant, 0)
        except ValueError as error:
            raise ValueError(f"variant {variant.name!r} ({' '.join(variant.overrides)}): {error}") from None
        same_run = json.dumps(cfg.model_dump(mode="json", exclude={"name"}), sort_keys=True)
        if same_run in seen:
            raise ValueError(
                f"variants {seen[same_run]!r} and {variant.name!r} are the same run on this base config "
                f"({study.base_path}): change or drop one"
            )
        seen[same_run] = variant.name
        budgets[variant.name] = rollout_budget(cfg)
    if len(set(budgets.values())) > 1:
        raise ValueError(
            "every variant must have the same rollout budget (total_steps x learner.groups_per_step x "
            f"method.group_size), got {budgets}: a G sweep point sets learner.groups_per_step too"
        )


# -- held-out scoring ------------------------------------------------------------------------------


def _sampling_key(cfg: RunConfig) -> str:
    """What the base editor's held-out edits depend on: runs that agree on it share one base score."""
    fields = [str(cfg.editor), str(cfg.dtype), cfg.method.num_steps, cfg.method.guidance_scale]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:12]


def _save_pngs(directory: Path, edits) -> None:
    from PIL import Image

    from rcgrpo.clip_scores import to_uint8

    directory.mkdir(parents=True, exist_ok=True)
    for i, edit in enumerate(edits):
        Image.fromarray(to_uint8(edit)).save(directory / f"{i:03d}.png")


def _score(
    editor, samples, cfg: RunConfig, eval_cfg: RunConfig, grid: int, grid_dir: Path | None
) -> list[dict]:
    """Held-out rows: the ShapesEdit metrics, and CompBench's LPIPS where its weights are present."""
    from rcgrpo.compbench_metrics import CompBenchMetrics, lpips_unavailable_reason
    from rcgrpo.evaluate import HEADLINE, evaluate

    lpips = lpips_unavailable_reason() is None
    result = evaluate(
        editor,
        samples,
        cfg.method,
        seed=eval_cfg.eval.seed,
        compbench=CompBenchMetrics(None) if lpips else False,
        batch_size=8,
        keep_edits=True,
    )
    if grid_dir is not None and grid:
        _save_pngs(grid_dir, result.edits[:grid])
    kept = ("id", "task", *HEADLINE, *(("LPIPS",) if lpips else ()))
    return [{m: row[m] for m in kept} for row in result.rows]


def score_base(study: Study, cfg: RunConfig, samples) -> Path:
    """The base editor's held-out rows (and grid edits) for runs sampled like `cfg`; scored once."""
    from rcgrpo.editor import load_editor

    key = _sampling_key(cfg)
    path = study.out / "base" / f"{key}.json"
    if not path.exists():
        eval_cfg = study.eval_config()
        editor = load_editor(cfg.editor, dtype=cfg.dtype)
        rows = _score(editor, samples, cfg, eval_cfg, study.grid_samples, study.out / "base" / f"{key}_grid")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"sampling": key, "rows": rows}) + "\n")
    return path


def score_checkpoints(study: Study, cfg: RunConfig, samples, console) -> dict:
    """Every checkpoint of a run scored on the held-out set: {"steps": [...], "rows": {step: rows}}."""
    import torch
    from safetensors.torch import load_file

    from learner.checkpoint import CHECKPOINT_PREFIX
    from rcgrpo.lora import load_lora_state_dict
    from services.policy import start_component

    path = cfg.run_dir / EVAL_FILE
    scored = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    checkpoints = sorted((cfg.run_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))
    todo = [c for c in checkpoints if str(int(c.name.removeprefix(CHECKPOINT_PREFIX))) not in scored["rows"]]
    if todo:
        eval_cfg = study.eval_config()
        editor = start_component(cfg, SCORING_THREADS, 0)  # the base editor with the run's LoRA slots
        for checkpoint in todo:
            step = int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))
            console.print(f"  scoring {cfg.name} step {step} on {len(samples)} held-out samples")
            load_lora_state_dict(editor.transformer, load_file(checkpoint / "lora.safetensors"))
            final = step == study.steps
            grid_dir = cfg.run_dir / GRID_DIR if final else None
            with torch.no_grad():
                scored["rows"][str(step)] = _score(
                    editor, samples, cfg, eval_cfg, study.grid_samples, grid_dir
                )
            path.write_text(json.dumps(scored) + "\n")  # after each checkpoint: resumable mid-run
    scored["steps"] = sorted(int(s) for s in scored["rows"])
    return scored


# -- the study -------------------------------------------------------------------------------------


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def run_study(study: Study, command: str) -> dict:
    """Train every (variant, seed) not yet trained, score every checkpoint, write the report."""
    import ray
    import torch
    from rich.console import Console

    from deploy.driver import init_ray, run
    from rcgrpo.data.loading import load_samples
    from services.redis_server import EmbeddedRedis
    from study.report import write_report

    console = Console()
    started = time.perf_counter()
    torch.set_num_threads(SCORING_THREADS)  # this process only scores: the runs train in their actors
    study.out.mkdir(parents=True, exist_ok=True)
    plan = [(variant, seed) for variant in study.variants for seed in range(study.seeds)]
    eval_cfg = study.eval_config()
    samples = load_samples(
        eval_cfg.data.source,
        split=eval_cfg.eval.split,
        limit=eval_cfg.eval.num_samples,
        seed=eval_cfg.data.seed,
    )
    console.print(
        f"[bold]rcgrpo study[/]: {len(study.variants)} variants x {study.seeds} seeds x {study.steps} steps, "
        f"{len(samples)} held-out samples every {study.eval_every} steps -> {study.out}"
    )
    _check_plan(study, [s.id for s in samples])
    runs = []
    first = study.run_config(plan[0][0], plan[0][1])
    redis_url = first.resolved_redis_url()
    with EmbeddedRedis(data_dir=study.out / "redis") if redis_url is None else nullcontext() as server:
        redis_url = redis_url or server.url
        ray_started = False
        try:
            for n, (variant, seed) in enumerate(plan, 1):
                cfg = study.run_config(variant, seed, redis_url)
                summary_path = cfg.run_dir / "summary.json"
                console.print(f"[bold]run {n}/{len(plan)}[/] {variant.name} seed {seed} ({cfg.run_dir})")
                if summary_path.exists():
                    console.print("  finished before: not trained again")
                else:
                    if not ray.is_initialized():
                        init_ray(cfg)
                        ray_started = True
                    resume = any((cfg.run_dir / "checkpoints").glob("step_*"))
                    if cfg.run_dir.exists() and not resume:
                        # a start that died before its first checkpoint trained nothing to keep; the
                        # run must land in this directory, not in a new <name>-2 beside it
                        shutil.rmtree(cfg.run_dir)
                    run(cfg, resume=resume)
                base_path = score_base(study, cfg, samples)
                scored = score_checkpoints(study, cfg, samples, console)
                runs.append(
                    {
                        "variant": variant.name,
                        "kind": variant.kind,
                        "seed": seed,
                        "run_dir": str(cfg.run_dir),
                        "base": str(base_path),
                        "summary": json.loads(summary_path.read_text()),
                        "tasks_fed": _tasks_fed(cfg),
                        "rollout_budget": rollout_budget(cfg),
                        "scored_steps": scored["steps"],
                    }
                )
        finally:
            if ray_started:
                ray.shutdown()
    seconds = time.perf_counter() - started
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with (study.out / INVOCATIONS_FILE).open("a") as log_file:
        log_file.write(json.dumps({"command": command, "date": date, "seconds": round(seconds, 1)}) + "\n")
    invocations = [json.loads(line) for line in (study.out / INVOCATIONS_FILE).read_text().splitlines()]
    meta = {
        "command": command,
        "machine": machine(),
        "date": date,
        "seconds": round(seconds, 1),  # this invocation
        "invocations": invocations,  # every one that finished in this study directory, this one last
        "total_seconds": round(sum(i["seconds"] for i in invocations), 1),
        "base_config": str(study.base_path),
        "base_config_text": load_run_config(study.base_path, study.overrides).to_yaml(),
        "variants": {v.name: {"overrides": list(v.overrides), "kind": v.kind} for v in study.variants},
        "seeds": study.seeds,
        "steps": study.steps,
        "eval_every": study.eval_every,
        "eval_samples": len(samples),
        "baseline": study.config.baseline,
        "headline": study.config.headline,
        "bootstrap": study.bootstrap,
    }
    report = write_report(study, runs, meta, samples, console)
    console.print(f"study: {report['html']}  numbers: {report['json']}  ({seconds:.0f} s)")
    return report


def _check_plan(study: Study, sample_ids: list[str]) -> None:
    """A study directory holds one plan: steps, scoring cadence and held-out set. A second invocation
    with another plan would mix runs that are not comparable, so it is refused."""
    plan = {"steps": study.steps, "eval_every": study.eval_every, "held_out": sample_ids}
    path = study.out / "plan.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = [key for key in plan if before.get(key) != plan[key]]
        if changed:
            raise ValueError(
                f"--out: {study.out} holds a study with other {', '.join(changed)} "
                f"(steps {before.get('steps')}, eval_every {before.get('eval_every')}, "
                f"{len(before.get('held_out', []))} held-out samples): choose another --out"
            )
    else:
        path.write_text(json.dumps(plan) + "\n")


def _tasks_fed(cfg: RunConfig) -> int:
    """Rollout groups the driver fed the run (its final checkpoint's task cursor)."""
    from learner.checkpoint import latest_checkpoint

    latest = latest_checkpoint(cfg.run_dir / "checkpoints")
    return json.loads((latest / "state.json").read_text())["task_cursor"] if latest else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=DEFAULT_STUDY_CONFIG, help=f"study config YAML (default: {DEFAULT_STUDY_CONFIG})"
    )
    parser.add_argument("--seeds", type=int, help="seeds per variant (default: the study config's)")
    parser.add_argument("--steps", type=int, help="learner steps of every run (default: the study config's)")
    parser.add_argument(
        "--eval-every", type=int, help="steps between scored checkpoints (default: the study config's)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the study config's quick settings: a smoke test in about a minute",
    )
    parser.add_argument(
        "--sweeps", action="store_true", help="also run the study config's sweeps (not with --quick)"
    )
    parser.add_argument(
        "--only", help="comma-separated variant names to run (baseline and headline included)"
    )
    parser.add_argument("--out", help="study directory (default: runs/study-<config name>[-quick])")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(args: argparse.Namespace) -> int:
    configure_logging(logging.WARNING)
    for name in ("seeds", "steps", "eval_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    study = load_study(
        args.config,
        out=args.out,
        seeds=args.seeds,
        steps=args.steps,
        eval_every=args.eval_every,
        quick=args.quick,
        only=[n.strip() for n in args.only.split(",")] if args.only else None,
        sweeps=args.sweeps,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_study(
            study, "rcgrpo study " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["study"] else sys.argv[1:])
        )
    except KeyboardInterrupt:
        return 130
    return 0
