"""The run driver and Ray job entrypoint: `python -m deploy.driver --config configs/tiny_shapes.yaml`.

The whole loop, one direction:

    tasks --(Ray rollout actors: RDP group noise, ODE rollout, ACD)--> rollouts stream
          --(reward server, stream mode, batched)-->                  scored stream
          --(learner actor: advantages, RC-GRPO step)-->              policy versions --> rollout actors

The driver connects to (or starts) Redis and the reward server (checking that it serves the run's
rewards), starts the actors, feeds tasks ahead of the learner, checkpoints, stops cleanly at
learner.total_steps or on Ctrl-C, and ends with a held-out evaluation of the base editor against the
trained LoRA.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import torch

from services.auth import TOKEN_ENV
from services.bus import RunBus
from services.config import DEFAULT_RUN_CONFIG, RunConfig, add_run_arguments, load_run_config
from services.record import Task
from services.redis_server import EmbeddedRedis
from services.reward_client import RewardClient, RewardServerError

log = logging.getLogger("rcgrpo.driver")
REWARD_SERVER_READY_S = 120.0  # how long an external reward server may take to answer /readyz


class TaskFeeder:
    """Issues tasks in a seeded order: epoch e visits the training samples in permutation e; task i's
    group noise is seeded by (run seed, i), so a resumed run issues exactly the same tasks."""

    def __init__(self, bus: RunBus, num_samples: int, seed: int, cursor: int = 0):
        self.bus, self.num_samples, self.seed, self.cursor = bus, num_samples, seed, cursor
        self._epoch, self._order = None, None

    def task(self, i: int) -> Task:
        epoch, position = divmod(i, self.num_samples)
        if self._epoch != epoch:  # one permutation per epoch, drawn when the epoch starts
            seed = self.seed * 100_003 + epoch
            self._epoch, self._order = (
                epoch,
                torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed)),
            )
        order = self._order
        return Task(
            group_id=f"task-{i:07d}", dataset_index=int(order[position]), noise_seed=self.seed * 1_000_003 + i
        )

    def feed_until(self, total: int) -> None:
        while self.cursor < total:
            self.bus.tasks.publish(self.task(self.cursor).to_fields())
            self.cursor += 1
        self.bus.set_task_cursor(self.cursor)


class LearnerHandle(Protocol):
    """What the driver asks of the learner, wherever it runs (learner.learner.Learner satisfies it too)."""

    def resume_point(self) -> tuple[int, int]:
        """(optimiser step, driver task cursor) the learner continues from."""

    def publish_lora(self) -> int:
        """Publish the learner's LoRA; the policy version every worker samples with from now on."""

    def step(self) -> dict:
        """One update; its statistics."""

    def checkpoint(self, task_cursor: int) -> object:
        """Checkpoint, recording how many tasks the driver has fed."""

    def save_final_lora(self, directory: Path) -> Path:
        """The trained LoRA in diffusers format, in `directory`."""


class RayLearner:
    """The learner as a Ray actor, called synchronously."""

    def __init__(self, actor):
        self.actor = actor

    def _call(self, method, *args):
        import ray

        return ray.get(method.remote(*args))

    def resume_point(self) -> tuple[int, int]:
        return self._call(self.actor.resume_point)

    def publish_lora(self) -> int:
        return self._call(self.actor.publish_lora)

    def step(self) -> dict:
        return self._call(self.actor.step)

    def checkpoint(self, task_cursor: int) -> object:
        return self._call(self.actor.checkpoint, task_cursor)

    def save_final_lora(self, directory: Path) -> Path:
        return self._call(self.actor.save_final_lora, directory)


class ExternalLearner:
    """A learner running as its own process (`rcgrpo learner`, learner.external): followed through Redis.
    It publishes its weights, checkpoints (with the task cursor the driver records) and saves its LoRA itself."""

    def __init__(self, bus: RunBus, poll_s: float = 0.2):
        self.bus, self.poll_s = bus, poll_s

    def _wait(self, ready):
        while (value := ready()) is None:
            time.sleep(self.poll_s)
        return value

    def resume_point(self) -> tuple[int, int]:
        stats = self.bus.learner_stats()
        return (0 if stats is None else stats["step"]), self.bus.task_cursor()

    def publish_lora(self) -> int:
        return self._wait(self.bus.lora.latest).policy_version

    def step(self) -> dict:
        done = self.resume_point()[0]

        def newer_stats():
            stats = self.bus.learner_stats()
            return stats if stats is not None and stats["step"] > done else None

        return self._wait(newer_stats)

    def checkpoint(self, task_cursor: int) -> None:
        """The external learner checkpoints on its own schedule."""

    def save_final_lora(self, directory: Path) -> Path:
        return self._wait(
            lambda: directory if (directory / "pytorch_lora_weights.safetensors").exists() else None
        )


