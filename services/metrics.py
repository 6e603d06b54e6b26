"""Prometheus metrics of the rollout workers, the learner and the streams between them.

One registry per process (prometheus-client's default); each deployable serves it on its own port
with `serve_metrics`. The reward server defines its own `rcgrpo_reward_*` metrics next to its app.
Names here are what the Grafana dashboard and the alert rules in deploy/ query.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.learner_stats import LEARNER_STATISTICS

# A directory shared with Prometheus (docker-compose sets it): each process that serves metrics writes
# its address there as a file_sd target group, because Ray places actors on whichever node it picks.
TARGETS_DIR_ENV = "RCGRPO_METRICS_TARGETS_DIR"

# -- rollout workers --------------------------------------------------------------------------
ROLLOUT_GROUPS = Counter("rcgrpo_rollout_groups_total", "Rollout groups published", ["worker"])
ROLLOUT_IMAGES = Counter("rcgrpo_rollout_images_total", "Candidate images generated", ["worker"])
ROLLOUT_GROUP_SECONDS = Histogram(
    "rcgrpo_rollout_group_seconds",
    "Wall time of one rollout group (noise, ODE, capture, encoding; not the publish, whose round trip also waits for the next task)",
    ["worker"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
ROLLOUT_POLICY_VERSION = Gauge(
    "rcgrpo_rollout_policy_version", "Policy version the worker samples with", ["worker"]
)
ROLLOUT_ACD = Gauge("rcgrpo_rollout_acd_mean", "Mean ACD reward of the worker's last group", ["worker"])

# -- learner ------------------------------------------------------------------------------------
# a gauge per declared statistic (services/learner_stats.py); statistics that share a gauge are its labels
def _learner_gauges() -> dict[str, Gauge]:
    gauges = {}
    for statistic in LEARNER_STATISTICS:
        if statistic.gauge_name is not None and statistic.gauge_name not in gauges:
            labels = [statistic.label_name] if statistic.label_name else []
            gauges[statistic.gauge_name] = Gauge(statistic.gauge_name, statistic.help, labels)
    return gauges


LEARNER_GAUGES = _learner_gauges()
LEARNER_POLICY_VERSION = LEARNER_GAUGES["rcgrpo_learner_policy_version"]
LEARNER_STEP_SECONDS = Histogram(
    "rcgrpo_learner_step_seconds",
    "Wall time of one learner update",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LEARNER_NOISE_FLOOR_GROUPS = Counter(
    "rcgrpo_learner_noise_floor_groups_total",
    "Scored groups whose instruction reward's within-group std was below reward.noise_floor, by task kind",
    ["task"],
)
LEARNER_GROUPS = Counter("rcgrpo_learner_groups_total", "Scored groups consumed, by outcome", ["outcome"])
LEARNER_STALENESS = Histogram(
    "rcgrpo_learner_staleness",
    "Policy versions between a group's sampler and the learner",
    buckets=(0, 1, 2, 3, 4, 6, 8, 16),
)


def export_learner_update(result: dict, trained: int, zero_variance: int) -> None:
    """An update's result as Prometheus metrics: every declared statistic's gauge, and the counters."""
    for statistic in LEARNER_STATISTICS:
        if statistic.gauge_name is None or statistic.key not in result:
            continue
        gauge, value = LEARNER_GAUGES[statistic.gauge_name], result[statistic.key]
        if isinstance(statistic.label, tuple):
            gauge.labels(statistic.label[1]).set(value)
        elif statistic.label is not None:
            for label, sample in value.items():
                gauge.labels(str(label)).set(sample)
        else:
            gauge.set(value)
    LEARNER_STEP_SECONDS.observe(result["update_seconds"])
    for row in result["group_signal"]:
        if row["below_noise_floor"]:
            LEARNER_NOISE_FLOOR_GROUPS.labels(row["task"] or "unknown").inc()
    LEARNER_GROUPS.labels("trained").inc(trained)
    LEARNER_GROUPS.labels("zero_variance").inc(zero_variance)


# -- streams ------------------------------------------------------------------------------------
STREAM_LENGTH = Gauge("rcgrpo_stream_length", "Entries in a Redis stream", ["stream"])
STREAM_PENDING = Gauge("rcgrpo_stream_pending", "Entries delivered but not acknowledged", ["stream"])
DEAD_LETTERS = Gauge("rcgrpo_dead_letters", "Entries moved to a dead-letter stream", ["stream"])

# -- the driver's supervision -----------------------------------------------------------------------
RECOVERIES = Counter(
    "rcgrpo_recoveries_total",
    "Recoveries of a run component (restarted, reconnected, republished)",
    ["component"],
)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose this process's metrics on http://host:port/metrics (loopback unless told otherwise), and
    announce the address for Prometheus when RCGRPO_METRICS_TARGETS_DIR is set."""
    start_http_server(port, addr=host)
    if directory := os.environ.get(TARGETS_DIR_ENV):
        announce_scrape_target(Path(directory), port, host)


def announce_scrape_target(directory: Path, port: int, host: str) -> Path:
    """Write `<ip>_<port>.json` (Prometheus file-based discovery) for this process; removed at exit.
    A server on all interfaces is announced at this host's address."""
    ip = socket.gethostbyname(socket.gethostname()) if host in ("", "0.0.0.0") else host
    path = directory / f"{ip}_{port}.json"
    partial = path.with_suffix(".partial")  # Prometheus reads only *.json: never a half-written file
    partial.write_text(json.dumps([{"targets": [f"{ip}:{port}"]}]))
    partial.replace(path)
    atexit.register(path.unlink, missing_ok=True)
    return path
