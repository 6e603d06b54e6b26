"""The deployment and observability files, checked as files (no Docker engine, network or cluster):
docker-compose against the compose spec, loopback ports and healthchecks, Prometheus config and
alert rules, the Grafana dashboard's queries against the metrics the code defines, the Kubernetes
manifests and the FLUX.1-Kontext-dev run config.

Tests that start the components and a real Prometheus live elsewhere; these stay fast.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import promql
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from promql import DASHBOARD, GRAFANA_DIR, PROMETHEUS_DIR, alert_rules, dashboard_targets, promql_metrics

import services.metrics
from reward_server.metrics import RewardServerMetrics

REPO = Path(__file__).resolve().parents[1]
# In CI the shared schemas sit next to the repository: ../shared/schemas relative to its root.
COMPOSE_SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"
K8S_DIR = REPO / "deploy" / "k8s"
FLUX_CONFIG = REPO / "configs" / "flux_kontext_compbench.yaml"

# What a user must set before `docker compose up` (the file refuses to start without them).
REQUIRED_ENV = {"RCGRPO_REWARD_TOKEN": "t" * 32, "GRAFANA_ADMIN_PASSWORD": "p" * 16}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)


# -- compose helpers ----------------------------------------------------------------------------

_COMPOSE_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution (`${X}`, `${X:-default}`, `${X-default}`, `${X:?error}`, `$$`)
    applied to every string of a loaded compose file."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3)
        present = name in env and (env[name] != "" or operator in ("-", "?"))
        if operator in (":?", "?") and not present:
            raise KeyError(f"compose requires {name}: {argument}")
        if operator in (":-", "-") and not present:
            return argument
        return env.get(name, "")

    return _COMPOSE_VAR.sub(substitute, value)


def merge_override(base: dict, override: dict) -> dict:
    """`docker compose -f base -f override`: mappings merge key by key, other values are replaced (the
    GPU override sets no sequence that compose would concatenate instead)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_override(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_compose(gpu: bool = False, offline: bool = False, env: dict[str, str] | None = None) -> dict:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for wanted, override in ((gpu, "docker-compose.gpu.yml"), (offline, "docker-compose.offline.yml")):
        if wanted:
            compose = merge_override(compose, yaml.safe_load((REPO / override).read_text()))
    return compose if env is None else interpolate(compose, env)


VARIANTS = {"default": {}, "gpu": {"gpu": True}, "offline": {"offline": True}}


def compose_variants() -> dict[str, dict]:
    return {name: load_compose(**flags, env=REQUIRED_ENV) for name, flags in VARIANTS.items()}


# -- metric helpers -----------------------------------------------------------------------------


def defined_metrics() -> dict[str, set[str]]:
    """Every series name the code exports (counters as `_total`, histograms as `_bucket`/`_sum`/`_count`)
    mapped to the metric's label names: services/metrics.py and the reward server's registry."""
    sources = (vars(services.metrics), services.metrics.LEARNER_GAUGES, vars(RewardServerMetrics()))
    wrappers = {
        id(value): value
        for source in sources
        for value in source.values()
        if isinstance(value, MetricWrapperBase)
    }.values()
    families = [(wrapper.describe()[0], set(wrapper._labelnames)) for wrapper in wrappers]
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names = {}
    for family, labels in families:
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def check_queries(queries: list[tuple[str, str]], legends: dict[str, str] | None = None) -> list[str]:
    """Problems with (where, PromQL) pairs against the metrics the code defines."""
    return promql.check_queries(queries, defined_metrics(), legends)


# -- docker-compose -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compose_file_validates_against_the_compose_spec(variant):
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(f"compose spec schema not found at {COMPOSE_SCHEMA} (expected ../shared/schemas/)")
    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    raw = load_compose(**VARIANTS[variant])
    resolved = interpolate(raw, REQUIRED_ENV)
    for document in (raw, resolved):
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(document), key=str)
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def test_compose_refuses_to_start_without_the_token():
    with pytest.raises(KeyError, match="RCGRPO_REWARD_TOKEN"):
        load_compose(env={"GRAFANA_ADMIN_PASSWORD": "p" * 16})


