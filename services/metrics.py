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
LEARNER_STEP = Gauge("rcgrpo_learner_step", "Optimiser steps taken")
LEARNER_STEP_SECONDS = Histogram(
    "rcgrpo_learner_step_seconds",
    "Wall time of one learner update",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LEARNER_LOSS = Gauge("rcgrpo_learner_loss", "Surrogate loss of the last update")
LEARNER_REWARD_MEAN = Gauge("rcgrpo_learner_reward_mean", "Mean total reward of the last batch")
LEARNER_REWARD_STD = Gauge("rcgrpo_learner_reward_std", "Mean within-group reward std of the last batch")
LEARNER_ACD = Gauge("rcgrpo_learner_acd_mean", "Mean ACD reward of the last batch")
LEARNER_CLIP_FRACTION = Gauge("rcgrpo_learner_clip_fraction", "Fraction of clipped ratios in the last update")
# -- the learning signal: is the policy moving, does the reward spread, is the advantage the instruction's
LEARNER_RATIO_DEVIATION = Gauge(
    "rcgrpo_learner_ratio_deviation", "Quantile of |r - 1| over the last update's ratios", ["quantile"]
)
LEARNER_APPROX_KL = Gauge("rcgrpo_learner_approx_kl", "Estimated KL(pi_old || pi_theta) of the last update")
LEARNER_POLICY_ENTROPY = Gauge(
    "rcgrpo_learner_policy_entropy", "Mean entropy of pi_old over the G candidates (nats)"
)
LEARNER_EFFECTIVE_NEIGHBOURS = Gauge(
    "rcgrpo_learner_effective_neighbours", "Mean exp(entropy of pi_old): candidates pi_old spreads over"
)
LEARNER_GRAD_NORM = Gauge("rcgrpo_learner_grad_norm", "LoRA gradient norm before clipping, last update")
LEARNER_DISTANCE_SCALE = Gauge(
    "rcgrpo_learner_distance_scale",
    "Mean distance between candidates and the anchor at a grid step, last update",
    ["timestep"],
)
LEARNER_REWARD_TERM_SPREAD = Gauge(
    "rcgrpo_learner_reward_term_spread", "Mean within-group std of w_j * r_j, last batch", ["reward"]
)
LEARNER_INSTRUCTION_SHARE = Gauge(
    "rcgrpo_learner_instruction_share",
    "Share of the advantages' variance explained by the instruction term, last batch",
)
LEARNER_INSTRUCTION_DOMINANT = Gauge(
    "rcgrpo_learner_instruction_dominant",
    "Share of the last batch's groups whose largest reward spread is the instruction term's",
)
LEARNER_BACKGROUND_ANCHOR = Gauge(
    "rcgrpo_learner_background_anchor", "Background anchor term mean_bg ||v_theta - v_ref||^2, last update"
)
LEARNER_ZERO_VARIANCE_RATIO = Gauge(
    "rcgrpo_learner_zero_variance_ratio", "Share of groups dropped for zero reward std"
)
LEARNER_NOISE_FLOOR_GROUPS = Counter(
    "rcgrpo_learner_noise_floor_groups_total",
    "Scored groups whose instruction reward's within-group std was below reward.noise_floor, by task kind",
    ["task"],
)
LEARNER_NOISE_GRADIENT_SHARE = Gauge(
    "rcgrpo_learner_noise_gradient_share",
    "Share of the last update's gradient carried by groups below the reward's noise floor",
)
LEARNER_GRADIENT_NORM = Gauge(
    "rcgrpo_learner_gradient_norm",
    "Norm of a term's gradient in the last update (surrogate, anchor)",
    ["term"],
)
LEARNER_ANCHOR_SURROGATE_COSINE = Gauge(
    "rcgrpo_learner_anchor_surrogate_cosine",
    "Cosine between the background anchor's and the surrogate's gradients, last update",
)
LEARNER_POLICY_VERSION = Gauge("rcgrpo_learner_policy_version", "Newest published policy version")
LEARNER_GROUPS = Counter("rcgrpo_learner_groups_total", "Scored groups consumed, by outcome", ["outcome"])
LEARNER_STALENESS = Histogram(
    "rcgrpo_learner_staleness",
    "Policy versions between a group's sampler and the learner",
    buckets=(0, 1, 2, 3, 4, 6, 8, 16),
)

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
