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
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from deploy.reaper import start_reaper
from deploy.supervision import ProcessWatch, SignalStop, StallWatch, recovered
from services import metrics
from services.auth import TOKEN_ENV
from services.bus import RunBus
from services.config import DEFAULT_RUN_CONFIG, RunConfig, add_run_arguments, load_run_config
from services.learner_stats import progress_line
from services.process import configure_logging
from services.record import Task
from services.redis_server import EmbeddedRedis
from services.reward_client import RewardClient, RewardServerError

log = logging.getLogger("rcgrpo.driver")
REWARD_SERVER_READY_S = 120.0  # how long an external reward server may take to answer /readyz
LEARNER_POLL_S = 2.0  # the longest the driver waits on the learner before it looks at the run again
WORKER_STOP_S = 120.0  # how long rollout workers may take to finish their task once asked to stop
# A replacement actor placed on the node that took the old one down (Ray reports the actor unavailable
# before it marks the node dead) dies with that node before it runs: it is started again, this often in
# a row, within the one counted recovery
LEARNER_START_ATTEMPTS = 3
LEARNER_START_RETRY_S = 1.0
WORKER_START_ATTEMPTS = 3


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
        tasks = [self.task(i).to_fields() for i in range(self.cursor, total)]
        self.bus.tasks.publish_many(tasks)  # one round trip
        self.cursor = max(self.cursor, total)
        self.bus.set_task_cursor(self.cursor)


class LearnerHandle(Protocol):
    """What the driver asks of the learner, wherever it runs (learner.learner.Learner satisfies it too)."""

    def resume_point(self) -> tuple[int, int]:
        """Return the optimiser step and the driver's task cursor the learner continues from."""

    def publish_lora(self) -> int:
        """Publish the learner's LoRA; the policy version every worker samples with from now on."""

    def try_step(self, wait_s: float) -> dict | None:
        """Take one update and return its statistics, or None if its groups did not arrive within wait_s."""

    def checkpoint(self, task_cursor: int) -> object:
        """Checkpoint, recording how many tasks the driver has fed."""

    def save_final_lora(self, directory: Path) -> Path:
        """Write the trained LoRA in diffusers format to `directory` and return its path."""


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

    def try_step(self, wait_s: float) -> dict | None:
        return self._call(self.actor.try_step, wait_s)

    def checkpoint(self, task_cursor: int) -> object:
        return self._call(self.actor.checkpoint, task_cursor)

    def save_final_lora(self, directory: Path) -> Path:
        return self._call(self.actor.save_final_lora, directory)


class ExternalLearner:
    """A learner running as its own process (`rcgrpo learner`, learner.external): followed through Redis.
    It publishes its weights, checkpoints (with the task cursor the driver records) and saves its LoRA itself."""

    def __init__(self, bus: RunBus, poll_s: float = 0.2, deadline_s: float = 900.0):
        self.bus, self.poll_s, self.deadline_s = bus, poll_s, deadline_s
        self.step_seen = self.resume_point()[0]  # the newest step this driver has been told of

    def _wait(self, ready, wait_s: float | None = None, what: str = ""):
        """Poll ready() until it returns a value and return it. With wait_s, return None once wait_s has
        passed; without, raise an error naming `what` once deadline_s has."""
        deadline = time.monotonic() + (self.deadline_s if wait_s is None else wait_s)
        while (value := ready()) is None:
            if time.monotonic() > deadline:
                if wait_s is not None:
                    return None
                raise RuntimeError(
                    f"no {what} from the external learner in {self.deadline_s:.0f} s: is `rcgrpo learner` "
                    f"running on this run's Redis ({self.bus.redis_url})?"
                )
            time.sleep(self.poll_s)
        return value

    def resume_point(self) -> tuple[int, int]:
        stats = self.bus.learner_stats()
        return (0 if stats is None else stats["step"]), self.bus.task_cursor()

    def publish_lora(self) -> int:
        return self._wait(self.bus.lora.latest, what="published policy version").policy_version

    def try_step(self, wait_s: float) -> dict | None:
        def newer_stats():
            stats = self.bus.learner_stats()
            return stats if stats is not None and stats["step"] > self.step_seen else None

        if (stats := self._wait(newer_stats, wait_s)) is not None:
            self.step_seen = stats["step"]
        return stats

    def checkpoint(self, task_cursor: int) -> None:
        """The external learner checkpoints on its own schedule."""

    def save_final_lora(self, directory: Path) -> Path:
        return self._wait(
            lambda: directory if (directory / "pytorch_lora_weights.safetensors").exists() else None,
            what=f"final LoRA in {directory}",
        )