def test_compose_has_the_cluster_services():
    services = compose_variants()["default"]["services"]
    assert set(services) == {
        "redis",
        "ray-head",
        "ray-worker",
        "reward-server",
        "learner",
        "rollout-worker",
        "prometheus",
        "grafana",
    }
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in services["redis"]["volumes"])
    assert (
        "--head" in services["ray-head"]["command"]
        and "--dashboard-host 0.0.0.0" in services["ray-head"]["command"]
    )
    assert "ray-head:6380" in services["ray-worker"]["command"]
    assert "--port 6380" in services["ray-head"]["command"]  # the workers' --address
    # The learner and standalone rollout worker run outside Ray, only when asked for.
    assert services["learner"]["profiles"] == ["standalone"] and services["rollout-worker"]["profiles"] == [
        "standalone"
    ]
    for name in ("ray-head", "ray-worker", "reward-server", "learner", "rollout-worker"):
        environment = services[name]["environment"]
        assert environment["REDIS_URL"] == "redis://redis:6379/0"
        assert environment["RCGRPO_REWARD_TOKEN"] == REQUIRED_ENV["RCGRPO_REWARD_TOKEN"]
        if name != "reward-server":
            assert environment["RCGRPO_REWARD_URL"] == "http://reward-server:8600"
    # Components outside Ray serve /metrics beyond the container's loopback, for Prometheus.
    assert "--set metrics_host=0.0.0.0" in services["learner"]["command"]
    assert (
        '--worker-id "$HOSTNAME" --metrics-port 9101 --set metrics_host=0.0.0.0'
        in services["rollout-worker"]["command"][-1]
    )
    assert "--port 8600" in services["reward-server"]["command"]
    # Files the services mount or read from the repository exist.
    assert (REPO / "configs" / "reward_server.yaml").is_file()
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).is_dir(), f"{name} mounts missing {source}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_published_ports_bind_loopback_unless_configured(variant):
    raw = load_compose(**VARIANTS[variant])
    resolved = compose_variants()[variant]
    exposed = interpolate(raw, {**REQUIRED_ENV, "BIND_ADDR": "0.0.0.0"})
    published = 0
    for name, service in resolved["services"].items():
        for index, port in enumerate(service.get("ports", [])):
            assert isinstance(port, str), f"{name}: use the HOST_IP:PUBLISHED:TARGET short form"
            host_ip, published_port, target = port.rsplit(":", 2)
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            assert published_port and target
            assert raw["services"][name]["ports"][index].startswith("${BIND_ADDR:-127.0.0.1}:")
            assert exposed["services"][name]["ports"][index].startswith("0.0.0.0:")
            # the container's port by default; a variable moves it where the host's is taken
            assert published_port == target
            raw_port = raw["services"][name]["ports"][index]
            variable = re.fullmatch(r"\$\{BIND_ADDR:-127\.0\.0\.1\}:\$\{(\w+_PORT):-(\d+)\}:(\d+)", raw_port)
            assert variable and variable.group(2) == variable.group(3) == target, raw_port
            moved = interpolate(raw, {**REQUIRED_ENV, variable.group(1): "23456"})
            assert moved["services"][name]["ports"][index] == f"127.0.0.1:23456:{target}"
            published += 1
    assert published == 5  # redis, ray dashboard, reward server, prometheus, grafana


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_service_has_a_healthcheck(variant):
    for name, service in compose_variants()[variant]["services"].items():
        healthcheck = service.get("healthcheck")
        assert healthcheck and not healthcheck.get("disable"), f"{name} has no healthcheck"
        assert healthcheck["test"][0] in ("CMD", "CMD-SHELL") and len(healthcheck["test"]) > 1


