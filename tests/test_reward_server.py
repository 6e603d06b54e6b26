"""The reward server over real HTTP: a uvicorn server on a free loopback port per app."""

import base64
import io
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from rcgrpo import rewards as reward_fns
from rcgrpo.clip_scores import build_tiny_clip, load_clip
from rcgrpo.data.shapes import ShapesEditConfig, generate_shapes_edit
from reward_server.app import create_app
from reward_server.registry import REWARDS, Reward
from reward_server.settings import RewardServerSettings, load_settings
from services.auth import bearer_header
from services.http import serve_in_thread
from services.reward_client import RewardClient
from services.schemas import make_score_item

TOKEN = "test-token-0123456789abcdef"
AUTH = bearer_header(TOKEN)
ALL_REWARDS = {
    "region_adherence": 1.0,
    "background_psnr": 0.02,
    "background_ssim": 1.0,
    "lc_t": 0.01,
    "lc_i": 1.0,
    "acd": 0.5,
}


def q(x: torch.Tensor) -> torch.Tensor:
    """What survives an 8-bit PNG round trip."""
    return (x.clamp(0, 1) * 255).round() / 255


def png_b64(array: np.ndarray, mode: str, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def make_items(seed: int = 0, n: int = 3, size: int = 64):
    """n ShapesEdit candidates: (source, edit, mask, target, caption, acd), all exactly 8-bit."""
    samples = generate_shapes_edit(n, seed=seed, config=ShapesEditConfig(size=size))
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(samples):
        edit = q(s.target + 0.1 * torch.randn(s.target.shape, generator=g))
        out.append(
            dict(
                source=q(s.source),
                edit=edit,
                mask=q(s.mask),
                target=q(s.target),
                caption=s.caption,
                acd=0.1 + 0.2 * i,
            )
        )
    return out


def wire(items, group_id="g", policy_version=3, with_target=True, with_acd=True):
    return [
        make_score_item(
            group_id,
            i,
            policy_version,
            it["source"],
            it["edit"],
            it["mask"],
            instruction="edit it",
            caption=it["caption"],
            target=it["target"] if with_target else None,
            acd=it["acd"] if with_acd else None,
        ).model_dump(mode="json", exclude_none=True)
        for i, it in enumerate(items)
    ]


def metric_value(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name + ("{" + labels + "}" if labels else "")) + r" ([0-9.e+-]+)"
    found = re.search(pattern, text)
    assert found, f"{name}{{{labels}}} not in /metrics"
    return float(found.group(1))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


def settings_for(clip_dir, **overrides):
    values = dict(
        token=TOKEN,
        rewards=ALL_REWARDS,
        models={"clip": clip_dir},
        max_body_bytes=4 * 1024 * 1024,
        max_items_per_request=16,
        max_image_pixels=128 * 128,
        batching={"max_batch_size": 8, "max_wait_ms": 2, "max_queue_items": 64},
    )
    values.update(overrides)
    return RewardServerSettings(**values)


@pytest.fixture(scope="module")
def server(clip_dir):
    with serve_in_thread(create_app(settings_for(clip_dir))) as url:
        RewardClient(url).wait_ready(timeout_s=60)
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
            yield http


def test_rewards_listing_and_openapi(server):
    listing = server.get("/v1/rewards").json()["rewards"]
    by_name = {r["name"]: r for r in listing}
    assert list(by_name) == list(ALL_REWARDS)
    assert {n: r["weight"] for n, r in by_name.items()} == ALL_REWARDS
    assert by_name["lc_t"]["model_based"] and by_name["lc_i"]["model_based"]
    assert not by_name["background_psnr"]["model_based"]
    assert by_name["region_adherence"]["inputs"] == ["edit", "target", "mask"]
    assert by_name["acd"]["inputs"] == ["acd"]
    schema = httpx.get(f"{server.base_url}/openapi.json").json()
    assert {"/v1/score", "/v1/rewards", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_scores_equal_direct_calls_of_the_reward_functions(server, clip_dir):
    # two image sizes in one request: the server batches each size separately
    items = make_items(seed=1, n=3, size=64) + make_items(seed=2, n=2, size=48)
    response = server.post("/v1/score", json={"items": wire(items, "grp-1", 7)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["weights"] == ALL_REWARDS
    results = body["results"]
    assert [(r["group_id"], r["candidate_index"], r["policy_version"]) for r in results] == [
        ("grp-1", i, 7) for i in range(5)
    ]
    clip = load_clip(clip_dir)
    expected = {name: [] for name in ALL_REWARDS}
    for part in (items[:3], items[3:]):
        edits, sources, targets = (torch.stack([it[k] for it in part]) for k in ("edit", "source", "target"))
        masks = torch.stack([it["mask"] for it in part])
        expected["region_adherence"] += reward_fns.region_adherence(edits, targets, masks).tolist()
        expected["background_psnr"] += reward_fns.background_psnr(edits, sources, masks).tolist()
        expected["background_ssim"] += reward_fns.background_ssim(edits, sources, masks).tolist()
        expected["lc_t"] += clip.lc_t(edits, masks, [it["caption"] for it in part]).tolist()
        expected["lc_i"] += clip.lc_i(edits, targets, masks).tolist()
        expected["acd"] += [it["acd"] for it in part]
    for i, result in enumerate(results):
        for name in ALL_REWARDS:
            assert result["scores"][name] == pytest.approx(expected[name][i], rel=1e-5, abs=1e-5), name
        total = sum(w * expected[n][i] for n, w in ALL_REWARDS.items())
        assert result["total"] == pytest.approx(total, rel=1e-5, abs=1e-5)
    assert any(s > 0 for s in expected["lc_i"])  # the scores are real numbers, not placeholders
    assert len({round(r["scores"]["region_adherence"], 6) for r in results}) > 1


def test_request_chooses_rewards_and_weights(server):
    items = make_items(seed=3, n=2)
    body = {
        "items": wire(items, with_target=False),
        "rewards": ["background_ssim", "acd"],
        "weights": {"acd": 2.0},
    }
    response = server.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["weights"] == {"background_ssim": 1.0, "acd": 2.0}
    for result, item in zip(out["results"], items, strict=True):
        assert set(result["scores"]) == {"background_ssim", "acd"}
        assert result["scores"]["acd"] == pytest.approx(item["acd"], abs=1e-12)  # passed through exactly
        assert result["total"] == pytest.approx(result["scores"]["background_ssim"] + 2.0 * item["acd"])


def test_auth(server):
    url = f"{server.base_url}/v1/rewards"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url).headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(url, headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    unauthenticated = httpx.post(f"{server.base_url}/v1/score", json={"items": []})
    assert unauthenticated.status_code == 401 and unauthenticated.json()["kind"] == "unauthorized"
    for open_route in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(f"{server.base_url}{open_route}").status_code == 200, open_route


def test_body_and_item_limits(server):
    url = f"{server.base_url}/v1/score"
    big = b"x" * (4 * 1024 * 1024 + 1)
    declared = httpx.post(url, content=big, headers={**AUTH, "Content-Type": "application/json"})
    assert declared.status_code == 413 and declared.json()["kind"] == "too_large"

    def chunks():  # no Content-Length: the server must count as it reads
        for _ in range(5):
            yield b"y" * (1024 * 1024)

    chunked = httpx.post(url, content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert chunked.status_code == 413
    items = wire(make_items(seed=4, n=1)) * 17
    too_many = server.post("/v1/score", json={"items": items})
    assert too_many.status_code == 413
    assert "17 items, over this server's limit of 16" in too_many.json()["detail"]


def _rgb(size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


BAD_INPUTS = [
    ("edit_not_base64", lambda it: it.update(edit="not base64!!"), "items[0].edit is not valid base64"),
    (
        "edit_not_png",
        lambda it: it.update(edit=base64.b64encode(b"hello").decode()),
        "items[0].edit is not a readable PNG",
    ),
    ("edit_jpeg", lambda it: it.update(edit=png_b64(_rgb(), "RGB", "JPEG")), "must be a RGB PNG, got JPEG"),
    ("edit_rgba", lambda it: it.update(edit=png_b64(np.zeros((64, 64, 4), np.uint8), "RGBA")), "mode RGBA"),
    (
        "edit_size_mismatch",
        lambda it: it.update(edit=png_b64(_rgb(32), "RGB")),
        "edit is 32x32 (WxH) but source is 64x64",
    ),
    (
        "mask_size_mismatch",
        lambda it: it.update(mask=png_b64(np.zeros((64, 48), np.uint8), "L")),
        "mask is 48x64 (WxH)",
    ),
    (
        "mask_rgb",
        lambda it: it.update(mask=png_b64(_rgb(), "RGB")),
        "items[0].mask: mask must be a L PNG, got PNG mode RGB",
    ),
    ("target_size_mismatch", lambda it: it.update(target=png_b64(_rgb(48), "RGB")), "target is 48x48 (WxH)"),
    (
        "image_too_large",
        lambda it: it.update(source=png_b64(_rgb(200), "RGB")),
        "over this server's limit of 16384",
    ),
    ("image_too_small", lambda it: it.update(source=png_b64(_rgb(8), "RGB")), "at least 16"),
    ("missing_target", lambda it: it.pop("target"), "reward 'region_adherence' needs 'target'"),
    ("missing_acd", lambda it: it.pop("intrinsic"), "reward 'acd' needs 'intrinsic.acd'"),
    ("missing_edit", lambda it: it.pop("edit"), "items.0.edit: Field required"),
    ("extra_field", lambda it: it.update(colour="red"), "items.0.colour: Extra inputs are not permitted"),
    ("negative_index", lambda it: it.update(candidate_index=-1), "items.0.candidate_index"),
    ("acd_out_of_range", lambda it: it.update(intrinsic={"acd": 1.5}), "items.0.intrinsic.acd"),
    ("group_id_with_spaces", lambda it: it.update(group_id="a b"), "items.0.group_id"),
]


@pytest.mark.parametrize("name,corrupt,reason", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_item_is_422_with_the_reason(server, name, corrupt, reason):
    item = wire(make_items(seed=5, n=1))[0]
    corrupt(item)
    response = server.post("/v1/score", json={"items": [item]})
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"]
    assert response.json()["kind"] in ("validation", "bad_input")


BAD_REQUESTS = [
    ("unknown_reward", {"rewards": ["nope"]}, "unknown reward 'nope'; this server serves"),
    (
        "stray_weight",
        {"rewards": ["acd"], "weights": {"lc_t": 1.0}},
        "weights given for ['lc_t'], which are not among",
    ),
    ("empty_items", {"items": []}, "items: List should have at least 1 item"),
]


@pytest.mark.parametrize("name,change,reason", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_422_with_the_reason(server, name, change, reason):
    response = server.post("/v1/score", json={"items": wire(make_items(seed=5, n=1)), **change})
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    ['{"items": [', '{"items": [], "weights": {"acd": NaN}}', "[1, 2]", "null"],
    ids=["truncated", "nan_weight", "array", "null"],
)
def test_malformed_json_is_422(server, body):
    response = server.post("/v1/score", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text


def test_metrics_count_requests_batches_and_errors(server):
    server.post("/v1/score", json={"items": wire(make_items(seed=6, n=2))})
    server.post("/v1/score", json={"items": wire(make_items(seed=6, n=1)), "rewards": ["nope"]})
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in (
        "rcgrpo_reward_requests_total",
        "rcgrpo_reward_request_latency_seconds_bucket",
        "rcgrpo_reward_batch_size_bucket",
        "rcgrpo_reward_queue_depth",
        "rcgrpo_reward_reward_latency_seconds_bucket",
        "rcgrpo_reward_errors_total",
        "rcgrpo_reward_items_scored_total",
        "rcgrpo_reward_models_ready",
        "rcgrpo_reward_stream_groups_total",
    ):
        assert name in text, name
    assert metric_value(text, "rcgrpo_reward_requests_total", 'route="/v1/score",status="200"') >= 1
    assert metric_value(text, "rcgrpo_reward_errors_total", 'kind="bad_input"') >= 1
    assert metric_value(text, "rcgrpo_reward_batch_size_count", 'reward="lc_t"') >= 1
    assert metric_value(text, "rcgrpo_reward_items_scored_total", 'source="http"') >= 2
    assert metric_value(text, "rcgrpo_reward_queue_depth") == 0
    assert metric_value(text, "rcgrpo_reward_models_ready") == 1


# ---------------------------------------------------------------------------------------------------
# batching, backpressure and readiness, with a model-based reward that waits on a gate


class GateModel:
    def __init__(self):
        self.loaded = threading.Event()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batch_sizes = []


def gated_reward(batch, models):
    gate = models["gate"]
    gate.batch_sizes.append(batch.edits.shape[0])
    gate.entered.set()
    assert gate.release.wait(30)
    means = batch.edits.mean(dim=(1, 2, 3))
    if (means == 0).any():
        raise ValueError("an all-black edit")
    return means


def gated_app(tmp_path, gate, batching):
    registry = {
        **REWARDS,
        "gated": Reward("gated", gated_reward, ("edit", "mask"), "gate", 1.0, "mean of the edit"),
    }

    def load_gate(directory):
        assert gate.loaded.wait(30)
        return gate

    settings = RewardServerSettings(
        token=TOKEN,
        rewards={"gated": 1.0},
        models={"gate": tmp_path},
        max_items_per_request=8,
        batching={**batching, "max_queue_items": 8},
    )
    return create_app(settings, registry=registry, model_loaders={"gate": load_gate})


def _post_in_thread(url, body, responses):
    thread = threading.Thread(
        target=lambda: responses.append(httpx.post(url, json=body, headers=AUTH, timeout=60))
    )
    thread.start()
    return thread


def _wait_for_queue_depth(base_url, depth):
    deadline = time.monotonic() + 30
    while metric_value(httpx.get(f"{base_url}/metrics").text, "rcgrpo_reward_queue_depth") != depth:
        assert time.monotonic() < deadline, f"queue depth never reached {depth}"
        time.sleep(0.01)


@pytest.mark.parametrize("enabled", [True, False], ids=["batching", "no_batching"])
def test_readiness_micro_batching_and_backpressure(tmp_path, enabled):
    gate = GateModel()
    app = gated_app(tmp_path, gate, {"enabled": enabled, "max_batch_size": 8, "max_wait_ms": 0})
    items = make_items(seed=7, n=9)
    bodies = [{"items": wire([it], with_target=False, with_acd=False)} for it in items]
    with serve_in_thread(app) as url:
        # models loading: not ready, and scoring answers 503 with Retry-After
        assert httpx.get(f"{url}/readyz").status_code == 503
        early = httpx.post(f"{url}/v1/score", json=bodies[0], headers=AUTH)
        assert early.status_code == 503 and early.json()["kind"] == "not_ready"
        assert early.headers["Retry-After"] == "1"
        gate.loaded.set()
        RewardClient(url).wait_ready(timeout_s=30)

        responses, threads = [], []
        threads.append(_post_in_thread(f"{url}/v1/score", bodies[0], responses))
        assert gate.entered.wait(30)  # the first item runs alone and holds the worker
        for body in bodies[1:8]:
            threads.append(_post_in_thread(f"{url}/v1/score", body, responses))
        _wait_for_queue_depth(url, 8)  # 7 more queued behind it: the queue is full
        full = httpx.post(f"{url}/v1/score", json=bodies[8], headers=AUTH)
        assert full.status_code == 503, full.text
        assert full.json()["kind"] == "queue_full" and full.headers["Retry-After"] == "1"
        gate.release.set()
        for thread in threads:
            thread.join(30)
        text = httpx.get(f"{url}/metrics").text
    assert sorted(r.status_code for r in responses) == [200] * 8
    totals = sorted(r.json()["results"][0]["total"] for r in responses)
    assert totals == pytest.approx(sorted(it["edit"].mean().item() for it in items[:8]), abs=1e-6)
    # with batching the 7 queued requests share one batch; without it each runs alone
    assert gate.batch_sizes == ([1, 7] if enabled else [1] * 8)
    assert metric_value(text, "rcgrpo_reward_batch_size_sum", 'reward="gated"') == 8
    assert metric_value(text, "rcgrpo_reward_errors_total", 'kind="queue_full"') == 1


def test_a_lone_request_does_not_wait_for_company(tmp_path):
    gate = GateModel()
    gate.loaded.set()
    gate.release.set()
    app = gated_app(tmp_path, gate, {"max_batch_size": 8, "max_wait_ms": 600_000})
    with serve_in_thread(app) as url:
        RewardClient(url).wait_ready(timeout_s=30)
        body = {"items": wire(make_items(seed=10, n=2), with_target=False, with_acd=False)}
        # nobody else is decoding, so the batch goes at once instead of after max_wait_ms
        response = httpx.post(f"{url}/v1/score", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200 and gate.batch_sizes == [2]


def test_an_item_a_reward_cannot_score_fails_only_its_own_request(tmp_path):
    gate = GateModel()
    gate.loaded.set()
    app = gated_app(tmp_path, gate, {"max_batch_size": 8, "max_wait_ms": 0})
    first, good = make_items(seed=9, n=2)
    black = dict(good, edit=torch.zeros_like(good["edit"]))
    responses = {"first": [], "good": [], "black": []}
    with serve_in_thread(app) as url:
        RewardClient(url).wait_ready(timeout_s=30)
        body = {"items": wire([first], with_target=False, with_acd=False)}
        threads = [_post_in_thread(f"{url}/v1/score", body, responses["first"])]
        assert gate.entered.wait(30)  # the first item holds the worker while the other two queue
        for name, item in (("good", good), ("black", black)):
            body = {"items": wire([item], with_target=False, with_acd=False)}
            threads.append(_post_in_thread(f"{url}/v1/score", body, responses[name]))
        _wait_for_queue_depth(url, 3)
        gate.release.set()
        for thread in threads:
            thread.join(30)
    assert gate.batch_sizes == [1, 2, 1, 1]  # the shared batch failed, then each of its items ran alone
    assert responses["first"][0].status_code == 200 and responses["good"][0].status_code == 200
    assert responses["good"][0].json()["results"][0]["total"] == pytest.approx(
        good["edit"].mean().item(), abs=1e-6
    )
    assert responses["black"][0].status_code == 422
    assert (
        "reward 'gated' cannot score this input: an all-black edit" in responses["black"][0].json()["detail"]
    )


def test_model_load_failure_shows_in_readyz(tmp_path):
    def broken_loader(directory):
        raise OSError("no weights in " + directory)

    registry = {**REWARDS, "gated": Reward("gated", gated_reward, ("edit",), "gate", 1.0, "")}
    settings = RewardServerSettings(token=TOKEN, rewards={"gated": 1.0}, models={"gate": tmp_path})
    with serve_in_thread(
        create_app(settings, registry=registry, model_loaders={"gate": broken_loader})
    ) as url:
        deadline = time.monotonic() + 10
        while "OSError" not in (detail := httpx.get(f"{url}/readyz").json()["detail"]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "no weights in" in detail


# ---------------------------------------------------------------------------------------------------
# configuration


def test_config_errors_are_refused_at_start(clip_dir, tmp_path):
    with pytest.raises(ValueError, match="no auth token configured"):
        create_app(RewardServerSettings())
    with pytest.raises(ValueError, match="at least 16"):
        create_app(RewardServerSettings(token="short"))
    with pytest.raises(ValueError, match=r"unknown rewards \['nope'\]"):
        create_app(RewardServerSettings(insecure_no_auth=True, rewards={"nope": 1.0}))
    with pytest.raises(ValueError, match="set models.clip to a local directory"):
        create_app(RewardServerSettings(insecure_no_auth=True, rewards={"lc_t": 1.0}))
    with pytest.raises(ValueError, match="is not a directory"):
        create_app(
            RewardServerSettings(
                insecure_no_auth=True, rewards={"lc_t": 1.0}, models={"clip": tmp_path / "x"}
            )
        )
    with pytest.raises(ValueError, match="could never be queued"):
        RewardServerSettings(max_items_per_request=100, batching={"max_queue_items": 10})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    create_app(RewardServerSettings(token_file=token_file))  # a token from a file is accepted


def test_yaml_config_with_environment_on_top(tmp_path, monkeypatch):
    shipped = load_settings("configs/reward_server.yaml", insecure_no_auth=True)
    assert shipped.host == "127.0.0.1"
    assert shipped.rewards["acd"] == 0.5 and shipped.batching.max_batch_size == 32
    create_app(shipped)  # the shipped config is servable
    config = tmp_path / "server.yaml"
    config.write_text("port: 9000\nrewards: {acd: 0.25}\nbatching: {max_wait_ms: 7}\n")
    monkeypatch.setenv("RCGRPO_REWARD_PORT", "9100")
    monkeypatch.setenv("RCGRPO_REWARD_TOKEN", TOKEN)
    settings = load_settings(config)
    assert settings.port == 9100  # environment over file
    assert settings.rewards == {"acd": 0.25} and settings.batching.max_wait_ms == 7
    assert settings.token.get_secret_value() == TOKEN
    assert load_settings(config, port=9200).port == 9200  # explicit arguments over environment
    config.write_text("colour: red\n")
    with pytest.raises(ValueError, match="colour"):
        load_settings(config)


def test_insecure_no_auth_serves_without_a_token():
    settings = RewardServerSettings(insecure_no_auth=True, rewards={"acd": 0.5})
    with serve_in_thread(create_app(settings)) as url:
        body = {"items": wire(make_items(seed=8, n=1), with_target=False)}
        response = httpx.post(f"{url}/v1/score", json=body)
        assert response.status_code == 200
        assert response.json()["results"][0]["total"] == pytest.approx(0.5 * 0.1)
        schema = httpx.get(f"{url}/openapi.json").json()
        assert "securitySchemes" not in schema.get("components", {})


def test_cli_starts_the_server(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RCGRPO_REWARD_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "deploy.cli", "reward-server", "--config", "configs/reward_server.yaml"]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        client = RewardClient(f"http://127.0.0.1:{port}", token=TOKEN)
        deadline = time.monotonic() + 60
        while not client.ready():
            assert process.poll() is None, f"rcgrpo reward-server exited: {process.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "rcgrpo reward-server not ready after 60 s"
            time.sleep(0.1)
        names = [r.name for r in client.rewards().rewards]
        assert names == ["region_adherence", "background_psnr", "background_ssim", "acd"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/rewards").status_code == 401
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: the exit status is -SIGTERM
    assert process.returncode in (0, -15) and "Traceback" not in stderr, stderr


# ---------------------------------------------------------------------------------------------------
# fuzzing from the OpenAPI schema: any request, valid or not, gets an answer below 500


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_fuzz_finds_no_server_error(server, mode):
    # schemathesis' strategies under plain hypothesis: its pytest plugin does not run on pytest 9
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    answered = set()

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema.as_strategy(GenerationMode(mode)))
    def check(case):
        response = case.call(base_url=str(server.base_url), headers=AUTH, timeout=30)
        assert response.status_code < 500, (
            f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
        )
        answered.add((case.method, case.path, response.status_code))

    check()
    assert ("POST", "/v1/score", 422) in answered  # the fuzzer reached the scoring route


def random_png(mode: str, width: int, height: int, seed: int) -> str:
    shape = (height, width) if mode == "L" else (height, width, {"RGB": 3, "RGBA": 4}[mode])
    return png_b64(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def test_random_pngs_get_a_score_or_a_reason(server):
    # The schema fuzzer cannot make PNGs: here hypothesis draws real ones, consistent or with one image
    # of another mode or size.
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    status_seen = set()

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        size=st.sampled_from([(16, 16), (32, 24), (200, 200)]),
        seed=st.integers(0, 3),
        with_target=st.booleans(),
        acd=st.none() | st.floats(0, 1),
        odd=st.none()
        | st.tuples(
            st.sampled_from(["source", "edit", "mask", "target"]),
            st.sampled_from(["RGB", "L", "RGBA"]),
            st.sampled_from([(16, 16), (8, 16), (24, 20)]),
        ),
        chosen=st.lists(st.sampled_from(list(ALL_REWARDS) + ["nope"]), min_size=1, max_size=2, unique=True),
    )
    def check(size, seed, with_target, acd, odd, chosen):
        item = {"group_id": "fuzz", "candidate_index": 0, "policy_version": 0, "caption": "a red square"}
        for name in ("source", "edit", "mask") + (("target",) if with_target else ()):
            item[name] = random_png("L" if name == "mask" else "RGB", *size, seed)
        if odd is not None:
            name, mode, odd_size = odd
            item[name] = random_png(mode, *odd_size, seed)
        if acd is not None:
            item["intrinsic"] = {"acd": acd}
        response = server.post("/v1/score", json={"items": [item], "rewards": chosen})
        assert response.status_code in (200, 422), response.text
        status_seen.add(response.status_code)
        if response.status_code == 200:
            assert set(response.json()["results"][0]["scores"]) == set(chosen)
        else:
            assert response.json()["detail"]

    check()
    assert status_seen == {200, 422}


# ---------------------------------------------------------------------------------------------------
# the API's answers agree with its schema


def test_weights_that_overflow_the_total_are_refused(server):
    item = wire(make_items(seed=11, n=1))[0]
    # within the schema's bound each weight is fine, but no total may come back non-finite
    huge = server.post("/v1/score", json={"items": [item], "weights": {"background_psnr": 1e308}})
    assert huge.status_code == 422 and huge.json()["kind"] == "validation"
    assert "weights.background_psnr: Input should be less than or equal to 1000000" in huge.json()["detail"]
    bounded = server.post(
        "/v1/score", json={"items": [item], "weights": {"background_psnr": 1e6, "lc_t": 1e6}}
    )
    assert bounded.status_code == 200, bounded.text
    total = bounded.json()["results"][0]["total"]
    assert isinstance(total, float) and np.isfinite(total)


def test_integers_are_bounded(server):
    item = wire(make_items(seed=12, n=1))[0]
    item["policy_version"] = 2**70
    response = server.post("/v1/score", json={"items": [item]})
    assert response.status_code == 422 and "items.0.policy_version" in response.json()["detail"]
    item["policy_version"] = 2**53 - 1  # the largest a JSON reader keeps exactly: echoed back exactly
    response = server.post("/v1/score", json={"items": [item]})
    assert response.status_code == 200 and response.json()["results"][0]["policy_version"] == 2**53 - 1


@pytest.mark.parametrize(
    "rewards,reason",
    [
        (["acd", "acd"], "rewards must be distinct; ['acd'] repeated"),
        ([""], "rewards.0: String should have at least 1 character"),
        (["ACD"], "rewards.0: String should match pattern"),
    ],
    ids=["duplicate", "empty", "not_a_name"],
)
def test_reward_names_are_checked_by_the_schema(server, rewards, reason):
    response = server.post("/v1/score", json={"items": wire(make_items(seed=13, n=1)), "rewards": rewards})
    assert response.status_code == 422 and response.json()["kind"] == "validation"
    assert reason in response.json()["detail"]


def test_schema_describes_what_the_server_accepts_and_serves(server):
    schema = httpx.get(f"{server.base_url}/openapi.json").json()
    request = schema["components"]["schemas"]["ScoreRequest"]["properties"]
    names = request["rewards"]["anyOf"][0]
    assert names["items"]["enum"] == list(ALL_REWARDS) and names["uniqueItems"] is True
    assert request["weights"]["anyOf"][0]["propertyNames"] == {"enum": list(ALL_REWARDS)}
    version = schema["components"]["schemas"]["ScoreItem"]["properties"]["policy_version"]
    assert version["maximum"] == 2**53 - 1
    # /metrics is documented as what it serves: Prometheus text, not JSON
    documented = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    served = httpx.get(f"{server.base_url}/metrics").headers["content-type"]
    assert list(documented) == ["text/plain"] and served.startswith("text/plain")


@pytest.mark.parametrize(
    "method,path,body,status,kind",
    [
        ("POST", "/v1/score", '{"items": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "malformed"),
        ("GET", "/v1/nowhere", None, 404, "not_found"),
        ("PUT", "/v1/score", "{}", 405, "not_found"),
        ("POST", "/v1/score", '{"items": [', 422, "validation"),
    ],
    ids=["deeply_nested", "unknown_route", "wrong_method", "truncated"],
)
def test_every_error_has_the_same_shape(server, method, path, body, status, kind):
    response = server.request(method, path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert set(response.json()) == {"detail", "kind", "reward"} and response.json()["kind"] == kind
