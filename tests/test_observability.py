"""Observability of running components: the metrics the dashboard and the alert rules query are the
ones a reward server, a learner and a rollout worker actually serve after a training step; a real
Prometheus, configured from deploy/prometheus/, scrapes them and evaluates the dashboard and the
rules; and the driver, submitted with `ray job submit` to a local `ray start --head` cluster,
completes a tiny run.

The learner and the rollout worker run in this process (one prometheus-client registry, each served
on its own port, as `learner.metrics_port` and `rollout.metrics_port` do); the reward server is a real
uvicorn in a thread, in stream mode on the run's streams, scoring with a model-based reward (tiny
CLIP) so its batching metrics exist too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from promql import (
    DASHBOARD,
    PROMETHEUS_DIR,
    alert_rules,
    check_queries,
    dashboard_targets,
    deployed_queries,
    promql_metrics,
)

from services.config import RunConfig, load_run_config

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny_shapes.yaml"
TOKEN = "observability-token-0123456789abcdef"
WORKER_ID = "obs-worker-0"  # the default registry is per process: a name no other test uses
PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.25):
    """condition()'s first truthy value; fails naming `what` (and the last value) after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(poll_s)


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """GET a /metrics page: series name (with _total/_bucket/... suffixes) -> {sorted labels: value}."""
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    series: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            series.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return series


def label_names(series: dict[str, dict[tuple, float]]) -> dict[str, set[str]]:
    return {name: {label for labels in values for label, _ in labels} for name, values in series.items()}


def value(series: dict, name: str, **labels) -> float:
    assert name in series, f"{name} not exported"
    key = tuple(sorted(labels.items()))
    assert key in series[name], f"{name}{labels} not exported; have {sorted(series[name])}"
    return series[name][key]


@dataclass
class Components:
    cfg: RunConfig
    reward_url: str  # the reward server's base URL; /metrics on it
    learner_port: int
    worker_port: int
    step_stats: dict


@pytest.fixture(scope="module")
def components(tiny_editor_dir, tmp_path_factory):
    """Redis, a reward server in stream mode, a learner and a rollout worker with metrics served, after
    one task rolled out, scored and trained on (one optimiser step)."""
    from deploy.driver import TaskFeeder
    from deploy.reward_process import reward_server_settings
    from learner.learner import Learner
    from rcgrpo.clip_scores import build_tiny_clip
    from reward_server.app import create_app
    from reward_server.settings import RewardServerSettings
    from rollout_worker.worker import RolloutWorker
    from services.http import serve_in_thread
    from services.redis_server import EmbeddedRedis
    from services.reward_client import RewardClient

    root = tmp_path_factory.mktemp("observability")
    learner_port, worker_port = free_port(), free_port()
    cfg = load_run_config(
        TINY_CONFIG,
        [
            "name=observability",
            f"runs_dir={root / 'runs'}",
            f"editor={tiny_editor_dir}",
            "method.group_size=4",
            "method.num_steps=4",
            "method.steps_per_anchor=2",  # the late half of 4 steps
            "data.num_samples=8",
            "rollout.num_workers=1",
            f"rollout.metrics_port={worker_port}",
            "learner.groups_per_step=1",
            # the random editor's groups barely differ in adherence: trained on, so the step has numbers
            "method.drop_noise_groups=false",
            f"learner.metrics_port={learner_port}",
            # lc_t is model-based: the reward server batches it, so its batch-size metrics exist
            "reward.rewards={region_adherence: 1.0, background_psnr: 0.02, background_ssim: 1.0, lc_t: 0.01}",
        ],
    )
    clip_dir = build_tiny_clip(root / "clip")
    with EmbeddedRedis() as redis_server:
        settings = RewardServerSettings(
            **reward_server_settings(cfg, redis_server.url, 0), token=TOKEN, models={"clip": clip_dir}
        )
        with serve_in_thread(create_app(settings)) as reward_url:
            RewardClient(reward_url).wait_ready(timeout_s=60)
            # as the driver builds them (deploy/driver.py), in this process
            learner = Learner(cfg, redis_server.url, metrics_port=cfg.learner.metrics_port)
            worker = RolloutWorker(cfg, redis_server.url, WORKER_ID, cfg.rollout.metrics_port)
            learner.publish_lora()
            TaskFeeder(learner.bus, cfg.data.num_samples, cfg.data.seed).feed_until(
                cfg.learner.groups_per_step
            )
            assert worker.run(max_tasks=cfg.learner.groups_per_step) == cfg.learner.groups_per_step
            stats = learner.step(timeout_s=120)
            yield Components(cfg, reward_url, learner_port, worker_port, stats)