def check_local_cpus(cfg: RunConfig, cpus: float) -> None:
    """Refuse a run whose rollout actors need more logical CPUs than the local Ray has."""
    needed = cfg.rollout.num_workers * cfg.rollout.cpus_per_worker
    if needed > cpus:
        raise ValueError(
            f"rollout.num_workers={cfg.rollout.num_workers} x rollout.cpus_per_worker="
            f"{cfg.rollout.cpus_per_worker} needs {needed:g} CPUs, but the local Ray has {cpus:g}: "
            "lower either (cpus_per_worker=0 reserves none)"
        )


def check_served_rewards(cfg: RunConfig, client: RewardClient) -> None:
    """Refuse a run whose rewards the reward server does not serve (its groups could not be scored)."""
    try:
        served = [reward.name for reward in client.rewards().rewards]
    except RewardServerError as error:
        hint = f"; set {TOKEN_ENV} to its token" if error.status == 401 else ""
        raise ValueError(f"cannot list the rewards of the reward server: {error}{hint}") from None
    missing = [name for name in cfg.rewards if name not in served]
    if missing:
        raise ValueError(
            f"the reward server at {client.http.base_url} does not serve {missing}, which the run scores with "
            f"(reward.rewards and method.acd_weight: {cfg.rewards}); it serves {served}"
        )


def init_ray(cfg: RunConfig) -> None:
    """Connect to cfg.ray_address (else RAY_ADDRESS), or start a local Ray that can place the run's actors."""
    import ray

    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address == "local":  # actors that cannot all be placed would wait for CPUs forever
        try:
            check_local_cpus(cfg, ray.cluster_resources().get("CPU", 0))
        except ValueError:
            ray.shutdown()
            raise


