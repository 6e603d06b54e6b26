"""What keeps a training run alive and never silent: signal handling, restarting the processes the
driver started, and a deadline on waiting for the learner's next step.

Every recovery is counted in `rcgrpo_recoveries_total{component}` and logged in one line; every wait
past its deadline prints one line naming what is missing and where.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

from deploy.reaper import descendants, kill
from services import metrics

WATCH_INTERVAL_S = 1.0  # how often the driver's child processes are checked


class SignalStop:
    """SIGINT and SIGTERM (Ctrl-C, `ray job stop`, `docker stop`, kill). The first signal interrupts
    at once outside the training loop (KeyboardInterrupt: services are stopped on the way out) and,
    inside it, asks the loop to stop after the current step, so the checkpoint holds every step the
    metrics log has. A second signal kills the run's child processes and exits at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self.deferred = False  # True inside the training loop

    def install(self) -> None:
        """(Re)install the handlers: also after ray.init, which installs its own SIGTERM handler."""
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"rcgrpo: second {name}: killing the run's processes and exiting now", flush=True)
            kill_descendants()
            os._exit(128 + signum)
        self.received = signum
        if not self.deferred:
            raise KeyboardInterrupt(name)
        print(
            f"rcgrpo: {name}: stopping after this step (checkpoint, then stop everything); again to exit now"
        )


def kill_descendants() -> None:
    """SIGKILL every process this one started, and theirs: the private redis-server, the reward server and
    a local Ray's GCS, raylet, agents and workers (Ray's own shutdown does not run on an immediate exit)."""
    kill(descendants(os.getpid()))  # one snapshot: a child reparented after its parent dies is in it


def recovered(component: str, what: str) -> None:
    """Count and log one recovery."""
    metrics.RECOVERIES.labels(component).inc()
    print(f"rcgrpo: recovered {component}: {what}", flush=True)


class ProcessWatch:
    """A thread that restarts the driver's own child processes (the private redis-server, the embedded
    reward server) when they die, and waits with backoff for an external reward server that stops
    answering. Components reconnect by themselves (services.bus retries Redis for about a minute)."""

    def __init__(self, redis=None, reward_server=None, reward_client=None, max_restarts: int = 5):
        self.redis, self.reward_server, self.reward_client = redis, reward_server, reward_client
        self.max_restarts = max_restarts
        self.restarts: Counter[str] = Counter()
        self.failure: str | None = None  # why watching gave up: the driver stops with it
        self.reward_down_since: float | None = None  # an external reward server not answering
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-watch", daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        backoff = WATCH_INTERVAL_S
        while not self._stopping.wait(backoff):
            backoff = WATCH_INTERVAL_S
            try:
                if self.redis is not None and not self.redis.running:
                    self._restart("redis", f"redis-server on {self.redis.url} died", self.redis.restart)
                if self.reward_server is not None and not self.reward_server.running:
                    code = self.reward_server.process.poll()
                    self._restart(
                        "reward_server",
                        f"reward server {self.reward_server.url} exited with {code}",
                        self.reward_server.restart,
                    )
                elif self.reward_client is not None:
                    backoff = self._wait_for_external_reward_server()
            except Exception as error:  # a restart that failed: the driver stops with the reason
                self.failure = f"{type(error).__name__}: {error}"
                return

    def _restart(self, component: str, why: str, restart: Callable[[], None]) -> None:
        if self.restarts[component] >= self.max_restarts:
            raise RuntimeError(f"{why}; not restarting it again after {self.max_restarts} restarts")
        started = time.monotonic()
        restart()
        self.restarts[component] += 1
        recovered(component, f"{why}; restarted in {time.monotonic() - started:.1f} s")

    def _wait_for_external_reward_server(self) -> float:
        """Probe; while it does not answer, back off up to 30 s between probes. The next probe's delay."""
        if self.reward_client.ready():
            if self.reward_down_since is not None:
                down = time.monotonic() - self.reward_down_since
                self.reward_down_since = None
                self.restarts["reward_server"] += 1
                recovered(
                    "reward_server", f"{self.reward_client.http.base_url} answers again after {down:.0f} s"
                )
            return WATCH_INTERVAL_S
        if self.reward_down_since is None:
            self.reward_down_since = time.monotonic()
            print(
                f"rcgrpo: reward server {self.reward_client.http.base_url} not answering; waiting", flush=True
            )
        return min(30.0, 2.0 * max(1.0, time.monotonic() - self.reward_down_since) ** 0.5)


class StallWatch:
    """A deadline on the learner's next step: past warn_s, one line naming what is missing (repeated
    every warn_s); past abort_s, the run stops with that line as its error."""

    def __init__(self, warn_s: float, abort_s: float, describe: Callable[[], str]):
        self.warn_s, self.abort_s, self.describe = warn_s, abort_s, describe
        self.progress()

    def progress(self) -> None:
        self.since = self._warned = time.monotonic()

    def check(self) -> None:
        now = time.monotonic()
        if now - self._warned < self.warn_s:
            return
        self._warned = now
        line = f"no learner step for {now - self.since:.0f} s: {self.describe()}"
        if now - self.since >= self.abort_s:
            raise RuntimeError(f"{line}; giving up after {self.abort_s:.0f} s")
        print(f"rcgrpo: {line}", flush=True)
