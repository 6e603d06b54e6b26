"""A small OpenAI-compatible chat-completions server standing in for a vLLM judge in tests.

It answers `POST /v1/chat/completions` as the test sets it up: with "SCORE: s", s the mean brightness of
the request's second image (the edit) on a 0-10 scale, after `delay_s`; or failing (`fail_first`
HTTP 500s, then normal answers), refusing (HTTP 400), or with answers no parser can read. It records
every request body and the most requests it had in flight at once.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from contextlib import contextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from services.http import serve_in_thread


def images_of(body: dict) -> list[np.ndarray]:
    """The request's images, decoded from their PNG data URLs, as uint8 arrays."""
    out = []
    for message in body["messages"]:
        if isinstance(message["content"], str):
            continue
        for part in message["content"]:
            if part["type"] == "image_url":
                data = part["image_url"]["url"].split(",", 1)[1]
                out.append(np.array(Image.open(io.BytesIO(base64.b64decode(data)))))
    return out


def brightness_score(edit: np.ndarray) -> float:
    """The score the stand-in gives an edit, on its 0-10 scale."""
    return round(float(edit.astype(np.float64).mean() / 255 * 10), 2)


class StandIn:
    def __init__(self):
        self.mode = "ok"  # ok | fail | refuse | garbage | out_of_range
        self.fail_first = 0  # in mode ok: answer this many requests with HTTP 500 first
        self.delay_s = 0.0
        self.requests: list[dict] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()

    def reset(self, **values) -> None:
        with self._lock:
            self.mode, self.fail_first, self.delay_s = "ok", 0, 0.0
            self.requests, self.in_flight, self.peak_in_flight = [], 0, 0
            for name, value in values.items():
                setattr(self, name, value)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with self._lock:
                self.requests.append(body)
                number = len(self.requests)
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay_s)
                if self.mode == "fail" or number <= self.fail_first:
                    return JSONResponse({"error": {"message": "the engine is overloaded"}}, status_code=500)
                if self.mode == "refuse":
                    return JSONResponse({"error": {"message": "prompt is too long"}}, status_code=400)
                if self.mode == "garbage":
                    text = "A lovely edit, I would say."
                elif self.mode == "out_of_range":
                    text = "SCORE: 42"
                else:
                    text = f"Looks fine.\nSCORE: {brightness_score(images_of(body)[1])}"
                return {
                    "id": f"chatcmpl-{number}",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                }
            finally:
                with self._lock:
                    self.in_flight -= 1

        return app


@contextmanager
def serve_standin():
    """A StandIn on a free loopback port: yields (stand-in, its /v1 base URL)."""
    standin = StandIn()
    with serve_in_thread(standin.app()) as url:
        yield standin, f"{url}/v1"
