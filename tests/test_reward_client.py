"""The reward client's classified retries, against real HTTP servers: a scripted one and the reward server."""

import asyncio
import email.utils
import random
import socket
import time

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from reward_server.app import create_app
from reward_server.settings import RewardServerSettings
from services.http import serve_in_thread
from services.reward_client import (
    RetryPolicy,
    RewardClient,
    RewardRequestError,
    RewardUnavailableError,
    parse_retry_after,
)
from services.schemas import make_score_item

OK = {"results": [], "weights": {"acd": 0.5}}


def scripted_app(script, calls):
    """POST /v1/score answers script[k] on the k-th call (the last one repeats): (status, headers, body)
    or ("sleep", seconds) to stall past the client's timeout."""
    app = FastAPI()

    @app.post("/v1/score")
    async def score(request: Request):
        calls.append(await request.json())
        step = script[min(len(calls), len(script)) - 1]
        if step[0] == "sleep":
            await asyncio.sleep(step[1])
            return JSONResponse(OK)
        status, headers, body = step
        return JSONResponse(body, status_code=status, headers=headers)

    return app


@pytest.fixture
def sleeps():
    """The client's backoff sleeps, recorded instead of slept (pass sleep=sleeps.append)."""
    return []


def item():
    image = torch.full((3, 16, 16), 0.5)
    return make_score_item("g", 0, 1, image, image, torch.zeros(16, 16), acd=0.4)


def test_retryable_answers_are_retried_until_success(sleeps):
    calls = []
    script = [
        (503, {"Retry-After": "2"}, {"detail": "queue full", "kind": "queue_full"}),
        (429, {}, {"detail": "slow down"}),
        (502, {}, {"detail": "bad gateway"}),
        (200, {}, OK),
    ]
    with serve_in_thread(scripted_app(script, calls)) as url:
        policy = RetryPolicy(max_attempts=5, backoff_base_s=0.1, backoff_max_s=1.0)
        response = RewardClient(url, retry=policy, seed=0, sleep=sleeps.append).score([item()])
    assert response.weights == {"acd": 0.5}
    assert len(calls) == 4
    assert calls[0]["items"][0]["intrinsic"] == {"acd": 0.4}
    assert sleeps[0] == 2.0  # Retry-After above the backoff wins
    assert 0.1 <= sleeps[1] <= 0.2 and 0.2 <= sleeps[2] <= 0.4  # equal-jitter exponential steps


@pytest.mark.parametrize(
    "status,kind", [(422, "bad_input"), (401, "unauthorized"), (413, "too_large"), (404, None)]
)
def test_other_4xx_fail_fast_with_the_servers_reason(sleeps, status, kind):
    calls = []
    script = [(status, {}, {"detail": f"reason {status}", "kind": kind})]
    with serve_in_thread(scripted_app(script, calls)) as url:
        with pytest.raises(RewardRequestError, match=f"HTTP {status}.*reason {status}") as caught:
            RewardClient(url, sleep=sleeps.append).score([item()])
    assert len(calls) == 1 and sleeps == []
    assert caught.value.status == status and caught.value.kind == kind and caught.value.attempts == 1


def test_persistent_5xx_exhausts_the_attempts(sleeps):
    calls = []
    with serve_in_thread(scripted_app([(500, {}, {"detail": "boom", "kind": "internal"})], calls)) as url:
        with pytest.raises(
            RewardUnavailableError, match="after 3 attempts.*HTTP 500 \\(internal\\): boom"
        ) as caught:
            RewardClient(url, retry=RetryPolicy(max_attempts=3), sleep=sleeps.append).score([item()])
    assert len(calls) == 3 and len(sleeps) == 2
    assert caught.value.status == 500 and caught.value.attempts == 3


def test_retry_after_beyond_the_budget_gives_up_at_once(sleeps):
    calls = []
    script = [(503, {"Retry-After": "20"}, {"detail": "queue full", "kind": "queue_full"})]
    with serve_in_thread(scripted_app(script, calls)) as url:
        with pytest.raises(RewardUnavailableError, match="after 1 attempts"):
            RewardClient(url, retry=RetryPolicy(budget_s=5.0), sleep=sleeps.append).score([item()])
    assert len(calls) == 1 and sleeps == []


def test_connection_errors_are_retried(sleeps):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    client = RewardClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(max_attempts=4), sleep=sleeps.append)
    with pytest.raises(RewardUnavailableError, match="after 4 attempts.*ConnectError") as caught:
        client.score([item()])
    assert caught.value.status is None and len(sleeps) == 3


def test_timeouts_are_retried(sleeps):
    calls = []
    with serve_in_thread(scripted_app([("sleep", 1.0), (200, {}, OK)], calls)) as url:
        response = RewardClient(url, timeout_s=0.2, sleep=sleeps.append).score([item()])
    assert response.weights == {"acd": 0.5} and len(calls) == 2 and len(sleeps) == 1


def test_backoff_and_retry_after_parsing():
    policy = RetryPolicy(backoff_base_s=0.5, backoff_max_s=4.0)
    rng = random.Random(0)
    for retry, step in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        delays = [policy.backoff(retry, rng) for _ in range(50)]
        assert all(step / 2 <= d <= step for d in delays) and len(set(delays)) > 1
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8.0 <= parse_retry_after(in_ten) <= 10.0


def test_against_the_reward_server():
    settings = RewardServerSettings(
        token="client-token-0123456789", rewards={"acd": 0.5, "background_psnr": 0.02}
    )
    with serve_in_thread(create_app(settings)) as url:
        client = RewardClient(url, token="client-token-0123456789")
        client.wait_ready(timeout_s=30)
        assert [r.name for r in client.rewards().rewards] == ["acd", "background_psnr"]
        response = client.score([item()], rewards=["acd"], weights={"acd": 2.0})
        assert response.results[0].scores == {"acd": pytest.approx(0.4)}
        assert response.results[0].total == pytest.approx(0.8)
        with pytest.raises(RewardRequestError, match="reward 'lc_t' is not served by this server") as caught:
            client.score([item()], rewards=["lc_t"])
        assert caught.value.status == 422 and caught.value.kind == "bad_input"
        with pytest.raises(RewardRequestError, match="HTTP 401"):
            RewardClient(url, token="wrong-token-0123456789").rewards()
