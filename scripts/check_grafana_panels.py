"""Run every query of the Grafana dashboard against a live Prometheus and fail, naming the panel, if
one returns no data: what a user opening the dashboard during a run would see as "No data".

    python scripts/check_grafana_panels.py --prometheus http://prometheus:9090 [--timeout 120]

Grafana's interval variables become --rate-interval; each query is a range query over --lookback (the
dashboard's time range), as Grafana makes it. Queries are retried until every one has data or the
timeout passes (rates need two scrapes). Needs only httpx; scripts/compose-smoke.sh runs it inside
the cluster while a job trains, tests/test_observability.py against its own Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "rcgrpo.json"
INTERVAL_VARIABLES = ("$__rate_interval", "$__interval", "$__range")


def panel_queries(dashboard: Path, rate_interval: str) -> list[tuple[str, str]]:
    """(panel title and query refId, PromQL) of every query of every panel, rows' panels included."""

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    queries = []
    for panel in panels(json.loads(dashboard.read_text())["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable in INTERVAL_VARIABLES:
                expr = expr.replace(variable, rate_interval)
            queries.append((f"panel {panel['title']!r} {target.get('refId', '')}".rstrip(), expr))
    return queries


def series(prometheus: str, expr: str, lookback_s: float) -> int:
    """How many series a range query over the last lookback_s returns, as Grafana asks for a panel over
    its time range (a run that just ended still shows its curves; an instant query would find its
    gauges stale); a query Prometheus refuses is an error."""
    end = time.time()
    params = {"query": expr, "start": end - lookback_s, "end": end, "step": 15}
    reply = httpx.get(f"{prometheus}/api/v1/query_range", params=params, timeout=10).json()
    if reply["status"] != "success":
        raise SystemExit(f"FAIL: Prometheus refused {expr!r}: {reply.get('error', reply)}")
    return len(reply["data"]["result"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://prometheus:9090")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD, help=f"default: {DASHBOARD}")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes (default 1m)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for every panel's data")
    parser.add_argument(
        "--no-data-expected",
        action="append",
        default=[],
        metavar="PANEL",
        help="a panel title whose queries may be empty here, e.g. the batcher's batch size where no "
        "model-based reward runs (reported, not failed)",
    )
    parser.add_argument(
        "--lookback", type=float, default=3600, help="the dashboard's time range in seconds (default: 1 h)"
    )
    args = parser.parse_args(argv)
    queries = panel_queries(args.dashboard, args.rate_interval)
    expected = [f"panel {title!r}" for title in args.no_data_expected]
    required = [not any(where.startswith(panel + " ") for panel in expected) for where, _ in queries]
    deadline = time.monotonic() + args.timeout
    while True:  # two panels may share a title: queries are told apart by position
        counts = [series(args.prometheus, expr, args.lookback) for _, expr in queries]
        if all(c or not r for c, r in zip(counts, required, strict=True)) or time.monotonic() > deadline:
            break
        time.sleep(2)
    for (where, _), count in zip(queries, counts, strict=True):
        print(f"  {'data' if count else 'NO DATA'}: {where}: {count} series")
    empty = [
        (where, expr)
        for (where, expr), count, needed in zip(queries, counts, required, strict=True)
        if not count and needed
    ]
    if empty:
        print(
            f"FAIL: {len(empty)} of {len(queries)} dashboard queries have no data after {args.timeout:g} s:"
        )
        for where, expr in empty:
            print(f"  {where}: {expr}")
        return 1
    skipped = sum(1 for count, needed in zip(counts, required, strict=True) if not count and not needed)
    note = f" ({skipped} empty, as --no-data-expected allows)" if skipped else ""
    print(f"OK: every one of the {len(queries)} dashboard queries has data{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