class MetricsLog:
    """metrics.jsonl: one line per optimiser step. A learner that restarts from a checkpoint redoes the
    steps after it, so those lines are dropped first: every step appears exactly once."""

    def __init__(self, path: Path):
        self.path = path

    def keep_through(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, stats: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(stats) + "\n")


class RunActors:
    """The run's Ray actors, the learner (unless learner.external) and the rollout workers, restarted
    when they die, at most learner.max_restarts times each kind."""

    def __init__(self, cfg: RunConfig, redis_url: str, bus: RunBus):
        import ray

        from learner.learner import Learner
        from rollout_worker.worker import RolloutWorker

        self.cfg, self.redis_url, self.bus = cfg, redis_url, bus
        self._learner_cls = ray.remote(num_cpus=0, num_gpus=cfg.learner.num_gpus)(Learner)
        self._worker_cls = ray.remote(
            num_cpus=cfg.rollout.cpus_per_worker, num_gpus=cfg.rollout.gpus_per_worker
        )(RolloutWorker)
        self._learner_actor = None
        self.workers: dict[str, tuple] = {}  # worker id -> (index, actor, its run() call, its ready call)
        # worker id -> its replacements in a row that died before they ran
        self._never_ran: Counter[str] = Counter()
        self.restarts: Counter[str] = Counter()
        self._refusals_seen = set(bus.rejected_loras())  # a resumed run publishes a new version anyway

    def _count_restart(self, component: str, why: str) -> None:
        if self.restarts[component] >= self.cfg.learner.max_restarts:
            raise RuntimeError(f"{why}; not restarting it again after {self.restarts[component]} restarts")
        self.restarts[component] += 1

    # -- the learner ------------------------------------------------------------------------------
    def start_learner(self, resume: bool) -> LearnerHandle:
        if self.cfg.learner.external:
            return ExternalLearner(self.bus, deadline_s=self.cfg.learner.stall_abort_s)
        port = self.cfg.learner.metrics_port
        self._learner_actor = self._learner_cls.remote(self.cfg, self.redis_url, resume, metrics_port=port)
        return RayLearner(self._learner_actor)

    def restart_learner(self, error: Exception) -> tuple[LearnerHandle, int]:
        """Start a new learner actor from the run's latest checkpoint (from the start if there is none yet)
        and have it publish its weights; return it with the step it continues from."""
        import ray

        from learner.checkpoint import latest_checkpoint

        why = f"the learner actor died ({type(error).__name__})"
        self._count_restart("learner", why)
        started = time.monotonic()
        resume = latest_checkpoint(self.cfg.run_dir / "checkpoints") is not None
        for attempt in range(1, LEARNER_START_ATTEMPTS + 1):
            ray.kill(self._learner_actor, no_restart=True)
            learner = self.start_learner(resume=resume)
            try:
                step, _ = learner.resume_point()
                break
            except ray.exceptions.RayActorError as start_error:
                # its node died under it (a whole Ray node lost, not yet marked dead when it was placed);
                # Ray places the next one on a live node
                if attempt == LEARNER_START_ATTEMPTS:
                    raise
                print(
                    f"rcgrpo: the new learner actor died before it ran ({type(start_error).__name__}); "
                    "starting another",
                    flush=True,
                )
                time.sleep(LEARNER_START_RETRY_S)
        version = learner.publish_lora()
        recovered(
            "learner",
            f"{why}; restarted from step {step} as v{version} in {time.monotonic() - started:.1f} s",
        )
        return learner, step

    def republish_rejected_lora(self, learner: LearnerHandle) -> None:
        """Workers refused a policy version (it failed verification) and kept their verified weights. If
        it is still the latest, the learner publishes its weights again as a new version; a newer
        version may already have superseded it. Either way the refusal is counted and logged once."""
        if self.cfg.learner.external:  # its own process publishes; the stall message names the reason
            return
        refused = {v: r for v, r in self.bus.rejected_loras().items() if v not in self._refusals_seen}
        if not refused:  # the common case: one HGETALL per loop
            return
        latest = self.bus.lora.latest_version()
        for version, reason in sorted(refused.items()):
            self._refusals_seen.add(version)
            self._count_restart("policy_version", f"workers refuse policy v{version}: {reason}")
            if version == latest:
                recovered(
                    "policy_version",
                    f"v{version} refused ({reason}); republished as v{learner.publish_lora()}",
                )
            else:
                recovered("policy_version", f"v{version} refused ({reason}); superseded by v{latest}")

    # -- the rollout workers ----------------------------------------------------------------------
    def start_workers(self) -> None:
        for i in range(self.cfg.rollout.num_workers):
            self._start_worker(i)

    def _start_worker(self, i: int) -> None:
        port = self.cfg.rollout.metrics_port + i if self.cfg.rollout.metrics_port else 0
        worker_id = f"worker-{i}"
        actor = self._worker_cls.remote(self.cfg, self.redis_url, worker_id, port)
        ready = actor.__ray_ready__.remote()  # first: the actor runs its calls in order, and run() loops
        self.workers[worker_id] = (i, actor, actor.run.remote(), ready)

    def alive_workers(self) -> int:
        import ray

        return sum(not ray.wait([run], timeout=0)[0] for _, _, run, _ in self.workers.values())

    def restart_dead_workers(self) -> None:
        """Replace each worker whose loop ended before the run asked it to stop (its actor died or raised);
        the new one first finishes the task the old one left pending."""
        import ray

        for worker_id, (i, actor, run, ready) in list(self.workers.items()):
            if not ray.wait([run], timeout=0)[0]:
                continue
            try:
                ray.get(run)
                why = f"{worker_id} stopped"
            except ray.exceptions.RayError as error:
                why = f"{worker_id} died ({type(error).__name__})"
            if self._died_before_it_ran(ready) and self._never_ran[worker_id] < WORKER_START_ATTEMPTS:
                # its node died under it (a whole Ray node lost, not yet marked dead when it was placed)
                self._never_ran[worker_id] += 1
                ray.kill(actor, no_restart=True)
                self._start_worker(i)
                print(
                    f"rcgrpo: the new actor of {worker_id} died before it ran: starting another", flush=True
                )
                continue
            self._never_ran[worker_id] = 0
            self._count_restart("rollout_worker", why)
            started = time.monotonic()
            ray.kill(actor, no_restart=True)
            self._start_worker(i)
            recovered("rollout_worker", f"{why}; restarted in {time.monotonic() - started:.1f} s")

    @staticmethod
    def _died_before_it_ran(ready) -> bool:
        """Whether an actor that died never finished starting (its creation did not fail: that is a crash
        of its own, counted like any other)."""
        import ray

        if not ray.wait([ready], timeout=0)[0]:
            return True
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError as error:
            return not error.actor_init_failed
        except ray.exceptions.RayError:
            return True
        return False

    def stop_workers(self, timeout_s: float) -> None:
        """Set the run's stop flag and wait for every worker's loop to end; kill those that do not."""
        import ray

        self.bus.request_stop()
        runs = {run: (worker_id, actor) for worker_id, (_, actor, run, _) in self.workers.items()}
        done, late = ray.wait(list(runs), num_returns=len(runs), timeout=timeout_s)
        for run in done:
            try:
                ray.get(run)
            except ray.exceptions.RayError as error:  # its groups are in Redis; nothing is waiting on it
                log.warning("%s ended with %s", runs[run][0], type(error).__name__)
        for run in late:
            worker_id, actor = runs[run]
            print(f"rcgrpo: {worker_id} did not stop within {timeout_s:.0f} s: killed", flush=True)
            ray.kill(actor, no_restart=True)


