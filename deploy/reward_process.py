"""Start the reward server as a child process (uvicorn on a free loopback port, stream mode on the
run's streams) for runs that are not given a reward-server URL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from services.auth import TOKEN_ENV, new_token
from services.config import RunConfig
from services.keys import ROLLOUTS_GROUP
from services.process import free_port
from services.reward_client import RewardClient


def reward_server_settings(cfg: RunConfig, redis_url: str, port: int) -> dict:
    """The reward server's settings for this run: it serves the run's rewards, on the run's streams."""
    return {
        "host": "127.0.0.1",
        "port": port,
        "torch_threads": cfg.rollout.torch_threads,
        "rewards": cfg.rewards,
        "stream": {
            "enabled": True,
            "redis_url": redis_url,
            "rollouts": cfg.keys.rollouts,
            "scored": cfg.keys.scored,
            "group": ROLLOUTS_GROUP,
            "namespace": cfg.keys.reward_namespace,
            "blob_prefix": cfg.keys.blob_prefix,
            "blob_dir": str(cfg.blob_path) if cfg.blob_store == "directory" else None,
            # the only consumer: what it left pending is its own, dead with a previous process of it
            "reclaim_idle_ms": 5_000,
        },
    }


class RewardServerProcess:
    def __init__(self, cfg: RunConfig, redis_url: str, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = new_token()
        settings_path = cfg.run_dir / "reward_server.yaml"
        settings_path.write_text(
            yaml.safe_dump(reward_server_settings(cfg, redis_url, self.port), sort_keys=False)
        )
        self._command = [
            sys.executable,
            "-m",
            "deploy.cli",
            "reward-server",
            "--config",
            str(settings_path),
            "--log-level",
            "warning",
        ]
        self._log = open(log_path, "ab")
        self.process = self._start()
        self.client = RewardClient(self.url, token=self.token)

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, TOKEN_ENV: self.token, "HF_HUB_OFFLINE": "1"}
        return subprocess.Popen(self._command, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def restart(self) -> None:
        """Start it again after it died, on the same port with the same token: the stream consumer
        picks up the rollout groups it left pending."""
        self.process.wait()  # reap the dead child (no zombie)
        self.process = self._start()
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        try:
            self.client.wait_ready(timeout_s)
        except Exception:
            self.stop()
            raise RuntimeError(f"the reward server did not become ready; see {self._log.name}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()
