"""A Python client for the reward server with bounded, classified retries.

Retried (exponential backoff with jitter, honouring Retry-After, within max_attempts and a time
budget): connection errors, timeouts, and 429 / 5xx answers (503 is the server's backpressure).
Not retried: every other 4xx, raised at once as RewardRequestError with the server's reason. Scoring
is a pure function of the request, so retrying a POST is safe.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from services.auth import bearer_header
from services.schemas import RewardsResponse, ScoreItem, ScoreRequest, ScoreResponse


class RewardServerError(RuntimeError):
    def __init__(self, message: str, status: int | None = None, kind: str | None = None, attempts: int = 1):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.attempts = attempts


class RewardRequestError(RewardServerError):
    """The server refused the request (4xx other than 429): retrying would not help."""


class RewardUnavailableError(RewardServerError):
    """Retries were exhausted (attempts or time budget) on retryable failures."""


@dataclass
class RetryPolicy:
    max_attempts: int = 6
    backoff_base_s: float = 0.1
    backoff_max_s: float = 5.0
    budget_s: float = 60.0  # wall time across all attempts and waits
    max_retry_after_s: float = 30.0  # a Retry-After above this is capped

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Equal jitter: half the exponential step fixed, half uniform, so callers spread out."""
        step = min(self.backoff_max_s, self.backoff_base_s * 2**retry)
        return step / 2 + rng.uniform(0, step / 2)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _reason(response: httpx.Response) -> tuple[str, str | None]:
    try:
        body = response.json()
        return str(body.get("detail", body)), body.get("kind")
    except ValueError:
        return response.text[:500] or response.reason_phrase, None


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


class RewardClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        seed: int | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        headers = bearer_header(token) if token else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s, transport=transport)
        self.retry = retry or RetryPolicy()
        self.rng = random.Random(seed)
        self.sleep = sleep

    def score(
        self,
        items: list[ScoreItem],
        rewards: list[str] | None = None,
        weights: dict[str, float] | None = None,
    ) -> ScoreResponse:
        request = ScoreRequest(items=items, rewards=rewards, weights=weights)
        response = self.request("POST", "/v1/score", json=request.model_dump(mode="json", exclude_none=True))
        return ScoreResponse.model_validate(response.json())

    def rewards(self) -> RewardsResponse:
        return RewardsResponse.model_validate(self.request("GET", "/v1/rewards").json())

    def ready(self) -> bool:
        """One unretried probe of /readyz."""
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.1) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise RewardUnavailableError(
                    f"reward server at {self.http.base_url} not ready after {timeout_s} s"
                )
            time.sleep(poll_s)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """Send with retries; the successful response, or RewardRequestError / RewardUnavailableError."""
        policy = self.retry
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            retry_after = None
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as error:  # connection errors and timeouts
                failure = f"{type(error).__name__}: {error}"
                status, kind = None, None
            else:
                if response.is_success:
                    return response
                detail, kind = _reason(response)
                status = response.status_code
                failure = f"HTTP {status} ({kind or 'error'}): {detail}"
                if not _retryable_status(status):
                    raise RewardRequestError(f"{method} {path} failed: {failure}", status, kind, attempt)
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            delay = policy.backoff(attempt - 1, self.rng)
            if retry_after is not None:
                delay = max(delay, min(retry_after, policy.max_retry_after_s))
            spent = time.monotonic() - start
            if attempt >= policy.max_attempts or spent + delay > policy.budget_s:
                raise RewardUnavailableError(
                    f"{method} {path} gave up after {attempt} attempts in {spent:.1f} s; last: {failure}",
                    status,
                    kind,
                    attempt,
                )
            self.sleep(delay)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
