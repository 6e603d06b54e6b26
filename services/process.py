"""What every process of the system does the same way: its log lines' format, and finding a free
loopback port for a server it starts."""

from __future__ import annotations

import logging
import socket

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def configure_logging(level: int | str) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
