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

import redis

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


class Outage:
    """A service the run does not start but waits for (an external reward server or Redis): probed every
    WATCH_INTERVAL_S, and while it does not answer with backoff up to 30 s; one line when it stops
    answering, a counted recovery when it answers again."""

    def __init__(self, component: str, kind: str, url: str, ready: Callable[[], bool]):
        self.component, self.kind, self.url, self.ready = component, kind, url, ready
        self.down_since: float | None = None
        self._next_probe = 0.0

    def check(self, restarts: Counter[str]) -> None:
        if time.monotonic() < self._next_probe:
            return
        if self.ready():
            if self.down_since is not None:
                down = time.monotonic() - self.down_since
                self.down_since = None
                restarts[self.component] += 1
                recovered(self.component, f"{self.url} answers again after {down:.0f} s")
            self._next_probe = time.monotonic() + WATCH_INTERVAL_S
            return
        if self.down_since is None:
            self.down_since = time.monotonic()
            print(f"rcgrpo: {self.kind} {self.url} not answering; waiting", flush=True)
        backoff = min(30.0, 2.0 * max(1.0, time.monotonic() - self.down_since) ** 0.5)
        self._next_probe = time.monotonic() + backoff


def redis_answers(url: str) -> Callable[[], bool]:
    """A probe of the Redis at `url`: PING on a connection of its own that gives up after 2 s, where the
    components' connections wait (a partition blocks them without an error)."""
    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    return ready


class ProcessWatch:
    """A thread that restarts the driver's own child processes (the private redis-server, the embedded
    reward server) when they die, and waits for an external reward server or an external Redis that
    stops answering, saying so. Components reconnect by themselves (services.bus retries Redis for
    about a minute)."""

    def __init__(
        self,
        redis=None,
        reward_server=None,
        reward_client=None,
        max_restarts: int = 5,
        redis_url: str | None = None,
    ):
        self.redis, self.reward_server = redis, reward_server
        self.max_restarts = max_restarts
        self.restarts: Counter[str] = Counter()
        self.failure: str | None = None  # why watching gave up: the driver stops with it
        self.outages: list[Outage] = []
        if reward_client is not None:
            url = reward_client.http.base_url
            self.outages.append(Outage("reward_server", "reward server", str(url), reward_client.ready))
        if redis_url is not None:
            self.outages.append(Outage("redis", "Redis", redis_url, redis_answers(redis_url)))
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-watch", daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
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
                for outage in self.outages:
                    outage.check(self.restarts)
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