def test_gpu_override_reserves_a_gpu_and_builds_the_cuda_image():
    default, gpu = compose_variants()["default"], compose_variants()["gpu"]
    assert "deploy" not in default["services"]["learner"]
    assert "resources" not in default["services"]["ray-worker"]["deploy"]
    for name in ("ray-worker", "learner", "rollout-worker"):
        (device,) = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "count": "1", "capabilities": ["gpu"]}
    assert gpu["services"]["ray-worker"]["deploy"]["replicas"] == "1"  # kept from the base file
    assert "--num-gpus 1" in gpu["services"]["ray-worker"]["command"]
    images = {s["image"] for s in gpu["services"].values() if "build" in s}
    assert images == {"rcgrpo:cu128"}
    for service in gpu["services"].values():
        if "build" in service:
            assert service["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu128"
    # One image for all our services, CPU torch unless asked otherwise.
    assert {s["image"] for s in default["services"].values() if "build" in s} == {"rcgrpo:latest"}
    assert all(
        s["build"]["args"]["TORCH_INDEX_URL"] == "" for s in default["services"].values() if "build" in s
    )


def test_offline_override_starts_only_local_images():
    offline = compose_variants()["offline"]["services"]
    # what `up` starts without a profile: our image and the stand-ins, never pulled
    started = {name: service for name, service in offline.items() if "profiles" not in service}
    assert set(started) == {"redis", "ray-head", "ray-worker", "reward-server", "prometheus"}
    for name, service in offline.items():
        if name != "grafana":
            assert service["pull_policy"] == "never", name
    assert offline["redis"]["image"] == "rcgrpo-offline/redis:7"
    assert offline["prometheus"]["image"] == "rcgrpo-offline/prometheus:2"
    # our image, built by compose on the local base image with every package from the wheelhouse
    for name in ("ray-head", "ray-worker", "reward-server", "learner", "rollout-worker"):
        assert offline[name]["image"] == "rcgrpo:latest"
        args = offline[name]["build"]["args"]
        assert (args["BASE_IMAGE"], args["OFFLINE"]) == ("rcgrpo-offline/debian:bookworm", "1")
    gpu_offline = load_compose(gpu=True, offline=True, env=REQUIRED_ENV)["services"]["ray-worker"]["build"][
        "args"
    ]
    assert gpu_offline["OFFLINE"] == "1" and gpu_offline["TORCH_INDEX_URL"].endswith("/cu128")
    # without the override: the public base image and the package index
    default = compose_variants()["default"]["services"]["ray-head"]["build"]["args"]
    assert (default["BASE_IMAGE"], default["OFFLINE"]) == ("python:3.11-slim", "")
    # Grafana has no Debian package, so no stand-in: it starts only when asked for (and pullable)
    assert offline["grafana"]["profiles"] == ["grafana"] and offline["grafana"]["image"].startswith(
        "grafana/"
    )
    # the stand-ins are what scripts/offline-images.sh builds, from deploy/offline/, on its base image
    script = (REPO / "scripts" / "offline-images.sh").read_text()
    for name, tag in (("redis", "7"), ("prometheus", "2")):
        assert f"rcgrpo-offline/{name}:{tag}" in script
        dockerfile = (REPO / "deploy" / "offline" / f"{name}.Dockerfile").read_text()
        assert "ARG BASE_IMAGE=rcgrpo-offline/debian:bookworm" in dockerfile
        assert f"apt-get install -y --no-install-recommends {name}" in dockerfile
    assert "base=rcgrpo-offline/debian:$suite" in script and "suite=${DEBIAN_SUITE:-bookworm}" in script
    # the stand-ins run the compose commands as the official images do
    prometheus = (REPO / "deploy" / "offline" / "prometheus.Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/bin/prometheus"]' in prometheus and " wget" in prometheus  # the healthcheck's
    assert offline["prometheus"]["healthcheck"]["test"][1] == "wget"


def test_compose_details_the_real_cluster_needs():
    services = compose_variants()["default"]["services"]
    # Redis answers other containers (the official image's entrypoint adds this; a stand-in does not)
    command = services["redis"]["command"]
    assert command[command.index("--protected-mode") + 1] == "no"
    # the standalone learner and worker end with the run; restarting them would start it over
    for name in ("learner", "rollout-worker"):
        assert services[name]["restart"] == "on-failure"
    # scrape addresses live in memory, gone with the cluster
    volume = load_compose()["volumes"]["metrics-targets"]
    assert volume["driver_opts"]["type"] == "tmpfs" and "uid=1000" in volume["driver_opts"]["o"]


def shell_command(text: str, start: str) -> list[str]:
    """The words of the first command in `text` that begins with `start`, over its `\\` line breaks."""
    lines = text[text.index(start) :].splitlines()
    joined = ""
    for line in lines:
        joined += " " + line.strip().lstrip("#").strip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            break
    return joined.split()


def test_the_smoke_submits_the_job_the_docs_tell_users_to():
    submit = "docker compose exec ray-head ray job submit"
    documented = shell_command((REPO / "docs" / "DEPLOY.md").read_text(), submit)
    assert documented == shell_command((REPO / "docker-compose.yml").read_text(), submit)
    assert "--set metrics_host=0.0.0.0" in " ".join(documented)
    # compose-smoke.sh and compose-chaos.sh submit through scripts/compose-lib.sh
    smoke = shell_command(
        (REPO / "scripts" / "compose-lib.sh").read_text(), "compose exec -T ray-head ray job"
    )
    # the smoke's `compose` wraps `docker compose` with its project and files; -T: no terminal in CI
    assert ["docker", *[word for word in smoke if word != "-T"]] == [*documented, '"$@"', '>"$log"', "2>&1"]


# -- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_installs_like_the_readme():
    dockerfile = (REPO / "Dockerfile").read_text()
    # The public base image by default; any other (a locally built one offline) as a build argument.
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS base$", dockerfile, re.M)
    import tomllib

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(dep for dep in dependencies if dep.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.removeprefix('torch==')}" in dockerfile
    assert "ARG TORCH_INDEX_URL=" in dockerfile
    # torch first (from TORCH_INDEX_URL when set), then pyproject's pins, both from the wheelhouse
    # alone (pip --no-index) when OFFLINE is set; then the project itself, with nothing to download.
    offline = "${OFFLINE:+--no-index --find-links /wheelhouse}"
    torch_install = dockerfile.index(
        f'pip install {offline} \\\n        ${{TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}} "torch==${{TORCH_VERSION}}"'
    )
    requirements_install = dockerfile.index(f"pip install {offline} -r /tmp/requirements.txt")
    project_install = dockerfile.index("pip install --no-deps --no-build-isolation -e .")
    assert torch_install < requirements_install < project_install
    assert "['build-system']['requires']" in dockerfile  # setuptools for the project's install
    assert dockerfile.count("pip install") == 3
    # The wheels stay in the build stage: the image's source copy is taken without them.
    assert "COPY wheelhouse/ /wheelhouse/" in dockerfile and "rm -rf /app/wheelhouse" in dockerfile
    assert re.search(r"^USER rcgrpo$", dockerfile, re.M)  # not root
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", ".env", "runs"):
        assert path in ignored
    assert not any(pattern.startswith("wheelhouse") for pattern in ignored)  # the build reads it
    # Wheels and locally built base images never enter git.
    gitignore = (REPO / ".gitignore").read_text().split()
    assert "/wheelhouse/*" in gitignore and "!/wheelhouse/README.md" in gitignore


# -- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_scrapes_every_component_and_loads_the_rules():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "duplicate job_name"
    assert {"reward-server", "rollout-worker", "learner"} <= set(jobs)
    assert jobs["reward-server"]["static_configs"][0]["targets"] == ["reward-server:8600"]
    compose = compose_variants()["default"]["services"]
    for job in jobs.values():
        for discovery in job.get("dns_sd_configs", []):
            assert set(discovery["names"]) <= set(compose), f"{job['job_name']} resolves unknown hosts"
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file()
    # The learner and rollout workers are scraped where they announce themselves (wherever Ray put
    # them): files in the volume every rcgrpo container writes and Prometheus reads.
    targets_dir = compose["ray-head"]["environment"]["RCGRPO_METRICS_TARGETS_DIR"]
    for name in ("ray-head", "ray-worker", "learner", "rollout-worker"):
        assert compose[name]["environment"]["RCGRPO_METRICS_TARGETS_DIR"] == targets_dir
        assert f"metrics-targets:{targets_dir}" in compose[name]["volumes"]
    assert f"metrics-targets:{targets_dir}:ro" in compose["prometheus"]["volumes"]

    def announced_in(job: str, port: int) -> bool:
        (discovery,) = jobs[job]["file_sd_configs"]
        return any(
            fnmatch.fnmatch(f"{targets_dir}/172.18.0.3_{port}.json", pattern)
            for pattern in discovery["files"]
        )

    assert announced_in("learner", 9100) and not announced_in("rollout-worker", 9100)
    for port in (9101, 9102, 9109, 9110, 9199):  # worker i on rollout.metrics_port + i
        assert announced_in("rollout-worker", port) and not announced_in("learner", port)
    assert not announced_in("rollout-worker", 9200) and not announced_in("learner", 8080)


def test_a_process_serving_metrics_announces_its_address(tmp_path, monkeypatch):
    from services.metrics import TARGETS_DIR_ENV, announce_scrape_target, serve_metrics

    path = announce_scrape_target(tmp_path, 9101, "10.1.2.3")
    assert path == tmp_path / "10.1.2.3_9101.json"
    assert json.loads(path.read_text()) == [{"targets": ["10.1.2.3:9101"]}]  # a file_sd target group
    # on all interfaces: this host's address, as other containers reach it
    everywhere = announce_scrape_target(tmp_path, 9100, "0.0.0.0")
    ip = socket.gethostbyname(socket.gethostname())
    assert json.loads(everywhere.read_text()) == [{"targets": [f"{ip}:9100"]}]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, everywhere.name])
    # serve_metrics announces only where the deployment asks for it
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv(TARGETS_DIR_ENV, str(tmp_path / "announced"))
    (tmp_path / "announced").mkdir()
    serve_metrics(port)
    (announced,) = (tmp_path / "announced").iterdir()
    assert json.loads(announced.read_text()) == [{"targets": [f"127.0.0.1:{port}"]}]
    assert "rcgrpo_learner_step" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def test_alert_rules_cover_the_failure_modes_and_query_real_metrics():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert {"RcgrpoLearnerStalled", "RcgrpoWorkerStaleWeights", "RcgrpoBacklogGrowing"} <= set(rules)
    assert "rcgrpo_learner_step" in rules["RcgrpoLearnerStalled"]["expr"]
    stale = rules["RcgrpoWorkerStaleWeights"]["expr"]
    assert "rcgrpo_rollout_policy_version" in stale and "rcgrpo_learner_policy_version" in stale
    assert "rcgrpo_stream_length" in rules["RcgrpoBacklogGrowing"]["expr"]
    # k in "worker version < learner version - k" is the FLUX config's max_staleness.
    max_staleness = yaml.safe_load(FLUX_CONFIG.read_text())["learner"]["max_staleness"]
    assert f"max(rcgrpo_learner_policy_version) - {max_staleness})" in stale
    queries = []
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        queries.append((f"alert {rule['alert']}", rule["expr"]))
        queries += [(f"alert {rule['alert']} {key}", text) for key, text in rule["annotations"].items()]
    assert not check_queries(queries)
    jobs = {
        job["job_name"]
        for job in yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]
    }
    for name, rule in rules.items():
        for job in re.findall(r'job\s*=\s*"([^"]+)"', rule["expr"]):
            assert job in jobs, f"{name} queries scrape job {job!r} that prometheus.yml does not define"


