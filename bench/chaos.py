"""Chaos suite of the whole run: `rcgrpo train` (tiny config, private Redis, local Ray, embedded reward
server) with one fault at a time, then the checks that make a run trustworthy.

Faults (injected once the run has written --fault-at steps to metrics.jsonl):
  none            no fault (the baseline's wall time)
  reward_server   SIGKILL the reward-server child
  rollout_worker  SIGKILL one rollout-worker actor process
  learner         SIGKILL the learner actor process
  redis           SIGKILL the private redis-server
  driver_sigterm  SIGTERM the driver (as `ray job stop` / `docker stop` do), then `rcgrpo train --resume`
  driver_twice    SIGTERM the driver twice (it exits at once, no checkpoint of its own), then --resume
  driver_sigkill  SIGKILL the driver (the OOM killer's way): its reaper kills what it started; then --resume
  corrupt_lora    flip a byte of the newest LoRA blob in Redis as soon as it is published

Checks, per case: the run exits 0 having reached total_steps; metrics.jsonl has every step exactly once;
no group id is trained twice (group_signal rows); no acknowledged group is lost (read back from the
run's append-only file: every task a worker acknowledged has its rollout group, every group the reward
server acknowledged has its scored group, every scored group the learner acknowledged is in its last
checkpoint, and every scored group not trained yet still has its training tensors); the final LoRA,
reward curves and summary exist; no process the run started is left (after a SIGKILLed driver: within
DRIVER_SIGKILL_GRACE_S, timed). Recovery time: from the fault to the first step line written after it
(the driver faults: from the resume's start).

    .venv/bin/python bench/chaos.py [--faults reward_server learner ...] [--steps 12] [--fault-at 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from run_checks import StepWatch, check_run

ROOT = Path(__file__).resolve().parents[1]
FAULTS = (
    "none",
    "reward_server",
    "rollout_worker",
    "learner",
    "redis",
    "driver_sigterm",
    "driver_twice",
    "driver_sigkill",
    "corrupt_lora",
)
# how the driver exits on each driver fault: 130 after a graceful stop, 128 + SIGTERM when told twice
# (a SIGKILLed one: Popen's -9)
DRIVER_EXIT = {"driver_sigterm": 130, "driver_twice": 128 + signal.SIGTERM, "driver_sigkill": -signal.SIGKILL}
DRIVER_SIGKILL_GRACE_S = 5.0  # how long what a SIGKILLed driver started may outlive it
RUN_NAME = "chaos"
# a run small enough for a 2-core CI machine (the test suite's whole-run cases)
SMALL_RUN = [
    "method.group_size=4",
    "method.num_steps=4",
    "method.anchors=2",
    "method.steps_per_anchor=2",
    "data.num_samples=16",
]
# the recovery counter (summary.json "recoveries", rcgrpo_recoveries_total) each fault must raise
COUNTED = {
    "reward_server": "reward_server",
    "rollout_worker": "rollout_worker",
    "learner": "learner",
    "redis": "redis",
    "corrupt_lora": "policy_version",
}


@dataclass
class CaseResult:
    fault: str
    problems: list[str] = field(default_factory=list)
    recovery_s: float | None = None
    wall_s: float = 0.0
    recoveries: dict = field(default_factory=dict)
    cleanup_s: float | None = None  # driver faults: from the driver's exit to no process of it left
    started: list[str] = field(default_factory=list)  # the processes the faulted run had started

    @property
    def passed(self) -> bool:
        return not self.problems


class TrainProcess:
    """`rcgrpo train` as a child process, with every process it starts remembered (for the leftovers check)."""

    def __init__(
        self, runs_dir: Path, overrides: list[str], resume: bool = False, log_name: str = "train.log"
    ):
        command = [sys.executable, "-m", "deploy.cli", "train", "--set", f"runs_dir={runs_dir}"]
        command += [arg for item in overrides for arg in ("--set", item)] + (["--resume"] if resume else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        # a loaded machine can take longer than Ray's default 30 s to start the raylet's agent
        env.setdefault("RAY_agent_register_timeout_ms", "180000")
        env.pop("REDIS_URL", None)  # a private Redis, so the faults hit only this run
        env.pop("RAY_ADDRESS", None)
        self.log = runs_dir / log_name
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        self.root = psutil.Process(self.process.pid)
        self.started: dict[int, psutil.Process] = {}
        self.labels: dict[int, str] = {}  # pid -> its name and command line, read while it was alive

    def descendants(self) -> list[psutil.Process]:
        try:
            found = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            found = []
        for process in found:
            try:  # read each time: a child between its fork and its exec still has its parent's
                # the name first: a deep install path can push a binary's name past the cut
                self.labels[process.pid] = f"{process.name()}: {' '.join(process.cmdline())[:80]}"
            except psutil.Error:
                continue
            self.started.setdefault(process.pid, process)
        return found

    def find(self, match) -> psutil.Process | None:
        for process in self.descendants():
            try:
                if match(" ".join(process.cmdline()), process.name()):
                    return process
            except psutil.Error:
                continue
        return None

    def wait(self, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None and time.monotonic() < deadline:
            self.descendants()
            time.sleep(0.5)
        return self.process.poll()

    def left_behind(self, grace_s: float = 20.0) -> list[str]:
        """Processes this run started that are still alive grace_s after it exited."""
        deadline = time.monotonic() + grace_s
        while True:
            alive = []
            for process in self.started.values():
                try:
                    if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{process.pid} {self.labels[process.pid]}")
                except psutil.NoSuchProcess:
                    continue
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)

    def kill_all(self) -> None:
        for process in [*self.started.values(), self.root]:
            try:
                process.kill()
            except psutil.Error:
                pass


def run_redis_client(train: TrainProcess):
    import redis

    server = train.find(lambda cmd, name: name == "redis-server" or "redis-server" in cmd)
    if server is None:
        raise RuntimeError("no redis-server process found under the driver")
    # redis-server rewrites its own argv ("redis-server 127.0.0.1:PORT"), so read the listening socket
    [port] = {c.laddr.port for c in server.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    return redis.Redis(host="127.0.0.1", port=port)


def corrupt_next_lora(train: TrainProcess, timeout_s: float = 120.0) -> str:
    """Wait for the next published policy version and flip the last byte of its blob."""
    client = run_redis_client(train)
    from services.keys import RunKeys

    namespace = RunKeys(RUN_NAME).lora
    first = int(client.get(f"{namespace}:latest"))
    deadline = time.monotonic() + timeout_s
    while (latest := int(client.get(f"{namespace}:latest"))) == first:
        if time.monotonic() > deadline:
            raise TimeoutError("no new policy version to corrupt")
        time.sleep(0.005)
    key = client.hget(f"{namespace}:version:{latest}", "key")
    data = bytearray(client.get(key))
    data[-1] ^= 0xFF
    client.set(key, bytes(data))
    return f"v{latest}"


def inject(fault: str, train: TrainProcess) -> str:
    """Apply `fault` to the running train process; what was hit."""
    targets = {
        "reward_server": lambda cmd, name: "reward-server" in cmd,
        "rollout_worker": lambda cmd, name: cmd.startswith("ray::RolloutWorker"),
        "learner": lambda cmd, name: cmd.startswith("ray::Learner"),
        "redis": lambda cmd, name: name == "redis-server",
    }
    if fault == "driver_sigkill":
        train.process.kill()
        return f"driver {train.process.pid}"
    if fault in DRIVER_EXIT:
        train.process.send_signal(signal.SIGTERM)
        if fault == "driver_twice":
            time.sleep(1.0)
            train.process.send_signal(signal.SIGTERM)
        return f"driver {train.process.pid}"
    if fault == "corrupt_lora":
        return corrupt_next_lora(train)
    process = train.find(targets[fault])
    if process is None:
        raise RuntimeError(f"no {fault} process found under the driver")
    hit = f"{process.pid} {' '.join(process.cmdline())[:60]}"
    process.kill()
    return hit


def run_case(
    fault: str,
    workdir: Path,
    steps: int = 12,
    fault_at: int = 5,
    overrides: list[str] = (),
    timeout_s: float = 900.0,
) -> CaseResult:
    runs_dir = workdir / fault
    runs_dir.mkdir(parents=True)
    overrides = [
        f"name={RUN_NAME}",
        f"learner.total_steps={steps}",
        f"learner.checkpoint_every={max(1, fault_at - 1)}",
        "eval.num_samples=0",
        *overrides,
    ]
    result = CaseResult(fault)
    watch = StepWatch(runs_dir / RUN_NAME / "metrics.jsonl")
    started = time.monotonic()
    train = TrainProcess(runs_dir, overrides)
    trains = [train]
    try:
        while watch.steps() < fault_at:
            if train.process.poll() is not None or time.monotonic() - started > timeout_s:
                result.problems.append(
                    f"run ended or stalled before step {fault_at}: rc {train.process.poll()}"
                )
                return result
            train.descendants()
            time.sleep(0.25)
        watch.new_lines()
        hit = inject(fault, train) if fault != "none" else "nothing"
        faulted = time.monotonic()
        print(f"  {fault}: hit {hit} at step {watch.steps()}", flush=True)
        if fault in DRIVER_EXIT:
            rc = train.wait(timeout_s=120)
            exited = time.monotonic()
            print(f"  {fault}: driver exited {rc} {exited - faulted:.1f} s after the signal", flush=True)
            if rc != DRIVER_EXIT[fault]:
                result.problems.append(f"driver exited {rc} on {fault}, not {DRIVER_EXIT[fault]}")
            left = train.left_behind(DRIVER_SIGKILL_GRACE_S if fault == "driver_sigkill" else 20.0)
            result.problems += [f"left behind after {fault}: {p}" for p in left]
            if not left:
                result.cleanup_s = round(time.monotonic() - exited, 1)
            result.started = sorted(train.labels.values())
            watch.new_lines()  # the step the stopping driver finished is not the resume's
            train = TrainProcess(runs_dir, overrides, resume=True, log_name="resume.log")
            trains.append(train)
            faulted = time.monotonic()
        while watch.new_lines() == 0 and train.process.poll() is None:
            train.descendants()
            if time.monotonic() - faulted > timeout_s:
                break
            time.sleep(0.25)
        if watch.seen and train.process.poll() in (None, 0):
            result.recovery_s = round(time.monotonic() - faulted, 1)
        rc = train.wait(timeout_s=max(0.0, timeout_s - (time.monotonic() - started)))
        result.wall_s = round(time.monotonic() - started, 1)
        if rc != 0:
            result.problems.append(f"rcgrpo train exited {rc} (see {train.log})")
        result.problems += [f"left behind: {p}" for p in train.left_behind()]
        summary = runs_dir / RUN_NAME / "summary.json"
        if summary.exists():
            result.recoveries = json.loads(summary.read_text()).get("recoveries", {})
            if fault in COUNTED and not result.recoveries.get(COUNTED[fault]):
                result.problems.append(f"the {COUNTED[fault]} recovery was not counted")
        if rc == 0:
            result.problems += check_run(runs_dir / RUN_NAME, steps)
        return result
    finally:
        for one in trains:
            one.kill_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--fault-at", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temp dir, kept)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the case's run too (the finally below)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rcgrpo-chaos-"))
    print(f"chaos suite: {args.steps} steps, fault at step {args.fault_at}, runs under {workdir}")
    results = []
    for fault in args.faults:
        result = run_case(fault, workdir, args.steps, args.fault_at, args.overrides)
        results.append(result)
        print(f"  {fault}: {'PASS' if result.passed else 'FAIL'} recovery {result.recovery_s} s, "
              f"wall {result.wall_s} s, recoveries {result.recoveries}, cleanup {result.cleanup_s} s "
              f"{result.problems}", flush=True)  # fmt: skip
    print(
        "\n| fault | result | recovery (s) | run wall time (s) | recoveries counted | cleanup (s) | problems |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        counted = ", ".join(f"{k} {v}" for k, v in r.recoveries.items()) or "-"
        problems = "; ".join(r.problems) or "-"
        print(
            f"| {r.fault} | {'pass' if r.passed else 'FAIL'} | {r.recovery_s} | {r.wall_s} | {counted} "
            f"| {r.cleanup_s if r.cleanup_s is not None else '-'} | {problems} |"
        )
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
