"""The reward server's Prometheus metrics, all prefixed `rcgrpo_reward_`, in a registry per app (so
several servers in one process, as in tests, keep separate counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# errors_total's kind label: why a request or stream entry failed.
ERROR_KINDS = (
    "unauthorized",  # missing or wrong bearer token
    "too_large",  # body over max_body_bytes
    "validation",  # body does not match the schema
    "bad_input",  # undecodable image, size mismatch, unknown reward, missing input
    "queue_full",  # backpressure (503)
    "not_ready",  # models still loading (503)
    "reward_failed",  # a reward could not be computed (503 naming it): judge down, model error
    "malformed",  # a body that cannot even be parsed (400), e.g. nested too deeply
    "not_found",  # no such route (404) or method (405)
    "internal",  # a server bug (500)
    "stream_bad_message",  # a rollout group that cannot be decoded (left pending, then dead-lettered)
    "stream_failed",  # a rollout group that decoded but could not be scored
)


class RewardServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rcgrpo_reward_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "rcgrpo_reward_request_latency_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items_scored = Counter(
            "rcgrpo_reward_items_scored_total",
            "items scored, by where they came from",
            ["source"],
            registry=r,
        )
        self.batch_size = Histogram(
            "rcgrpo_reward_batch_size",
            "items per model-based batch",
            ["reward"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "rcgrpo_reward_queue_depth", "model-based items queued or running", registry=r
        )
        self.reward_latency = Histogram(
            "rcgrpo_reward_reward_latency_seconds",
            "time to compute one reward on one batch",
            ["reward"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reward_failures = Counter(
            "rcgrpo_reward_reward_failures_total",
            "batches a reward could not score (answered 503 or left pending, never as a number)",
            ["reward"],
            registry=r,
        )
        self.judge_calls = Counter(
            "rcgrpo_reward_judge_calls_total",
            "calls to a judge endpoint by outcome (ok, timeout, connect_error, server_error, refused,"
            " bad_response, unparseable)",
            ["judge", "outcome"],
            registry=r,
        )
        self.judge_latency = Histogram(
            "rcgrpo_reward_judge_latency_seconds",
            "time of one call to a judge endpoint, whatever its outcome",
            ["judge"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter("rcgrpo_reward_errors_total", "errors by kind", ["kind"], registry=r)
        self.models_ready = Gauge(
            "rcgrpo_reward_models_ready", "1 once every served model is loaded", registry=r
        )
        self.stream_groups = Counter(
            "rcgrpo_reward_stream_groups_total",
            "rollout groups taken from the stream, by outcome (scored, duplicate, failed, dead_lettered)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("scored", "duplicate", "failed", "dead_lettered"):
            self.stream_groups.labels(outcome=outcome)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)  # export zeros so dashboards see every kind

    @property
    def names(self) -> list[str]:
        return sorted({metric.name for metric in self.registry.collect()})
