"""A vision-language judge behind an OpenAI-compatible `/v1/chat/completions` endpoint (what vLLM and
SGLang serve), as the `vlm_judge` reward.

Per item one chat request: the configured system message, then one user message with the prompt
(instruction and caption filled in) and the configured images as PNG data URLs. The answer's score is
the first match of `score_pattern`, mapped linearly from `score_range` onto [0, 1].

Calls run in a pool of `max_concurrency` threads shared by every caller, so the endpoint never has
more requests in flight than that. Each attempt has `timeout_s`. Timeouts, connection errors, 429 and
5xx answers, unreadable bodies and answers without a score in range are retried (exponential backoff)
up to `max_attempts`; other 4xx answers are not (the request itself is wrong). When an item's
attempts are used up the whole batch fails with JudgeError: the server answers 503 naming the reward,
and never substitutes a score. Every call is counted by outcome and timed in Prometheus.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from rcgrpo.clip_scores import mask_bbox
from reward_server.metrics import RewardServerMetrics
from reward_server.reward_batch import RewardBatch
from reward_server.settings import JudgeSettings
from services.codec import encode_image, encode_mask

log = logging.getLogger("rcgrpo.reward_server.judge")


class JudgeError(RuntimeError):
    """The judge gave no usable score for an item within its attempts."""


class _Retryable(Exception):
    def __init__(self, outcome: str, detail: str):
        super().__init__(detail)
        self.outcome = outcome


def _data_url(png: bytes) -> dict:
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
    }


class Judge:
    def __init__(self, settings: JudgeSettings, metrics: RewardServerMetrics | None = None):
        self.settings = settings
        self.metrics = metrics
        self.pattern = re.compile(settings.score_pattern)
        headers = {}
        if settings.api_key_env is not None:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise ValueError(f"judge.api_key_env names {settings.api_key_env}, which is not set")
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=settings.max_concurrency)
        self.http = httpx.Client(
            base_url=settings.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=settings.timeout_s,
            limits=limits,
        )
        self.pool = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="judge")

    def score(self, batch: RewardBatch) -> torch.Tensor:
        """One score in [0, 1] per item; JudgeError if any item got none."""
        futures = [self.pool.submit(self._score_item, batch, i) for i in range(batch.edits.shape[0])]
        scores = [future.result() for future in futures]  # the first failure propagates
        return torch.tensor(scores, dtype=torch.float64)

    def messages(self, batch: RewardBatch, i: int) -> list[dict]:
        s = self.settings
        content: list[dict] = [
            {
                "type": "text",
                "text": s.prompt.format(instruction=batch.instructions[i], caption=batch.captions[i]),
            }
        ]
        for name in s.images:
            if name == "source":
                content.append(_data_url(encode_image(batch.sources[i])))
            elif name == "edit":
                content.append(_data_url(encode_image(batch.edits[i])))
            elif name == "mask":
                content.append(_data_url(encode_mask(batch.masks[i])))
            else:  # edit_crop: the mask's box as CompBench crops it; the whole edit for a mask without one
                box = mask_bbox(batch.masks[i])
                edit = batch.edits[i]
                if box is not None:
                    left, top, right, bottom = box
                    edit = edit[:, top:bottom, left:right]
                content.append(_data_url(encode_image(edit)))
        system = [{"role": "system", "content": s.system}] if s.system else []
        return [*system, {"role": "user", "content": content}]

    def parse(self, text: str) -> float:
        """The answer's score mapped onto [0, 1]; ValueError if it has none in range."""
        found = self.pattern.search(text)
        if found is None:
            raise ValueError(f"no match of {self.settings.score_pattern!r} in {text[:200]!r}")
        value = float(found.group(1))
        low, high = self.settings.score_range
        if not low <= value <= high:
            raise ValueError(f"score {value} outside score_range {list(self.settings.score_range)}")
        return (value - low) / (high - low)

    def _score_item(self, batch: RewardBatch, i: int) -> float:
        s = self.settings
        body = {
            "model": s.model,
            "messages": self.messages(batch, i),
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
        }
        failures = []
        for attempt in range(1, s.max_attempts + 1):
            if attempt > 1:
                time.sleep(s.backoff_s * 2 ** (attempt - 2))
            start = time.perf_counter()
            try:
                score = self._call(body)
            except _Retryable as error:
                outcome = error.outcome
                failures.append(f"{outcome}: {error}")
            except JudgeError as error:  # refused: retrying the same request would not help
                self._observe("refused", start)
                raise JudgeError(f"{s.base_url} refused the request: {error}") from None
            else:
                self._observe("ok", start)
                return score
            self._observe(outcome, start)
            log.warning("judge attempt %d/%d failed: %s", attempt, s.max_attempts, failures[-1])
        raise JudgeError(f"{s.base_url} gave no score in {s.max_attempts} attempts; last: {failures[-1]}")

    def _call(self, body: dict) -> float:
        try:
            response = self.http.post("chat/completions", json=body)
        except httpx.TimeoutException as error:
            raise _Retryable(
                "timeout", f"no answer within {self.settings.timeout_s} s ({type(error).__name__})"
            ) from None
        except httpx.TransportError as error:
            raise _Retryable("connect_error", f"{type(error).__name__}: {error}") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable("server_error", f"HTTP {response.status_code}: {response.text[:200]}") from None
        if not response.is_success:
            raise JudgeError(f"HTTP {response.status_code}: {response.text[:300]}")
        try:
            text = response.json()["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise _Retryable(
                "bad_response", f"not a chat completion ({error!r}): {response.text[:200]}"
            ) from None
        try:
            return self.parse(text)
        except ValueError as error:
            raise _Retryable("unparseable", str(error)) from None

    def _observe(self, outcome: str, start: float) -> None:
        if self.metrics is not None:
            self.metrics.judge_calls.labels(judge=self.settings.model, outcome=outcome).inc()
            self.metrics.judge_latency.labels(judge=self.settings.model).observe(time.perf_counter() - start)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()