def test_metric_name_check_catches_wrong_names_and_labels():
    # The checks above are only as good as this parser: it must reject what is not exported.
    assert (
        check_queries([("ok", 'sum by (worker) (rate(rcgrpo_rollout_groups_total{worker!~"x"}[1m]))')]) == []
    )
    assert (
        check_queries(
            [("ok", "histogram_quantile(0.5, sum by (le) (rate(rcgrpo_learner_step_seconds_bucket[1m])))")]
        )
        == []
    )
    problems = check_queries(
        [
            ("counter without _total", "rate(rcgrpo_rollout_groups[1m])"),
            ("histogram without suffix", "rcgrpo_learner_step_seconds"),
            ("gauge with _total", "rcgrpo_learner_loss_total"),
            ("label", "sum by (stream) (rcgrpo_learner_loss)"),
            ("quoted names are not queries", 'rcgrpo_stream_length{stream="rcgrpo_nonexistent"}'),
        ],
        legends={"quoted names are not queries": "{{worker}}"},
    )
    assert problems == [
        "counter without _total: rcgrpo_rollout_groups is not exported",
        "histogram without suffix: rcgrpo_learner_step_seconds is not exported",
        "gauge with _total: rcgrpo_learner_loss_total is not exported",
        "label: label 'stream' not on ['rcgrpo_learner_loss']",
        "quoted names are not queries: label 'worker' not on ['rcgrpo_stream_length']",
    ]


