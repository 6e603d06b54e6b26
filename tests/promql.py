"""What the Grafana dashboard and the Prometheus alert rules query: the deployed files' PromQL, the
metric and label names in it, and a check of those names against what something exports (the
metrics the code defines in test_deploy_files.py, the running components' /metrics in
test_observability.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "rcgrpo.json"

_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_METRIC = re.compile(r"\brcgrpo_[a-zA-Z0-9_]+")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*$")
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance"}


def promql_metrics(expr: str) -> set[str]:
    return set(_METRIC.findall(_QUOTED.sub('""', expr)))


def promql_labels(expr: str) -> set[str]:
    """Label names an expression groups or matches on."""
    labels = set()
    for group in _GROUPING.findall(expr):
        labels.update(name.strip() for name in group.split(",") if name.strip())
    for selector in re.findall(r"\{([^}]*)\}", expr):
        for part in _QUOTED.split(selector):
            match = _MATCHER.search(part)
            if match:
                labels.add(match.group(1))
    return labels


def check_queries(
    queries: list[tuple[str, str]], exported: dict[str, set[str]], legends: dict[str, str] | None = None
) -> list[str]:
    """Problems with (where, PromQL) pairs against `exported` (series name -> its label names):
    metric names not exported, label names no queried metric has."""
    problems = []
    for where, expr in queries:
        metrics = promql_metrics(expr)
        problems += [f"{where}: {name} is not exported" for name in sorted(metrics - set(exported))]
        known_labels = TARGET_LABELS.union(*(exported.get(name, set()) for name in metrics))
        used = promql_labels(expr) | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", (legends or {}).get(where, "")))
        problems += [
            f"{where}: label {label!r} not on {sorted(metrics)}" for label in sorted(used - known_labels)
        ]
    return problems


def dashboard_targets() -> list[tuple[str, dict]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (f"panel {panel['title']!r} {t['refId']}", t)
        for panel in dashboard["panels"]
        for t in panel.get("targets", [])
    ]


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def deployed_queries() -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Every (where, PromQL) the dashboard and the alert rules (with their annotations) evaluate, and
    the dashboard's legend formats by where."""
    targets = dashboard_targets()
    queries = [(where, t["expr"]) for where, t in targets]
    for rule in alert_rules():
        queries.append((f"alert {rule['alert']}", rule["expr"]))
        queries += [(f"alert {rule['alert']} {key}", text) for key, text in rule["annotations"].items()]
    return queries, {where: t.get("legendFormat", "") for where, t in targets}
