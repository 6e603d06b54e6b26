"""Where one training iteration's time goes: component times measured in isolation, then the distributed run.

Part 1, in this process, sequentially, on a private embedded Redis (median over --iterations after one
warm-up iteration), with the run's own components on the config's (default: configs/tiny_shapes.yaml):
  - rollout: RolloutWorker.rollout_group for the iteration's groups_per_step tasks (model: encode,
    ODE with attention capture, VAE decode, ACD; plus encoding the record as PNG/safetensors and
    storing its training tensors);
  - rollout bus: the rest of RolloutWorker.process (LoRA check, publish + mark done + ack);
  - scoring: the real reward server app (uvicorn in a thread, serve_in_thread) in stream mode: the
    iteration's rollout groups are appended to the stream its consumer reads, timed until their scored
    groups are on the scored stream (Redis reads, blob fetch, decode, batched scoring, publish);
  - learner collect / update / publish: Learner.step()'s own split (reading the scored groups;
    fetching their training tensors and rc_grpo_step; LoraStore.publish of the LoRA);
  - worker load: RolloutWorker.sync_lora() of the new version (LoraStore.load + sha256 + load into
    the LoRA).
Torch threads: the workers and the learner set cfg.rollout/learner.torch_threads process-wide (1 in
the default config); the in-thread reward server then runs with the same setting.

Part 2: deploy.driver.run(cfg) with eval.num_samples=0 and learner.total_steps=--steps (a unique run
name under a temp runs_dir): from its metrics.jsonl, the learner's wall time per iteration split into
wait (idle for scored groups), update and publish, the iteration wall time and images/s.

    .venv/bin/python bench/bench_loop.py [--iterations 10] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from deploy.driver import TaskFeeder, run
from deploy.reward_process import reward_server_settings
from learner.learner import Learner
from reward_server.app import create_app
from reward_server.settings import RewardServerSettings
from rollout_worker.worker import RolloutWorker
from services.auth import new_token
from services.bus import RunBus
from services.config import load_run_config
from services.http import serve_in_thread
from services.redis_server import EmbeddedRedis
from services.reward_client import RewardClient

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_shapes.yaml"
COMPONENTS = ["rollout", "rollout bus", "scoring", "learner collect", "update", "publish", "worker load"]
MODEL_COMPUTE = ["rollout", "scoring", "update"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Timed:
    """Wraps a callable, recording the seconds of each call."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, []

    def __call__(self, *args):
        started = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds.append(time.perf_counter() - started)


def wait_for_length(stream, length: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while stream.length() < length:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stream.name} did not reach {length} entries in {timeout_s}s")
        time.sleep(0.002)


