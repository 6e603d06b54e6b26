"""Bearer-token auth shared by the HTTP services and their clients.

A service reads its token from the environment or a file (never from a config file that gets
committed) and compares what a caller sends in constant time.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

MIN_TOKEN_CHARS = 16
# The reward server's bearer token, for the server and for the driver that checks it (RCGRPO_REWARD_* is
# the server's settings prefix, so this is its `token` setting).
TOKEN_ENV = "RCGRPO_REWARD_TOKEN"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def load_token(token: str | None = None, token_file: str | os.PathLike | None = None) -> str:
    """The token given directly, else the first line of token_file; raises ValueError if neither
    yields a token of at least MIN_TOKEN_CHARS characters."""
    if token is None and token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise ValueError(f"token file {path} does not exist")
        token = path.read_text().strip()
    if not token:
        raise ValueError("no auth token configured: set one (token or token_file) or disable auth explicitly")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"auth token is {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
    return token


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an `Authorization` header value is `Bearer <token>` (constant-time comparison)."""
    if not authorization:
        return False
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


def bearer_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
