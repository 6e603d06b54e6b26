"""What a full `rcgrpo study` costs, from its parts measured on this machine, before anyone runs it.

1. One run of the study's headline variant (seed 0) through deploy.driver.run for --steps steps, in
   the study's way (private Redis, a Ray started before it, eval off): the wall time, and from its metrics.jsonl the
   training loop's seconds per step; the rest of the wall time is the run's fixed cost (reward server,
   actors, model loads, final LoRA).
2. Held-out scoring: rcgrpo.evaluate.evaluate of the base editor on --samples held-out samples at
   batch 8, as the study scores a checkpoint: seconds per sample.
3. The estimate for the study config: runs x (fixed + steps x per step) + scored checkpoints x
   samples x per sample (+ the base once). Every variant is costed as the headline (the background
   anchor's extra forward included; ACD is captured in every variant).

    .venv/bin/python bench/bench_study.py [--config configs/study_tiny.yaml] [--steps 10] [--samples 64] [--sweeps]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import ray
import torch

from deploy.driver import init_ray, run
from rcgrpo.data.loading import load_samples
from rcgrpo.editor import load_editor
from rcgrpo.evaluate import evaluate
from services.redis_server import EmbeddedRedis
from study.harness import DEFAULT_STUDY_CONFIG, load_study, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_STUDY_CONFIG)
    parser.add_argument("--steps", type=int, default=10, help="steps of the measured run")
    parser.add_argument(
        "--samples", type=int, default=64, help="held-out samples scored for the per-sample time"
    )
    parser.add_argument("--sweeps", action="store_true", help="cost the sweeps too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
        study = load_study(args.config, out=tmp, sweeps=args.sweeps)
        headline = next(v for v in study.variants if v.name == study.config.headline)
        with EmbeddedRedis() as redis:
            cfg = study.run_config(headline, 0, redis.url)
            cfg = cfg.model_copy(
                update={"learner": cfg.learner.model_copy(update={"total_steps": args.steps})}
            )
            started = time.perf_counter()
            init_ray(cfg)  # once per study
            ray_s = time.perf_counter() - started
            started = time.perf_counter()
            run(cfg)
            run_s = time.perf_counter() - started
            ray.shutdown()
        rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        images = args.steps * cfg.learner.groups_per_step * cfg.method.group_size
        loop_s = images / rows[-1]["images_per_s"]  # the driver's loop, first step to last
        step_s = loop_s / args.steps
        fixed_s = run_s - loop_s

        eval_cfg = study.eval_config()
        torch.set_num_threads(cfg.rollout.torch_threads)
        samples = load_samples(
            eval_cfg.data.source, split=eval_cfg.eval.split, limit=args.samples, seed=eval_cfg.data.seed
        )
        editor = load_editor(cfg.editor, dtype=cfg.dtype)
        evaluate(
            editor, samples[:8], cfg.method, seed=eval_cfg.eval.seed, compbench=False, batch_size=8
        )  # warm-up
        started = time.perf_counter()
        evaluate(editor, samples, cfg.method, seed=eval_cfg.eval.seed, compbench=False, batch_size=8)
        sample_s = (time.perf_counter() - started) / len(samples)

    runs = len(study.variants) * study.seeds
    checkpoints = math.ceil(study.steps / study.eval_every)
    train_s = ray_s + runs * (fixed_s + study.steps * step_s)
    score_s = (runs * checkpoints + 1) * study.eval_samples * sample_s
    print(f"machine: {machine()}")
    print(f"Ray start: {ray_s:.1f} s (once per study)")
    print(
        f"measured run: {args.steps} steps of {headline.name}, {run_s:.1f} s wall = {fixed_s:.1f} s fixed + {step_s:.2f} s/step"
    )
    print(f"held-out scoring: {sample_s * 1000:.1f} ms per sample ({len(samples)} samples, batch 8)")
    print(
        f"study {args.config}: {len(study.variants)} variants x {study.seeds} seeds = {runs} runs of {study.steps} steps, "
        f"{checkpoints} scored checkpoints x {study.eval_samples} samples each"
    )
    print(
        f"estimate: training {train_s / 60:.1f} min + scoring {score_s / 60:.1f} min = {(train_s + score_s) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