def components(config: Path, iterations: int, runs_dir: Path) -> tuple[list[dict], dict]:
    """Part 1: one row of component seconds per measured iteration, and facts about the setup."""
    token = new_token()
    with EmbeddedRedis() as server:
        cfg = load_run_config(
            config,
            [f"name=bench-loop-{os.getpid()}-parts", f"runs_dir={runs_dir}", f"redis_url={server.url}"],
        )
        bus = RunBus(cfg, server.url)
        worker = RolloutWorker(cfg, server.url, "bench-worker")
        learner = Learner(cfg, server.url)
        worker.rollout_group = Timed(worker.rollout_group)
        # the reward server reads its own stream, fed once an iteration's rollouts are all done, so
        # scoring does not overlap the rollouts (the worker's own rollouts stream has no reader here)
        settings = reward_server_settings(cfg, server.url, port=0)
        del settings["host"], settings["port"]
        scoring_stream = cfg.keys.key("rollouts:bench-scoring")
        settings["stream"] |= {"rollouts": scoring_stream, "block_ms": 50}
        with serve_in_thread(create_app(RewardServerSettings(token=token, **settings))) as url:
            RewardClient(url, token=token).wait_ready(timeout_s=120)
            feeder = TaskFeeder(bus, cfg.data.num_samples, cfg.data.seed)
            groups = cfg.learner.groups_per_step
            learner.publish_lora()
            rows = []
            for i in range(iterations + 1):
                row = {}
                started = time.perf_counter()
                worker.sync_lora()
                row["worker load"] = time.perf_counter() - started
                feeder.feed_until((i + 1) * groups)
                rolled = len(worker.rollout_group.seconds)
                started = time.perf_counter()
                done = 0
                while done < groups:
                    for entry in worker.next_entries():
                        done += worker.process(entry)
                process_s = time.perf_counter() - started
                row["rollout"] = sum(worker.rollout_group.seconds[rolled:])
                row["rollout bus"] = process_s - row["rollout"]
                entries = bus.client.xrange(bus.rollouts.name)[-groups:]
                before = bus.scored.length()
                started = time.perf_counter()
                for _, fields in entries:
                    bus.client.xadd(scoring_stream, fields)
                wait_for_length(bus.scored, before + groups)
                row["scoring"] = time.perf_counter() - started
                stats = learner.step()
                row["learner collect"] = stats["wait_seconds"]
                row["update"] = stats["update_seconds"]
                row["publish"] = stats["publish_seconds"]
                if i > 0:  # the first iteration warms up
                    rows.append(row)
                print(
                    f"  iteration {i}{' (warm-up)' if i == 0 else ''}: "
                    + ", ".join(f"{k} {v:.3f}s" for k, v in row.items()),
                    flush=True,
                )
            facts = {
                "threads": torch.get_num_threads(),
                "lora_bytes": bus.lora.latest().blob.size,
                "groups_per_step": groups,
                "images_per_step": groups * cfg.method.group_size,
            }
    return rows, facts


def distributed(config: Path, steps: int, runs_dir: Path) -> tuple[list[dict], dict]:
    """Part 2: the driver's run; returns its metrics lines and summary."""
    for variable in ("REDIS_URL", "RCGRPO_REWARD_URL", "RAY_ADDRESS"):
        os.environ.pop(variable, None)  # a private Redis, the driver's own reward server, a local Ray
    cfg = load_run_config(
        config,
        [
            f"name=bench-loop-{os.getpid()}-run",
            f"runs_dir={runs_dir}",
            "eval.num_samples=0",
            f"learner.total_steps={steps}",
        ],
    )
    summary = run(cfg)
    lines = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines, summary | {
        "num_workers": cfg.rollout.num_workers,
        "worker_threads": cfg.rollout.torch_threads,
        "learner_threads": cfg.learner.torch_threads,
    }


def median(values) -> float:
    return statistics.median(values)