def describe_wait(bus: RunBus, feeder: TaskFeeder, reward_client: RewardClient, actors: RunActors) -> str:
    """What the learner is waiting for, and where: the line a stalled run prints."""
    causes = []
    if not reward_client.ready():
        causes.append(f"reward server {reward_client.http.base_url} not answering")
    if rejected := bus.rejected_lora():
        causes.append(f"workers refuse policy v{rejected[0]} ({rejected[1]})")
    alive = actors.alive_workers()
    if actors.workers and not alive:
        causes.append("no rollout worker is running")
    counts = (
        f"tasks issued {feeder.cursor}, groups consumed {bus.groups_consumed()}, lost {bus.groups_lost()}; "
        f"pending: tasks {bus.tasks.pending_count()} ({alive} workers), rollouts {bus.rollouts.pending_count()} "
        f"(reward server), scored {bus.scored.pending_count()} (learner)"
    )
    return "; ".join([*causes, counts]) if causes else f"no scored group arrived; {counts}"


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


def check_before_start(cfg: RunConfig) -> None:
    """Refuse, in seconds and before any service starts, what can be checked without them."""
    from rcgrpo.data.loading import parse_data_spec
    from rcgrpo.editor import check_editor_dir
    from services.tracking import check_backends

    try:
        check_editor_dir(cfg.editor)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"editor: {error}") from None
    try:
        parse_data_spec(cfg.data.source)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"data.source: {error}".replace("--data: ", "")) from None
    if cfg.learner.stall_abort_s < cfg.learner.stall_warn_s:
        raise ValueError("learner.stall_abort_s must be >= learner.stall_warn_s")
    check_backends(cfg.logging)