def component_scrapes(components: Components) -> dict[str, dict]:
    return {
        "reward-server": scrape(f"{components.reward_url}/metrics"),
        "learner": scrape(f"http://127.0.0.1:{components.learner_port}/metrics"),
        "rollout-worker": scrape(f"http://127.0.0.1:{components.worker_port}/metrics"),
    }


def serving_component(metric: str) -> str:
    """Which component serves a metric (docs/DEPLOY.md, deploy/prometheus/prometheus.yml)."""
    if metric.startswith("rcgrpo_reward_"):
        return "reward-server"
    return "rollout-worker" if metric.startswith("rcgrpo_rollout_") else "learner"


def test_every_queried_metric_is_served_by_its_running_component(components):
    scrapes = component_scrapes(components)
    queries, legends = deployed_queries()
    assert len(queries) >= 30
    queried = set().union(*(promql_metrics(expr) for _, expr in queries))
    missing = sorted(
        f"{name} (from {serving_component(name)})"
        for name in queried
        if name not in scrapes[serving_component(name)]
    )
    assert not missing, f"queried but not served: {missing}"
    # and every label the queries group or match on, or a legend shows, is on the served series
    served = {}
    for series in scrapes.values():
        for name, labels in label_names(series).items():
            served[name] = served.get(name, set()) | labels
    problems = check_queries(queries, served, legends)
    assert not problems, "\n".join(problems)


def test_served_values_describe_the_step(components):
    cfg, stats = components.cfg, components.step_stats
    scrapes = component_scrapes(components)
    learner, worker, reward = scrapes["learner"], scrapes["rollout-worker"], scrapes["reward-server"]
    group_size = cfg.method.group_size
    assert stats["step"] == 1 and stats["policy_version"] == 1
    assert value(learner, "rcgrpo_learner_step") == 1
    assert value(learner, "rcgrpo_learner_policy_version") == 1  # v0 sampled, v1 published after the step
    assert value(learner, "rcgrpo_learner_reward_mean") == pytest.approx(stats["reward_mean"])
    assert value(learner, "rcgrpo_learner_loss") == pytest.approx(stats["loss"])
    assert value(learner, "rcgrpo_learner_step_seconds_count") >= 1
    # one task -> one rollout group -> one scored group, consumed; scored entries stay pending until a
    # checkpoint holds their update
    for stream in ("tasks", "rollouts", "scored"):
        assert value(learner, "rcgrpo_stream_length", stream=stream) == 1
        assert value(learner, "rcgrpo_dead_letters", stream=stream) == 0
    assert value(learner, "rcgrpo_stream_pending", stream="scored") == 1
    assert value(learner, "rcgrpo_stream_pending", stream="rollouts") == 0
    assert value(worker, "rcgrpo_rollout_groups_total", worker=WORKER_ID) == 1
    assert value(worker, "rcgrpo_rollout_images_total", worker=WORKER_ID) == group_size
    assert value(worker, "rcgrpo_rollout_policy_version", worker=WORKER_ID) == 0
    assert value(worker, "rcgrpo_rollout_group_seconds_count", worker=WORKER_ID) == 1
    assert value(reward, "rcgrpo_reward_stream_groups_total", outcome="scored") == 1
    assert value(reward, "rcgrpo_reward_items_scored_total", source="stream") == group_size
    assert value(reward, "rcgrpo_reward_batch_size_sum", reward="lc_t") == group_size
    assert value(reward, "rcgrpo_reward_models_ready") == 1
    assert value(reward, "rcgrpo_reward_queue_depth") == 0


# -- a real Prometheus ----------------------------------------------------------------------------


