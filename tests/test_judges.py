"""Learned rewards in the reward server over real HTTP: the vlm_judge reward against a local
OpenAI-compatible stand-in (openai_standin.py: slow, failing and unparseable answers included), and the
reward_model reward with a tiny randomly initialised ViT saved in the test."""

import re
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
from openai_standin import brightness_score, images_of, serve_standin

from rcgrpo.clip_scores import mask_bbox, to_uint8
from rcgrpo.data.shapes import generate_shapes_edit
from rcgrpo.image_reward_model import build_tiny_reward_model, load_reward_model
from reward_server.app import create_app
from reward_server.settings import JudgeSettings, RewardServerSettings
from services.http import serve_in_thread
from services.reward_client import RewardClient
from services.schemas import make_score_item

JUDGE = "stand-in-judge"


def q(x):
    return (x.clamp(0, 1) * 255).round() / 255


def make_items(n, seed=0):
    samples = generate_shapes_edit(n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    items = []
    for s in samples:
        edit = q(s.target + 0.05 * torch.randn(s.target.shape, generator=g))
        items.append(
            dict(source=q(s.source), edit=edit, mask=q(s.mask), instruction=s.instruction, caption=s.caption)
        )
    return items


def wire(items):
    return [
        make_score_item(
            "j", i, 0, it["source"], it["edit"], it["mask"], it["instruction"], it["caption"]
        ).model_dump(mode="json", exclude_none=True)
        for i, it in enumerate(items)
    ]


def metric(url, name, labels):
    pattern = re.escape(f"{name}{{{labels}}}") + r" ([0-9.e+-]+)"
    found = re.search(pattern, httpx.get(f"{url}/metrics").text)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def standin():
    with serve_standin() as (server, base_url):
        yield server, base_url


@contextmanager
def judge_server(base_url, **judge):
    options = dict(base_url=base_url, model=JUDGE, max_concurrency=3, timeout_s=5.0, backoff_s=0.01)
    settings = RewardServerSettings(
        insecure_no_auth=True,
        rewards={"vlm_judge": 1.0},
        judge={**options, **judge},
        max_items_per_request=16,
    )
    with serve_in_thread(create_app(settings)) as url:
        RewardClient(url).wait_ready(timeout_s=30)
        yield url


def test_judge_scores_what_the_endpoint_answers_with_bounded_concurrency(standin):
    server, base_url = standin
    server.reset(delay_s=0.2)
    items = make_items(9, seed=1)
    with judge_server(base_url) as url:
        listing = httpx.get(f"{url}/v1/rewards").json()["rewards"]
        response = httpx.post(f"{url}/v1/score", json={"items": wire(items)}, timeout=60)
        ok = metric(url, "rcgrpo_reward_judge_calls_total", f'judge="{JUDGE}",outcome="ok"')
        latency_count = metric(url, "rcgrpo_reward_judge_latency_seconds_count", f'judge="{JUDGE}"')
    assert response.status_code == 200, response.text
    # the endpoint's 0-10 score of each edit, mapped onto [0, 1]
    expected = [brightness_score(to_uint8(it["edit"])) / 10 for it in items]
    assert [r["scores"]["vlm_judge"] for r in response.json()["results"]] == pytest.approx(expected, abs=1e-9)
    # nine items, never more than max_concurrency = 3 at the endpoint at once (and it did reach 3)
    assert len(server.requests) == 9 and server.peak_in_flight == 3
    assert ok == 9 and latency_count == 9
    [info] = listing
    assert info["name"] == "vlm_judge" and info["model_based"]
    assert info["inputs"] == ["edit", "source", "mask", "instruction", "caption"]
    # each request: the model, the system message, the prompt with the item's texts, source then edit
    by_prompt = {body["messages"][1]["content"][0]["text"]: body for body in server.requests}
    for item in items:
        [body] = [b for text, b in by_prompt.items() if item["instruction"] in text]
        assert body["model"] == JUDGE and body["messages"][0]["role"] == "system"
        assert item["caption"] in body["messages"][1]["content"][0]["text"]
        source, edit = images_of(body)
        assert np.array_equal(source, to_uint8(item["source"])) and np.array_equal(
            edit, to_uint8(item["edit"])
        )


def test_mask_and_crop_can_be_sent(standin):
    server, base_url = standin
    server.reset()
    [item] = make_items(1, seed=2)
    with judge_server(base_url, images=["source", "edit", "mask", "edit_crop"]) as url:
        response = httpx.post(f"{url}/v1/score", json={"items": wire([item])}, timeout=60)
    assert response.status_code == 200, response.text
    source, edit, mask, crop = images_of(server.requests[0])
    assert np.array_equal(mask, (item["mask"] * 255).round().to(torch.uint8).numpy())
    left, top, right, bottom = mask_bbox(item["mask"])
    assert np.array_equal(crop, to_uint8(item["edit"][:, top:bottom, left:right]))


def test_failing_judge_is_retried_then_answered_with_503_naming_the_reward(standin):
    server, base_url = standin
    [item] = make_items(1, seed=3)
    with judge_server(base_url, max_attempts=3) as url:
        server.reset(fail_first=2)  # two 500s, then an answer: the third attempt scores
        recovered = httpx.post(f"{url}/v1/score", json={"items": wire([item])}, timeout=60)
        assert recovered.status_code == 200 and len(server.requests) == 3
        server.reset(mode="fail")
        failed = httpx.post(f"{url}/v1/score", json={"items": wire([item])}, timeout=60)
        errors = metric(url, "rcgrpo_reward_judge_calls_total", f'judge="{JUDGE}",outcome="server_error"')
        failures = metric(url, "rcgrpo_reward_reward_failures_total", 'reward="vlm_judge"')
    assert failed.status_code == 503 and failed.headers["Retry-After"] == "1"
    body = failed.json()
    assert body["kind"] == "reward_failed" and body["reward"] == "vlm_judge"
    assert "reward 'vlm_judge' could not be computed" in body["detail"]
    assert "gave no score in 3 attempts; last: server_error: HTTP 500" in body["detail"]
    assert len(server.requests) == 3 and errors == 2 + 3 and failures == 1


def test_slow_judge_times_out_within_its_budget(standin):
    server, base_url = standin
    server.reset(delay_s=3.0)
    [item] = make_items(1, seed=4)
    with judge_server(base_url, timeout_s=0.3, max_attempts=2) as url:
        start = time.monotonic()
        response = httpx.post(f"{url}/v1/score", json={"items": wire([item])}, timeout=60)
        elapsed = time.monotonic() - start
        timeouts = metric(url, "rcgrpo_reward_judge_calls_total", f'judge="{JUDGE}",outcome="timeout"')
    assert response.status_code == 503 and response.json()["reward"] == "vlm_judge"
    assert "timeout: no answer within 0.3 s" in response.json()["detail"]
    assert timeouts == 2 and elapsed < 2.5  # two attempts of 0.3 s, not the judge's 3 s


@pytest.mark.parametrize(
    "mode,outcome,reason",
    [
        ("garbage", "unparseable", "no match of"),
        ("out_of_range", "unparseable", "score 42.0 outside score_range [0.0, 10.0]"),
    ],
)
def test_unparseable_answers_are_retried_then_fail(standin, mode, outcome, reason):
    server, base_url = standin
    server.reset(mode=mode)
    [item] = make_items(1, seed=5)
    with judge_server(base_url, max_attempts=2) as url:
        response = httpx.post(f"{url}/v1/score", json={"items": wire([item])}, timeout=60)
        counted = metric(url, "rcgrpo_reward_judge_calls_total", f'judge="{JUDGE}",outcome="{outcome}"')
    assert response.status_code == 503 and reason in response.json()["detail"]
    assert len(server.requests) == 2 and counted == 2


def test_a_refusing_judge_is_not_retried(standin):
    server, base_url = standin
    server.reset(mode="refuse")
    [item] = make_items(1, seed=6)
    with judge_server(base_url, max_attempts=3) as url:
        response = httpx.post(f"{url}/v1/score", json={"items": wire([item])}, timeout=60)
        refused = metric(url, "rcgrpo_reward_judge_calls_total", f'judge="{JUDGE}",outcome="refused"')
    assert response.status_code == 503 and "refused the request: HTTP 400" in response.json()["detail"]
    assert len(server.requests) == 1 and refused == 1


def test_an_unreachable_judge_fails_closed():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    [item] = make_items(1, seed=7)
    with judge_server(f"http://127.0.0.1:{port}/v1", max_attempts=2) as url:
        response = httpx.post(f"{url}/v1/score", json={"items": wire([item])}, timeout=60)
        refused = metric(url, "rcgrpo_reward_judge_calls_total", f'judge="{JUDGE}",outcome="connect_error"')
    assert response.status_code == 503 and "connect_error: ConnectError" in response.json()["detail"]
    assert refused == 2


def test_judge_settings_are_checked_at_start(tmp_path):
    base = dict(base_url="http://127.0.0.1:1/v1", model=JUDGE)
    with pytest.raises(ValueError, match="exactly one group"):
        JudgeSettings(**base, score_pattern=r"SCORE: \d+")
    with pytest.raises(ValueError, match="may use only"):
        JudgeSettings(**base, prompt="Rate {edit}")
    with pytest.raises(ValueError, match="low < high"):
        JudgeSettings(**base, score_range=(10, 0))
    with pytest.raises(ValueError, match="configure it under `judge:`"):
        create_app(RewardServerSettings(insecure_no_auth=True, rewards={"vlm_judge": 1.0}))
    with pytest.raises(ValueError, match="configure it under `reward_model:`"):
        create_app(RewardServerSettings(insecure_no_auth=True, rewards={"reward_model": 1.0}))
    with pytest.raises(ValueError, match="is not a directory"):
        RewardServerSettings(insecure_no_auth=True, reward_model={"path": tmp_path / "nope"})


# ---------------------------------------------------------------------------------------------------
# a local reward model


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    return build_tiny_reward_model(tmp_path_factory.mktemp("reward-model") / "tiny-vit", seed=0)


@contextmanager
def reward_model_server(directory, dtype="float32"):
    settings = RewardServerSettings(
        insecure_no_auth=True,
        rewards={"reward_model": 1.0},
        reward_model={"path": directory, "dtype": dtype},
        batching={"max_batch_size": 8, "max_wait_ms": 0},
    )
    app = create_app(settings)
    with serve_in_thread(app) as url:
        RewardClient(url).wait_ready(timeout_s=60)
        yield url, app.state.scorer.models["reward_model"]


def test_local_reward_model_scores_in_batches(reward_model_dir):
    items = make_items(5, seed=8)
    direct = load_reward_model(reward_model_dir, device="cpu").score(
        torch.stack([it["edit"] for it in items])
    )
    with reward_model_server(reward_model_dir) as (url, model):
        response = httpx.post(f"{url}/v1/score", json={"items": wire(items)}, timeout=60)
        batches = metric(url, "rcgrpo_reward_batch_size_count", 'reward="reward_model"')
        batched_items = metric(url, "rcgrpo_reward_batch_size_sum", 'reward="reward_model"')
    assert response.status_code == 200, response.text
    scores = [r["scores"]["reward_model"] for r in response.json()["results"]]
    assert scores == pytest.approx(direct.tolist(), rel=1e-5, abs=1e-6)
    assert len(set(round(s, 6) for s in scores)) == 5  # a real model: every edit its own score
    assert (batches, batched_items) == (1, 5)  # the five items in one forward pass
    assert model.dtype == torch.float32


def test_local_reward_model_in_bfloat16(reward_model_dir):
    items = make_items(3, seed=9)
    direct = load_reward_model(reward_model_dir, device="cpu").score(
        torch.stack([it["edit"] for it in items])
    )
    with reward_model_server(reward_model_dir, dtype="bfloat16") as (url, model):
        response = httpx.post(f"{url}/v1/score", json={"items": wire(items)}, timeout=60)
    assert response.status_code == 200 and model.dtype == torch.bfloat16
    scores = [r["scores"]["reward_model"] for r in response.json()["results"]]
    assert scores == pytest.approx(direct.tolist(), abs=0.05)  # bfloat16 keeps about 3 digits


# ---------------------------------------------------------------------------------------------------
# serving a judge next to the reward server: the compose override and the Kubernetes overlay


def judge_settings_from(env: dict[str, str], monkeypatch) -> RewardServerSettings:
    """The reward server's settings with the shipped config and `env` on top, as the container gets them."""
    from reward_server.settings import load_settings

    for name, value in env.items():
        if name.startswith("RCGRPO_REWARD_") and name != "RCGRPO_REWARD_TOKEN":
            monkeypatch.setenv(name, str(value))
    return load_settings("configs/reward_server.yaml", insecure_no_auth=True)


def test_compose_judge_override_serves_vlm_judge_from_the_judge_service(monkeypatch):
    import json

    import jsonschema
    import yaml
    from test_deploy_files import (
        COMPOSE_SCHEMA,
        REPO,
        REQUIRED_ENV,
        interpolate,
        load_compose,
        merge_override,
    )

    override = yaml.safe_load((REPO / "docker-compose.judge.yml").read_text())
    raw = merge_override(load_compose(gpu=True), override)
    compose = interpolate(raw, REQUIRED_ENV)
    if COMPOSE_SCHEMA.is_file():
        schema = json.loads(COMPOSE_SCHEMA.read_text())
        for document in (raw, compose):
            errors = list(jsonschema.Draft7Validator(schema).iter_errors(document))
            assert not errors, [e.message for e in errors[:5]]
    judge, reward_server = compose["services"]["judge"], compose["services"]["reward-server"]
    assert judge["ports"] == ["127.0.0.1:8000:8000"] and judge["healthcheck"]["test"]
    assert reward_server["depends_on"]["judge"] == {"condition": "service_healthy"}
    assert reward_server["depends_on"]["redis"] == {"condition": "service_healthy"}  # the base's, kept
    served_name = next(a.split("=", 1)[1] for a in judge["command"] if a.startswith("--served-model-name="))
    settings = judge_settings_from(reward_server["environment"], monkeypatch)
    assert settings.judge.base_url == "http://judge:8000/v1" and settings.judge.model == served_name
    assert settings.rewards["vlm_judge"] == 1.0 and settings.rewards["region_adherence"] == 1.0
    create_app(settings)  # servable: the judge is configured


def test_k8s_judge_overlay_points_the_reward_server_at_the_vllm_service(monkeypatch):
    import yaml
    from test_deploy_files import K8S_DIR, k8s_object

    overlay = K8S_DIR / "judge"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../", "vllm-judge.yaml"]
    documents = {
        d["kind"] + "/" + d["metadata"]["name"]: d
        for d in yaml.safe_load_all((overlay / "vllm-judge.yaml").read_text())
    }
    deployment, service = documents["Deployment/rcgrpo-judge"], documents["Service/rcgrpo-judge"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    served_name = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--served-model-name="))
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in deployment["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["rcgrpo-models"] and k8s_object("PersistentVolumeClaim", "rcgrpo-models")

    # the patch targets the base's reward server container, and its settings serve the judge
    [(path,)] = [tuple(p.values()) for p in kustomization["patches"]]
    patch = yaml.safe_load((overlay / path).read_text())
    base = k8s_object("Deployment", patch["metadata"]["name"])
    (patched,) = patch["spec"]["template"]["spec"]["containers"]
    assert patched["name"] in [c["name"] for c in base["spec"]["template"]["spec"]["containers"]]
    env = {e["name"]: e["value"] for e in patched["env"]}
    settings = judge_settings_from(env, monkeypatch)
    port = service["spec"]["ports"][0]["port"]
    assert settings.judge.base_url == f"http://{service['metadata']['name']}:{port}/v1"
    assert settings.judge.model == served_name and "vlm_judge" in settings.rewards