@needs_promtool
def test_promtool_accepts_the_config_and_rules():
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        result = subprocess.run(
            [PROMTOOL, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_cover_every_alert_firing_and_silent():
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    cases = [case for test in tests["tests"] for case in test["alert_rule_test"]]
    assert {case["alertname"] for case in cases if case["exp_alerts"]} == alerts  # each one fires
    assert {case["alertname"] for case in cases if not case["exp_alerts"]} == alerts  # and stays silent
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    # Grafana's $__rate_interval becomes a concrete range; each query becomes a recording rule.
    rules = [
        {"record": f"rcgrpo_dashboard:query_{i}", "expr": t["expr"].replace("$__rate_interval", "1m")}
        for i, (_, t) in enumerate(dashboard_targets())
    ]
    (tmp_path / "dashboard_rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    result = subprocess.run(
        [PROMTOOL, "check", "rules", "dashboard_rules.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# -- Grafana ------------------------------------------------------------------------------------


def test_dashboard_queries_only_exported_metrics_and_labels():
    targets = dashboard_targets()
    assert len(targets) >= 30
    problems = check_queries(
        [(where, t["expr"]) for where, t in targets],
        legends={where: t["legendFormat"] for where, t in targets},
    )
    assert not problems, "\n".join(problems)


def test_dashboard_has_the_required_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    queried_by_title = {}
    for panel in dashboard["panels"]:
        queried = set().union(*(promql_metrics(t["expr"]) for t in panel.get("targets", [])))
        queried_by_title[panel["title"]] = queried
    required = {
        "Rollout groups per second": {"rcgrpo_rollout_groups_total"},
        "Images per second": {"rcgrpo_rollout_images_total"},
        "Staleness (policy versions behind the learner)": {"rcgrpo_learner_staleness_bucket"},
        "Stream length": {"rcgrpo_stream_length"},
        "Pending entries (delivered, not acknowledged)": {"rcgrpo_stream_pending"},
        "Reward mean and within-group std": {"rcgrpo_learner_reward_mean", "rcgrpo_learner_reward_std"},
        "ACD (attention concentration)": {"rcgrpo_learner_acd_mean", "rcgrpo_rollout_acd_mean"},
        "Policy version per worker": {"rcgrpo_rollout_policy_version", "rcgrpo_learner_policy_version"},
        "Reward server request latency": {"rcgrpo_reward_request_latency_seconds_bucket"},
        "Reward server batch size and queue": {
            "rcgrpo_reward_batch_size_sum",
            "rcgrpo_reward_batch_size_count",
        },
        "Learner step time": {"rcgrpo_learner_step_seconds_bucket"},
        "Surrogate loss": {"rcgrpo_learner_loss"},
        "Dead letters": {"rcgrpo_dead_letters"},
    }
    for title, metrics in required.items():
        assert title in queried_by_title, f"missing panel {title!r}"
        assert metrics <= queried_by_title[title], f"{title!r} queries {queried_by_title[title]}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    datasources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    used |= {t["datasource"]["uid"] for _, t in dashboard_targets()}
    assert used == {datasource["uid"]}
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "rcgrpo.yml").read_text())
    (provider,) = providers["providers"]
    grafana = compose_variants()["default"]["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# -- the FLUX.1-Kontext-dev run config and the Kubernetes manifests -------------------------------


def run_reward_server_settings(run_config: Path) -> dict:
    """What the driver would give a reward server it starts for this run (the single source of truth
    for the run's stream names)."""
    from deploy.reward_process import reward_server_settings
    from services.config import load_run_config

    return reward_server_settings(load_run_config(run_config), "redis://unused", 0)


STREAM_KEYS = ("rollouts", "scored", "group", "namespace", "blob_prefix")


def test_compose_reward_server_serves_the_tiny_runs_streams_and_rewards(monkeypatch):
    from reward_server.settings import load_settings
    from services.config import load_run_config

    service = compose_variants()["default"]["services"]["reward-server"]
    for name, value in service["environment"].items():
        monkeypatch.setenv(name, value)
    settings = load_settings(REPO / "configs" / "reward_server.yaml")
    expected = run_reward_server_settings(REPO / "configs" / "tiny_shapes.yaml")
    assert {key: getattr(settings.stream, key) for key in STREAM_KEYS} == {
        key: expected["stream"][key] for key in STREAM_KEYS
    }
    # it serves every reward of the run; the weights travel with each group, so its own may differ
    assert set(load_run_config(REPO / "configs" / "tiny_shapes.yaml").rewards) <= set(settings.rewards)


def test_flux_config_has_the_papers_settings():
    from services.config import load_run_config

    config = load_run_config(FLUX_CONFIG)
    method = config.method
    assert (method.group_size, method.s_in, method.s_out, method.anchors, method.steps_per_anchor) == (
        12,
        0.3,
        0.0,
        4,
        4,
    )
    assert (method.adv_p, method.learning_rate, method.lora_rank, method.lora_alpha) == (0.8, 1e-5, 32, 64)
    assert (method.acd_weight, method.num_steps, method.rdp, method.mask_aware) == (0.5, 8, True, True)
    assert (config.editor, config.dtype) == (Path("/models/FLUX.1-Kontext-dev"), "bfloat16")
    assert config.data.source == "compbench:/data/CompBench"
    assert (config.rollout.gpus_per_worker, config.learner.num_gpus) == (1, 1)
    assert (config.rollout.metrics_port, config.learner.metrics_port) == (9101, 9100)  # prometheus.yml
    assert config.learner.total_steps == 300


def k8s_documents() -> dict[str, list[dict]]:
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(K8S_DIR.glob("*.yaml"))
    }


def k8s_object(kind: str, name: str) -> dict:
    (found,) = [
        doc
        for docs in k8s_documents().values()
        for doc in docs
        if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    return found


def test_k8s_manifests_describe_the_same_job():
    documents = k8s_documents()
    kustomization = documents.pop("kustomization.yaml")[0]
    assert set(kustomization["resources"]) == set(documents) - {"reward-token-secret.yaml", "podmonitor.yaml"}
    kinds = sorted(doc["kind"] for docs in documents.values() for doc in docs)
    for kind in ("RayJob", "StatefulSet", "Deployment", "Service", "Secret", "ConfigMap"):
        assert kind in kinds

    # The run config is the repository's FLUX config, verbatim.
    run_config = k8s_object("ConfigMap", "rcgrpo-run-config")["data"]["run.yaml"]
    assert run_config == FLUX_CONFIG.read_text()

    job = k8s_object("RayJob", "rcgrpo-flux-kontext-compbench")
    assert job["apiVersion"] == "ray.io/v1"
    assert (
        job["spec"]["entrypoint"]
        == (
            "python -m deploy.driver --config /etc/rcgrpo/run.yaml --set reward.url=http://rcgrpo-reward-server:8600"
            " --set metrics_host=0.0.0.0"  # the run config serves metrics on 9100/9101; the PodMonitor scrapes them
        )
    )
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (worker_group,) = cluster["workerGroupSpecs"]
    worker = worker_group["template"]["spec"]
    num_workers = yaml.safe_load(run_config)["rollout"]["num_workers"]
    assert worker_group["replicas"] == worker_group["minReplicas"] == num_workers + 1  # + the learner
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    for pod in (head, worker):
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/etc/rcgrpo"]]["configMap"]["name"] == "rcgrpo-run-config"
        assert volumes[mounts["/app/runs"]]["persistentVolumeClaim"]["claimName"] == "rcgrpo-runs"
        env = {e["name"]: e for e in container["env"]}
        assert env["REDIS_URL"]["value"] == "redis://rcgrpo-redis:6379/0"
        assert env["RCGRPO_REWARD_URL"]["value"] == "http://rcgrpo-reward-server:8600"
        assert env["RCGRPO_REWARD_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "rcgrpo-reward-token",
            "key": "token",
        }
    assert k8s_object("PersistentVolumeClaim", "rcgrpo-runs")["spec"]["accessModes"] == ["ReadWriteMany"]

    # Redis: append-only persistence on a volume claim, probed.
    redis = k8s_object("StatefulSet", "rcgrpo-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["args"][container["args"].index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert container["readinessProbe"] and container["livenessProbe"]
    assert k8s_object("Service", "rcgrpo-redis")["spec"]["ports"][0]["port"] == 6379

    # The reward server: probes on its health routes, token from the Secret, service on its port.
    deployment = k8s_object("Deployment", "rcgrpo-reward-server")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--port=8600" in container["command"]
    assert k8s_object("Service", "rcgrpo-reward-server")["spec"]["ports"][0]["port"] == 8600

    # No token is committed: the Secret ships empty, which the reward server refuses.
    assert k8s_object("Secret", "rcgrpo-reward-token")["stringData"] == {"token": ""}


def test_k8s_reward_server_config_loads_and_serves_the_runs_rewards(tmp_path):
    from reward_server.registry import REWARDS
    from reward_server.settings import load_settings
    from services.config import load_run_config

    path = tmp_path / "reward_server.yaml"
    path.write_text(k8s_object("ConfigMap", "rcgrpo-reward-server-config")["data"]["reward_server.yaml"])
    settings = load_settings(path)
    assert settings.host == "0.0.0.0" and settings.port == 8600
    expected = run_reward_server_settings(FLUX_CONFIG)
    assert {key: getattr(settings.stream, key) for key in STREAM_KEYS} == {
        key: expected["stream"][key] for key in STREAM_KEYS
    }
    # the run's payload directory, relative to the job's working directory (the image's WORKDIR)
    assert settings.stream.blob_dir == Path("/app") / expected["stream"]["blob_dir"]
    pod = k8s_object("Deployment", "rcgrpo-reward-server")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes[mounts["/app/runs"]]["persistentVolumeClaim"]["claimName"] == "rcgrpo-runs"
    for name in load_run_config(FLUX_CONFIG).rewards:  # the run's rewards, ACD included
        assert name in REWARDS, f"the run asks for unregistered reward {name!r}"
        assert name in settings.rewards, f"the run asks for {name!r}, which the server does not serve"
        model = REWARDS[name].model
        assert model is None or model in settings.models, f"{name} needs model {model!r}"


def test_the_default_reward_weights_live_in_one_place():
    from rcgrpo.config import MethodConfig
    from rcgrpo.rewards import DEFAULT_WEIGHTS
    from reward_server.registry import REWARDS
    from reward_server.settings import RewardServerSettings, load_settings
    from services.config import RewardConfig

    assert set(DEFAULT_WEIGHTS) <= set(REWARDS)
    assert {**RewardConfig().rewards, "acd": MethodConfig().acd_weight} == DEFAULT_WEIGHTS
    served = RewardServerSettings(insecure_no_auth=True).rewards
    assert served == {name: w for name, w in DEFAULT_WEIGHTS.items() if name != "region_adherence"}
    shipped = load_settings(REPO / "configs" / "reward_server.yaml", insecure_no_auth=True).rewards
    assert shipped == DEFAULT_WEIGHTS  # the shipped server file spells the defaults out
    assert "weight=" not in (REPO / "README.md").read_text()  # a registered reward has no weight of its own


def test_the_docs_name_every_registered_reward_and_no_other():
    from reward_server.registry import REWARDS

    table = re.findall(r"^\| `([a-z_]+)` \|", (REPO / "docs" / "REWARDS.md").read_text(), flags=re.M)
    assert table == list(REWARDS)
    listed = re.search(
        r"# Registered names: (.*?) \(docs/REWARDS.md",
        (REPO / "configs" / "reward_server.yaml").read_text(),
        re.S,
    )
    assert re.findall(r"[a-z_]+", listed.group(1)) == list(REWARDS)