def prometheus_config(targets: dict[str, str], directory: Path) -> Path:
    """deploy/prometheus/prometheus.yml for this test: the same jobs and rule files, each job's service
    discovery replaced by its loopback target here (jobs with no target here are left out), 1 s scrapes."""
    deployed = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = []
    for job in deployed["scrape_configs"]:
        if job["job_name"] not in targets:
            continue
        kept = {
            key: item
            for key, item in job.items()
            if not key.endswith("_sd_configs") and key != "static_configs"
        }
        jobs.append({**kept, "static_configs": [{"targets": [targets[job["job_name"]]]}]})
    for rule_file in deployed["rule_files"]:
        shutil.copy(PROMETHEUS_DIR / rule_file, directory / rule_file)
    config = {
        **deployed,
        "global": {**deployed["global"], "scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": jobs,
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def query(prometheus_url: str, expr: str) -> list[dict]:
    reply = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", f"{expr}: {reply}"
    return reply["data"]["result"]


@pytest.fixture(scope="module")
def prometheus(components, tmp_path_factory):
    """A Prometheus server scraping the components; yields (base URL, the job -> target map)."""
    if PROMETHEUS is None:
        if os.environ.get("CI"):
            pytest.fail("the prometheus binary is missing in CI: .ci/run must apt-get install prometheus")
        pytest.skip("prometheus not installed (Debian: apt-get install prometheus); CI installs it")
    directory = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    targets = {
        "prometheus": f"127.0.0.1:{port}",
        "reward-server": components.reward_url.removeprefix("http://"),
        "learner": f"127.0.0.1:{components.learner_port}",
        "rollout-worker": f"127.0.0.1:{components.worker_port}",
    }
    config = prometheus_config(targets, directory)
    log = (directory / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert process.poll() is None, (directory / "prometheus.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 60, "prometheus /-/ready")
        yield url, targets
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.slow
def test_prometheus_scrapes_every_component_with_the_deployed_config(prometheus):
    url, targets = prometheus
    deployed_jobs = {
        job["job_name"]
        for job in yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]
    }
    assert set(targets) == deployed_jobs - {"ray"}  # no Ray in this test

    def all_up():
        active = httpx.get(f"{url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        health = {(t["labels"]["job"], t["scrapeUrl"]): t["health"] for t in active}
        return health if len(health) == len(targets) and set(health.values()) == {"up"} else None

    health = wait_for(all_up, 60, "every target up")
    assert {job for job, _ in health} == set(targets)

    # the learner's step and the reward server's request counts, through the query API
    (step,) = wait_for(lambda: query(url, 'rcgrpo_learner_step{job="learner"}'), 30, "rcgrpo_learner_step")
    assert float(step["value"][1]) == 1 and step["metric"]["instance"] == targets["learner"]
    scrapes_counted = wait_for(
        lambda: query(
            url, 'rcgrpo_reward_requests_total{job="reward-server", route="/metrics", status="200"}'
        ),
        30,
        "rcgrpo_reward_requests_total",
    )
    assert float(scrapes_counted[0]["value"][1]) >= 1  # Prometheus' own scrapes of the reward server
    (groups,) = query(url, f'rcgrpo_rollout_groups_total{{job="rollout-worker", worker="{WORKER_ID}"}}')
    assert float(groups["value"][1]) == 1


@pytest.mark.slow
def test_prometheus_evaluates_every_dashboard_query_and_alert_rule(prometheus, tmp_path):
    url, _ = prometheus
    # every panel query has data once a few scrapes are in (rates need two samples): the compose
    # smoke's check, run against this Prometheus
    checker = [sys.executable, str(REPO / "scripts" / "check_grafana_panels.py"), "--prometheus", url]
    result = subprocess.run(
        [*checker, "--rate-interval", "30s", "--timeout", "60"], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("  data: panel ") == len(dashboard_targets())
    # and it fails naming a panel whose query has no data
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"].append(
        {"title": "Never exported", "targets": [{"refId": "A", "expr": "rcgrpo_nothing"}]}
    )
    broken = tmp_path / "dashboard.json"
    broken.write_text(json.dumps(dashboard))
    result = subprocess.run(
        [*checker, "--dashboard", str(broken), "--timeout", "0"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "FAIL: 1 of" in result.stdout and "  panel 'Never exported' A: rcgrpo_nothing" in result.stdout

    # the rules loaded and evaluate; nothing steps while Prometheus watches, so the stalled-learner
    # alert is pending (it fires after its `for`), and no other alert is active
    names = {rule["alert"] for rule in alert_rules()}

    def evaluated():
        groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        done = set(rules) == names and all(rule["health"] == "ok" for rule in rules.values())
        return rules if done and rules["RcgrpoLearnerStalled"]["state"] == "pending" else None

    rules = wait_for(evaluated, 60, "every alert rule evaluated, RcgrpoLearnerStalled pending")
    assert {name: rule["state"] for name, rule in rules.items()} == {
        name: "pending" if name == "RcgrpoLearnerStalled" else "inactive" for name in names
    }


# -- ray job submit to a local cluster --------------------------------------------------------------


def processes_with_marker(marker: str) -> list[int]:
    """PIDs whose environment holds `marker` (NAME=value): what one `ray start` started, and their children."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in environ:
                found.append(int(entry))
    return found


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="finds the cluster's processes through /proc"
)
def test_driver_submitted_with_ray_job_submit_completes_a_tiny_run():
    venv_bin = Path(sys.executable).parent
    ray = venv_bin / "ray"
    # short: Ray's unix sockets live under the temp dir
    temp_dir = Path(tempfile.mkdtemp(prefix="rcgrpo-ray-", dir="/tmp"))
    token = temp_dir / "auth_token"
    token.write_text(os.urandom(32).hex())
    marker = f"RCGRPO_TEST_RAY_CLUSTER={temp_dir}"
    env = {
        key: item
        for key, item in os.environ.items()
        if key not in ("RAY_ADDRESS", "REDIS_URL", "RCGRPO_REWARD_URL")  # the job starts its own
    }
    env |= {
        "PATH": f"{venv_bin}{os.pathsep}{env['PATH']}",  # the job's `python` is this environment's
        # Ray 2.60 turns token auth on when a token exists (~/.ray/auth_token): use a private one
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "RCGRPO_TEST_RAY_CLUSTER": str(temp_dir),
    }
    dashboard_port = free_port()
    # fmt: off
    head_command = [
        str(ray), "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats",
        "--port", str(free_port()), "--temp-dir", str(temp_dir),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
    ]
    # fmt: on
    head_log = (temp_dir / "head.log").open("wb")
    # --block: the head's processes stop with this one; no `ray stop`, which stops every Ray on the host
    head = subprocess.Popen(
        head_command,
        cwd=REPO,  # without --working-dir the job runs where `ray start --head` ran (docs/DEPLOY.md)
        env=env,
        stdout=head_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    auth = {"Authorization": f"Bearer {token.read_text()}"}
    runs_dir = temp_dir / "runs"
    try:

        def dashboard_up():
            assert head.poll() is None, (temp_dir / "head.log").read_text()[-3000:]
            try:
                return httpx.get(f"{address}/api/version", headers=auth, timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(dashboard_up, 120, "the Ray dashboard")
        submission_id = f"rcgrpo-test-{os.getpid()}"
        # fmt: off
        job_command = [
            str(ray), "job", "submit", "--address", address, "--submission-id", submission_id, "--",
            "python", "-m", "deploy.driver", "--config", "configs/tiny_shapes.yaml",
            "--set", "learner.total_steps=2", "--set", "method.group_size=4", "--set", "method.num_steps=4",
            "--set", "method.steps_per_anchor=2", "--set", "eval.num_samples=2", "--set", "rollout.num_workers=1",
            "--set", "name=ray-job", "--set", f"runs_dir={runs_dir}",
        ]
        # fmt: on
        submit = subprocess.run(job_command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
        assert submit.returncode == 0, submit.stdout[-6000:] + submit.stderr[-3000:]
        job = httpx.get(f"{address}/api/jobs/{submission_id}", headers=auth, timeout=10).json()
        assert job["status"] == "SUCCEEDED", job

        run_dir = runs_dir / "ray-job"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 2
        assert Path(summary["lora"]) == run_dir / "lora"
        assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
        assert (run_dir / "checkpoints" / "step_000002").is_dir()
        assert [
            json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ] == [1, 2]
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        head_log.close()
        # anything the cluster started that outlived it (the job, its Redis and reward server)
        for pid in processes_with_marker(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