def run(cfg: RunConfig, resume: bool = False) -> dict:
    import ray
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from deploy.evaluation import evaluate_base_vs_trained
    from deploy.report import save_curves
    from deploy.reward_process import RewardServerProcess
    from learner.learner import Learner
    from rollout_worker.worker import RolloutWorker

    console = Console()
    run_dir = cfg.run_dir
    if run_dir.exists() and not resume and any(run_dir.glob("checkpoints/step_*")):
        raise ValueError(
            f"run directory {run_dir} already has checkpoints: pass --resume, or choose another name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    metrics_log = run_dir / "metrics.jsonl"

    with ExitStack() as stack:
        # 1. Redis: the given server, else a private one whose append-only file lives in the run dir
        redis_url = cfg.resolved_redis_url()
        if redis_url is None:
            redis_url = stack.enter_context(EmbeddedRedis(data_dir=run_dir / "redis")).url
        bus = RunBus(cfg, redis_url)
        bus.clear_stop()

        # 2. the reward server, consuming the rollouts stream; every group carries the run's rewards and
        # weights, so any server that serves those rewards scores it as the run asks
        reward_url = cfg.reward.url or os.environ.get("RCGRPO_REWARD_URL")
        if reward_url is None:
            reward_server = RewardServerProcess(cfg, redis_url, run_dir / "reward_server.log")
            stack.callback(reward_server.stop)
            reward_server.wait_ready()
            reward_client = reward_server.client
        else:
            reward_client = stack.enter_context(RewardClient(reward_url, token=os.environ.get(TOKEN_ENV)))
            try:
                reward_client.wait_ready(timeout_s=REWARD_SERVER_READY_S)
            except RewardServerError as error:
                raise ValueError(f"reward.url / RCGRPO_REWARD_URL: {error}") from None
        check_served_rewards(cfg, reward_client)

        # 3. Ray: rollout actors and the learner actor
        if not ray.is_initialized():  # a study runs many runs in one Ray it started itself
            init_ray(cfg)
            stack.callback(ray.shutdown)
        learner: LearnerHandle
        if cfg.learner.external:
            learner = ExternalLearner(bus)
        else:
            learner_cls = ray.remote(num_cpus=0, num_gpus=cfg.learner.num_gpus)(Learner)
            learner = RayLearner(
                learner_cls.remote(cfg, redis_url, resume, metrics_port=cfg.learner.metrics_port)
            )
        worker_cls = ray.remote(num_cpus=cfg.rollout.cpus_per_worker, num_gpus=cfg.rollout.gpus_per_worker)(
            RolloutWorker
        )
        ports = [
            cfg.rollout.metrics_port + i if cfg.rollout.metrics_port else 0
            for i in range(cfg.rollout.num_workers)
        ]
        workers = [
            worker_cls.remote(cfg, redis_url, f"worker-{i}", ports[i]) for i in range(cfg.rollout.num_workers)
        ]
        start_step, cursor = learner.resume_point()
        version = learner.publish_lora()  # every worker samples with this or newer
        console.print(
            f"[bold]rcgrpo[/] run {cfg.name!r}: {cfg.rollout.num_workers} workers, policy v{version}, step {start_step}"
        )
        worker_runs = [w.run.remote() for w in workers]

        # 4. the loop: feed tasks ahead of the learner, one learner update per step
        groups_per_step = cfg.learner.groups_per_step
        ahead = 1 if cfg.learner.staleness_policy == "wait" else 1 + cfg.learner.max_staleness
        feeder = TaskFeeder(bus, cfg.data.num_samples, cfg.data.seed, cursor)
        step, started = start_step, time.perf_counter()
        columns = [
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        try:
            with Progress(*columns, console=console) as progress, metrics_log.open("a") as metrics_file:
                bar = progress.add_task("train", total=cfg.learner.total_steps, completed=step, info="")
                while step < cfg.learner.total_steps:
                    # 'drop': keep (1 + max_staleness) updates of tasks queued; 'wait': only the next update's
                    feeder.feed_until((step + ahead) * groups_per_step)
                    stats = learner.step()
                    step = stats["step"]
                    if step % cfg.learner.checkpoint_every == 0 or step == cfg.learner.total_steps:
                        learner.checkpoint(feeder.cursor)
                    images = (step - start_step) * groups_per_step * cfg.method.group_size
                    stats |= {
                        "streams": bus.observe(),
                        "images_per_s": images / (time.perf_counter() - started),
                    }
                    metrics_file.write(json.dumps(stats) + "\n")
                    metrics_file.flush()
                    info = (
                        f"reward {stats['reward_mean']:.3f}±{stats['reward_std']:.3f}  "
                        f"instr {stats['instruction_reward_mean']:.3f} ({stats['instruction_share']:.0%} of A)  "
                        f"clip {stats['clip_fraction']:.1%}  |r-1| {stats['ratio_deviation_p90']:.3f}  "
                        f"stale {stats['staleness_mean']:.2f}  {stats['images_per_s']:.1f} img/s"
                    )
                    progress.update(bar, completed=step, info=info)
                    if not console.is_terminal:  # job logs (ray job submit, CI) get a line per step
                        console.print(f"step {step}/{cfg.learner.total_steps}  {info}")
        except KeyboardInterrupt:
            # Ctrl-C: keep every acknowledged group; the checkpoint records what the learner has trained on
            console.print("[yellow]interrupted: checkpointing the learner and stopping the workers")
            learner.checkpoint(feeder.cursor)
            bus.request_stop()
            ray.get(worker_runs)
            raise

        # 5. stop the workers, keep the final LoRA in diffusers format
        bus.request_stop()
        ray.get(worker_runs)
        lora_dir = learner.save_final_lora(run_dir / "lora")
        save_curves(metrics_log, run_dir / "reward_curves.png")

    # 6. held-out evaluation: base editor vs base + trained LoRA
    summary = {
        "run_dir": str(run_dir),
        "steps": step,
        "lora": str(lora_dir),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if cfg.eval.num_samples:
        summary["eval"] = evaluate_base_vs_trained(cfg, lora_dir, console)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, redis_url=False, default_config=DEFAULT_RUN_CONFIG)
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_run_config(args.config, args.overrides)
    # SIGTERM (ray job stop, docker stop, kill) shuts down like Ctrl-C: checkpoint, stop workers and services
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(cfg, resume=args.resume)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m deploy.driver", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