def checkpoint(learner: LearnerHandle, task_cursor: int, last: bool) -> None:
    """Have the learner checkpoint. One that cannot be written (a full volume) leaves the previous one
    intact and is said in one line: the run goes on (the groups since stay unacknowledged, and the next
    checkpoint tries again), unless it was the run's last, which stops the run with that line."""
    from learner.checkpoint import CheckpointError

    try:
        learner.checkpoint(task_cursor)
    except Exception as error:
        cause = getattr(error, "cause", error)  # a Ray task's error carries the learner's
        if not isinstance(cause, CheckpointError):
            raise
        if last:
            raise RuntimeError(f"{cause}; `rcgrpo train --resume` continues from it") from None
        print(f"rcgrpo: {cause}; training goes on, the next checkpoint tries again", flush=True)


def _has_checkpoint(run_dir: Path) -> bool:
    return any(run_dir.glob("checkpoints/step_*"))


def choose_run(cfg: RunConfig, resume: bool) -> RunConfig:
    """The run's name and so its directory and Redis keys. A new run never reuses a directory: if
    runs/<name> exists it becomes <name>-2, -3, ... With --resume, the newest of those with a checkpoint."""
    from learner.checkpoint import latest_checkpoint

    names = [cfg.name, *(f"{cfg.name}-{i}" for i in range(2, 1000))]
    existing = [name for name in names if (cfg.runs_dir / name).exists()]
    if resume:
        resumable = [name for name in existing if _has_checkpoint(cfg.runs_dir / name)]
        if not resumable:
            raise FileNotFoundError(f"--resume: no checkpoint under {cfg.runs_dir / cfg.name}/checkpoints")
        latest = latest_checkpoint(cfg.runs_dir / resumable[-1] / "checkpoints")
        done = json.loads((latest / "state.json").read_text())["step"]
        cfg.learner.check_resumable(str(latest), done)
        return cfg.model_copy(update={"name": resumable[-1]})
    name = next(name for name in names if not (cfg.runs_dir / name).exists())
    return cfg.model_copy(update={"name": name})


