"""Schemathesis over the real reward server's OpenAPI schema: every generated request, valid by the
schema or not, must be answered below 500.

The server is `rcgrpo reward-server` in a child process (the tiny run's rewards) and the requests carry
its token, so they reach validation and scoring rather than stopping at 401. Half the cases are
generated valid by the schema ("positive"), half invalid ("negative"); `--cases` is the total. The
test suite runs 60 of each (tests/test_reward_server.py); this runs many more. Reported: the cases
run, the answers by operation and status, and each 5xx with its request. The exit status is 1 if any
answer was a 5xx.

    .venv/bin/python bench/fuzz_reward_server.py --cases 10000
    nice -n 19 .venv/bin/python bench/fuzz_reward_server.py --cases 1000   # the reduced form
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="generated requests in all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import schemathesis
    from hypothesis import HealthCheck, given, seed, settings
    from schemathesis.generation import GenerationMode
    from soak_reward_server import TOKEN, start_server, wait_ready

    workdir = Path(tempfile.mkdtemp(prefix="rcgrpo-fuzz-"))
    server, url = start_server(workdir)
    answered: Counter[tuple[str, str, int]] = Counter()
    errors: list[str] = []
    started = time.monotonic()
    try:
        wait_ready(server, url)
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        for mode in ("positive", "negative"):

            @seed(args.seed)
            @settings(
                max_examples=args.cases // 2,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=schema.as_strategy(GenerationMode(mode)))
            def check(case):
                response = case.call(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
                answered[(case.method, case.path, response.status_code)] += 1
                if response.status_code >= 500:
                    errors.append(
                        f"{case.method} {case.path} {response.status_code}: body {str(case.body)[:200]!r} "
                        f"-> {response.text[:200]!r}"
                    )

            check()
    finally:
        server.terminate()
        server.wait(30)

    total = sum(answered.values())
    print(f"schemathesis over {url}/openapi.json: {total} cases in {time.monotonic() - started:.0f} s")
    print("\n| operation | status | answers |")
    print("|---|---|---|")
    for (method, path, status), count in sorted(answered.items()):
        print(f"| {method} {path} | {status} | {count} |")
    fives = sum(n for (_, _, status), n in answered.items() if status >= 500)
    print(f"\n5xx answers: {fives}")
    for error in errors[:20]:
        print(f"  {error}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
    )
    return 1 if fives else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
