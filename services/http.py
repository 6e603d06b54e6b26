"""Serving an ASGI app with uvicorn: in the foreground (a service's CLI) or in a background thread on a
free loopback port (tests, benchmarks, embedded runs)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

START_TIMEOUT_S = 30.0


def serve(app, host: str, port: int, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM. Binds exactly `host` (callers default to 127.0.0.1)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, proxy_headers=False)


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run `app` on a uvicorn server in a daemon thread; yields its base URL, stops it on exit.

    The socket is bound here (port 0: a free one) and handed to uvicorn, so no other process can take
    the port between choosing and binding it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT_S)
        sock.close()