def init_ray(cfg: RunConfig) -> None:
    """Connect to cfg.ray_address (else RAY_ADDRESS), or start a local Ray that can place the run's actors."""
    import ray

    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    start_reaper()  # a local Ray's processes are the driver's: they must not outlive it
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except BaseException:
        ray.shutdown()  # a local Ray that failed half-way must not leave its GCS and raylet behind
        raise
    if address == "local":  # actors that cannot all be placed would wait for CPUs forever
        try:
            check_local_cpus(cfg, ray.cluster_resources().get("CPU", 0))
        except ValueError:
            ray.shutdown()
            raise


def run(cfg: RunConfig, resume: bool = False, signals: SignalStop | None = None) -> dict:
    """Run one training run to its end and return its summary: check it, start Redis, the reward server
    and the Ray actors, train until learner.total_steps (or a signal), then evaluate and report."""
    import ray
    from rich.console import Console

    from deploy.commands.plan import check_fits
    from deploy.report import save_curves
    from services.tracking import Tracker

    console = Console()
    check_fits(cfg)  # a run that cannot fit its GPUs fails here, before anything starts
    check_before_start(cfg)
    asked = cfg.name
    cfg = choose_run(cfg, resume)
    run_dir = cfg.run_dir
    if cfg.name != asked and not resume:
        console.print(
            f"{cfg.runs_dir / asked} exists: this run is [bold]{run_dir}[/] (--resume continues it)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    start_reaper()  # before Redis and the reward server start: nothing the run starts outlives the driver
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    tracker = Tracker(cfg)  # logging.backends beside metrics.jsonl; closed, marked failed, if the run fails
    installed_signals, signals = signals is not None, signals or SignalStop()
    if cfg.driver_metrics_port:  # rcgrpo_recoveries_total, counted here
        metrics.serve_metrics(cfg.driver_metrics_port, cfg.metrics_host)

    with tracker.closed_on_error(), ExitStack() as stack:
        # 1. Redis: the given server, else a private one whose append-only file lives in the run dir
        redis_url, embedded_redis = _start_redis(cfg, stack)
        bus = RunBus(cfg, redis_url)
        bus.clear_stop()

        # 2. the reward server, consuming the rollouts stream; every group carries the run's rewards and
        # weights, so any server that serves those rewards scores it as the run asks
        reward_server, reward_client = _start_reward_server(cfg, redis_url, stack)
        check_served_rewards(cfg, reward_client)

        # 3. Ray: rollout actors and the learner actor
        if not ray.is_initialized():  # a study runs many runs in one Ray it started itself
            init_ray(cfg)
            stack.callback(ray.shutdown)
        if installed_signals:
            signals.install()  # ray.init replaced our SIGTERM handler with its own
        actors = RunActors(cfg, redis_url, bus)
        learner = actors.start_learner(resume)
        start_step, cursor = learner.resume_point()
        # tasks fed after the checkpoint are in Redis already: never issue a group id twice
        cursor = max(cursor, bus.task_cursor())
        metrics_log.keep_through(start_step)
        version = learner.publish_lora()  # every worker samples with this or newer
        console.print(
            f"[bold]rcgrpo[/] run {cfg.name!r}: {cfg.rollout.num_workers} workers, policy v{version}, step {start_step}"
        )
        actors.start_workers()

        # 4. the loop: keep tasks ahead of the learner's consumption, one learner update per step
        feeder = TaskFeeder(bus, cfg.data.num_samples, cfg.data.seed, cursor)
        watch = stack.enter_context(
            ProcessWatch(
                embedded_redis,
                reward_server,
                reward_client if reward_server is None else None,  # external: waited for, not restarted
                cfg.learner.max_restarts,
                redis_url if embedded_redis is None else None,  # the same
            )
        )
        stall = StallWatch(
            cfg.learner.stall_warn_s,
            cfg.learner.stall_abort_s,
            lambda: describe_wait(bus, feeder, reward_client, actors),
        )
        loop = TrainingLoop(cfg, bus, actors, feeder, watch, stall, metrics_log, tracker, console)
        signals.deferred = True
        learner, step = loop.run(learner, start_step, signals)
        signals.deferred = False

        # 5. stop the workers; on a signal, checkpoint what was trained and stop; else keep the final LoRA
        if signals.requested:
            console.print("[yellow]interrupted: checkpointing the learner and stopping the workers")
            checkpoint(learner, feeder.cursor, last=True)
            actors.stop_workers(WORKER_STOP_S)
            raise KeyboardInterrupt(signal.Signals(signals.received).name)
        actors.stop_workers(WORKER_STOP_S)
        lora_dir = learner.save_final_lora(run_dir / "lora")
        save_curves(metrics_log.path, run_dir / "reward_curves.png")
        recoveries = {**actors.restarts, **watch.restarts}

    # 6. held-out evaluation: base editor vs base + trained LoRA
    summary = {
        "run_dir": str(run_dir),
        "steps": step,
        "lora": str(lora_dir),
        "seconds": round(time.perf_counter() - loop.started, 1),
        "recoveries": recoveries,
    }
    return _evaluate_and_report(cfg, summary, tracker, console)


def _start_redis(cfg: RunConfig, stack: ExitStack) -> tuple[str, EmbeddedRedis | None]:
    """The run's Redis URL: redis_url or REDIS_URL, else a private server (returned too, to be watched)
    whose append-only file lives in the run dir."""
    redis_url = cfg.resolved_redis_url()
    if redis_url is not None:
        return redis_url, None
    embedded = stack.enter_context(EmbeddedRedis(data_dir=cfg.run_dir / "redis"))
    return embedded.url, embedded


def _start_reward_server(cfg: RunConfig, redis_url: str, stack: ExitStack):
    """The run's reward server and a client of it: reward.url (or RCGRPO_REWARD_URL), waited for until
    ready, else a server started for the run (returned too, to be watched and restarted)."""
    from deploy.reward_process import RewardServerProcess

    reward_url = cfg.reward.url or os.environ.get("RCGRPO_REWARD_URL")
    if reward_url is None:
        server = RewardServerProcess(cfg, redis_url, cfg.run_dir / "reward_server.log")
        stack.callback(server.stop)
        server.wait_ready()
        return server, server.client
    client = stack.enter_context(RewardClient(reward_url, token=os.environ.get(TOKEN_ENV)))
    try:
        client.wait_ready(timeout_s=REWARD_SERVER_READY_S)
    except RewardServerError as error:
        raise ValueError(f"reward.url / RCGRPO_REWARD_URL: {error}") from None
    return None, client


@dataclass
class TrainingLoop:
    """The driver's loop: keep tasks ahead of the learner, have it update, checkpoint on schedule,
    recover what died, and log and show each step."""

    cfg: RunConfig
    bus: RunBus
    actors: RunActors
    feeder: TaskFeeder
    watch: ProcessWatch
    stall: StallWatch
    metrics_log: MetricsLog
    tracker: object  # services.tracking.Tracker
    console: object  # rich.console.Console
    started: float = field(default_factory=time.perf_counter)

    def run(self, learner: LearnerHandle, step: int, signals: SignalStop) -> tuple[LearnerHandle, int]:
        """Train from `step` until learner.total_steps or a signal; return the learner (a restarted one
        if it died) and the step reached."""
        import ray
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        cfg, bus, actors, feeder = self.cfg, self.bus, self.actors, self.feeder
        total, groups_per_step = cfg.learner.total_steps, cfg.learner.groups_per_step
        ahead = 1 if cfg.learner.staleness_policy == "wait" else 1 + cfg.learner.max_staleness
        start_step = step
        columns = [
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Progress(*columns, console=self.console) as progress:
            bar = progress.add_task("train", total=total, completed=step, info="")
            while step < total and not signals.requested:
                # supply follows consumption: each group trained on, dropped (stale) or dead-lettered is
                # replaced, so (1 + max_staleness) updates of groups ('wait': one update's) stay in flight
                feeder.feed_until(bus.groups_consumed() + bus.groups_lost() + ahead * groups_per_step)
                # a dead worker is replaced even while the others keep the learner fed
                actors.restart_dead_workers()
                actors.republish_rejected_lora(learner)  # a refused version: republished, or superseded
                try:
                    stats = learner.try_step(wait_s=LEARNER_POLL_S)
                    if stats is not None and cfg.learner.checkpoint_due(stats["step"]):
                        checkpoint(learner, feeder.cursor, last=stats["step"] == total)
                except ray.exceptions.RayActorError as error:
                    # the learner died: a new one continues from its checkpoint, redoing the steps after it
                    learner, step = actors.restart_learner(error)
                    self.metrics_log.keep_through(step)
                    progress.update(bar, completed=step)
                    continue
                if stats is None:
                    # no update yet: past the deadline, say what is missing
                    if self.watch.failure:
                        raise RuntimeError(f"the run cannot continue: {self.watch.failure}")
                    self.stall.check()
                    continue
                self.stall.progress()
                step = stats["step"]
                if "publish_error" in stats:  # the workers go on with the latest version
                    print(f"rcgrpo: {stats['publish_error']}", flush=True)
                images = (step - start_step) * groups_per_step * cfg.method.group_size
                stats |= {
                    "time": time.time(),  # wall clock (Unix seconds), so a run's pace reads from the log
                    "streams": bus.observe(),
                    "images_per_s": images / (time.perf_counter() - self.started),
                }
                self.metrics_log.write(stats)
                self.tracker.log_step(stats)
                info = progress_line(stats)
                progress.update(bar, completed=step, info=info)
                if not self.console.is_terminal:  # job logs (ray job submit, CI) get a line per step
                    self.console.print(f"step {step}/{total}  {info}")
        return learner, step


def _evaluate_and_report(cfg: RunConfig, summary: dict, tracker, console) -> dict:
    """Score the base editor against the trained LoRA on held-out samples, write the LoRA's model card
    and summary.json, and return the summary."""
    from deploy.evaluation import evaluate_base_vs_trained
    from services.model_card import write_model_card

    with tracker:
        if cfg.eval.num_samples:
            summary["eval"] = evaluate_base_vs_trained(cfg, Path(summary["lora"]), console)
        # after the evaluation: the card shows its table and grid
        write_model_card(cfg, Path(summary["lora"]), summary["steps"])
        tracker.log_evaluation(summary["steps"], summary.get("eval"))
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, redis_url=False, default_config=DEFAULT_RUN_CONFIG)
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")


def main(args: argparse.Namespace) -> int:
    configure_logging(logging.WARNING)
    cfg = load_run_config(args.config, args.overrides)
    # SIGTERM (ray job stop, docker stop, kill) shuts down like Ctrl-C: checkpoint, stop workers and services
    signals = SignalStop()
    signals.install()
    try:
        run(cfg, resume=args.resume, signals=signals)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as error:  # a run that could not recover: its one-line reason, not a traceback
        print(f"rcgrpo train: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m deploy.driver", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