def report(rows: list[dict], facts: dict, lines: list[dict], summary: dict, args, load_start: str) -> str:
    out = []
    add = out.append
    images = facts["images_per_step"]
    add(
        f"machine: nproc={os.cpu_count()}, {cpu_model()}, Python {platform.python_version()}, torch {torch.__version__}"
    )
    add(f"load average (1/5/15 min) at start: {load_start}; at end: {load_average()}")
    add("")
    add(
        f"## Part 1: component times, in-process, sequential (median of {len(rows)} iterations after 1 warm-up)"
    )
    add("")
    add(
        f"torch threads {facts['threads']}; {facts['groups_per_step']} groups x G = {images} images per iteration; tiny LoRA blob {facts['lora_bytes'] / 1e3:.1f} kB"
    )
    add("")
    add("| component | median s | min s | max s | share of sequential sum |")
    add("|---|---:|---:|---:|---:|")
    totals = [sum(row.values()) for row in rows]
    for name in COMPONENTS:
        values = [row[name] for row in rows]
        add(
            f"| {name} | {median(values):.3f} | {min(values):.3f} | {max(values):.3f} | {median(values) / median(totals):.1%} |"
        )
    add(f"| **sequential iteration** | {median(totals):.3f} | {min(totals):.3f} | {max(totals):.3f} | |")
    compute = [sum(row[name] for name in MODEL_COMPUTE) for row in rows]
    add("")
    add(
        f"model compute (rollout + scoring + update) median {median(compute):.3f} s; not model compute "
        f"{1 - median(compute) / median(totals):.1%} of the sequential iteration; sequential images/s {images / median(totals):.2f}"
    )

    # elapsed time at each step from the driver's cumulative images/s (clocked from the first feed)
    start_step = lines[0]["step"] - 1
    elapsed = [(line["step"] - start_step) * images / line["images_per_s"] for line in lines]
    walls = [elapsed[0]] + [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    steady = lines[1:]
    steady_walls = walls[1:]
    add("")
    add(
        f"## Part 2: distributed run, deploy.driver.run ({len(lines)} steps, {summary['num_workers']} rollout workers)"
    )
    add("")
    add(
        f"worker torch threads {summary['worker_threads']}, learner {summary['learner_threads']}; the reward server is a child process (torch default threads = nproc)"
    )
    add("")
    add(
        "| step | wall s | learner wait s | update s | publish s | other s | staleness | images/s (cumulative) |"
    )
    add("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for line, wall in zip(lines, walls, strict=True):
        other = wall - line["wait_seconds"] - line["update_seconds"] - line["publish_seconds"]
        add(
            f"| {line['step']} | {wall:.2f} | {line['wait_seconds']:.2f} | {line['update_seconds']:.2f} | {line['publish_seconds']:.3f} | {other:.2f} | {line['staleness_mean']:.2f} | {line['images_per_s']:.2f} |"
        )
    wait = sum(line["wait_seconds"] for line in steady)
    update = sum(line["update_seconds"] for line in steady)
    publish = sum(line["publish_seconds"] for line in steady)
    wall_sum = sum(steady_walls)
    add("")
    add(
        f"steady state (steps {steady[0]['step']}-{steady[-1]['step']}, the first step includes filling the pipeline: {walls[0]:.2f} s):"
    )
    add(
        f"- iteration wall: median {median(steady_walls):.2f} s, mean {wall_sum / len(steady_walls):.2f} s; images/s {images * len(steady_walls) / wall_sum:.2f} (whole run: {lines[-1]['images_per_s']:.2f})"
    )
    add(
        f"- learner split of its step() time: wait {wait / (wait + update + publish):.1%}, update {update / (wait + update + publish):.1%}, publish {publish / (wait + update + publish):.1%}; step() covers {(wait + update + publish) / wall_sum:.1%} of the wall (the rest: Ray calls, checkpoints, driver bookkeeping)"
    )
    add(
        f"- learner not model compute = (wait + publish) / (wait + update + publish) = {(wait + publish) / (wait + update + publish):.1%}"
    )
    per_iteration = {name: median([row[name] for row in rows]) for name in COMPONENTS}
    compute_s = sum(per_iteration[name] for name in MODEL_COMPUTE)
    processes = summary["num_workers"] + 2  # rollout workers + reward server + learner
    mean_wall = wall_sum / len(steady_walls)
    add(
        f"- system: model compute per iteration (part 1 medians: rollout + scoring + update) {compute_s:.2f} s vs mean wall {mean_wall:.2f} s: "
        f"{compute_s / mean_wall:.2f} compute-seconds per wall-second; of {os.cpu_count()} cores x wall that is {compute_s / (os.cpu_count() * mean_wall):.1%} busy "
        f"with model compute, of {processes} compute processes x wall {compute_s / (processes * mean_wall):.1%}"
    )
    add("")
    add(f"run: {summary['seconds']} s from first feed to the end of the loop, run dir {summary['run_dir']}")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument(
        "--iterations", type=int, default=10, help="measured in-process iterations (after 1 warm-up)"
    )
    parser.add_argument("--steps", type=int, default=20, help="learner steps of the distributed run")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rcgrpo-bench-loop-") as runs_dir:
        print("part 1: components", flush=True)
        rows, facts = components(args.config, args.iterations, Path(runs_dir))
        print("part 2: distributed run", flush=True)
        lines, summary = distributed(args.config, args.steps, Path(runs_dir))
        text = report(rows, facts, lines, summary, args, load_start)
    text += f"\n\nbench total {time.perf_counter() - started:.0f} s"
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
