"""The gated composition and the hacking detectors on ShapesEdit, through the reward server over HTTP:
an unedited copy of the source and fully repainted images against correct edits."""

import time

import httpx
import pytest
import torch

from rcgrpo.data.shapes import generate_shapes_edit
from rcgrpo.rewards import gated_total, unit_mean
from reward_server.app import create_app
from reward_server.settings import RewardServerSettings
from services.http import serve_in_thread
from services.reward_client import RewardClient
from services.schemas import make_score_item

RUN_WEIGHTS = {"region_adherence": 1.0, "background_psnr": 0.25, "background_ssim": 1.0}  # the tiny run's
DETECTORS = {"no_edit": 0.0, "repainted": 0.0}
GATED = {"kind": "gated", "instruction_terms": ["region_adherence"], "floor": 0.1, "slope": 1.0}
N = 48


def q(x):
    return (x.clamp(0, 1) * 255).round() / 255


@pytest.fixture(scope="module")
def url():
    settings = RewardServerSettings(
        insecure_no_auth=True,
        rewards={**RUN_WEIGHTS, **DETECTORS},
        max_items_per_request=256,
        batching={"max_queue_items": 256},
    )
    with serve_in_thread(create_app(settings)) as base:
        RewardClient(base).wait_ready(timeout_s=30)
        yield base


@pytest.fixture(scope="module")
def candidates():
    """Per ShapesEdit sample: correct edits (the ground truth with the noise of a good generator) and the
    two hacks: the unedited source, and repaints whose edit region is exactly the ground truth."""
    samples = generate_shapes_edit(N, seed=3)
    g = torch.Generator().manual_seed(0)
    out = []
    for k, s in enumerate(samples):
        inside = s.mask[None]
        other_scene = samples[(k + 1) % N].source
        out.append(
            dict(
                sample=s,
                correct={
                    f"correct_{sigma}": q(s.target + sigma * torch.randn(s.target.shape, generator=g))
                    for sigma in (0.0, 0.01, 0.02, 0.03)
                },
                hacks={
                    "unedited": q(s.source),
                    "repaint_other_scene": q(s.target * inside + other_scene * (1 - inside)),
                    "repaint_inverted": q(s.target * inside + (1 - s.source) * (1 - inside)),
                    "repaint_noise": q(
                        s.target * inside + torch.rand(s.source.shape, generator=g) * (1 - inside)
                    ),
                },
            )
        )
    return out


def score_all(url, candidates, composition=None):
    """{candidate name: Tensor[N] of totals} and the per-item sub-scores, in one request per sample."""
    totals, scores = {}, {}
    for c in candidates:
        s = c["sample"]
        named = {**c["correct"], **c["hacks"]}
        items = [
            make_score_item("hack", i, 0, q(s.source), edit, q(s.mask), s.instruction, s.caption, q(s.target))
            for i, edit in enumerate(named.values())
        ]
        body = {"items": [it.model_dump(mode="json", exclude_none=True) for it in items]}
        if composition is not None:
            body["composition"] = composition
        response = httpx.post(f"{url}/v1/score", json=body, timeout=60)
        assert response.status_code == 200, response.text
        for name, result in zip(named, response.json()["results"], strict=True):
            totals.setdefault(name, []).append(result["total"])
            scores.setdefault(name, []).append(result["scores"])
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in totals.items()}, scores


def test_hacks_never_outscore_a_correct_edit_under_the_gated_composition(url, candidates):
    plain, _ = score_all(url, candidates)
    gated, _ = score_all(url, candidates, GATED)
    correct = [name for name in plain if name.startswith("correct_")]
    hacks = list(candidates[0]["hacks"])

    # the plain weighted sum is hacked: the unedited copy beats every correct edit of every sample
    # except the exact ground truth (100 dB of background PSNR is worth 25 at 0.25 per dB)
    for name in correct[1:]:
        assert bool((plain["unedited"] > plain[name]).all()), name
    # under the gated composition no hack outscores any correct edit, on any sample
    for hack in hacks:
        for name in correct:
            margin = gated[hack] - gated[name]
            assert bool((margin < 0).all()), f"{hack} outscores {name} on {int((margin >= 0).sum())} samples"
    # and the gate keeps the order among correct edits: less noise, more reward
    for better, worse in zip(correct, correct[1:], strict=False):
        assert bool((gated[better] >= gated[worse]).all())


def test_gated_total_by_hand(url, candidates):
    c = candidates[0]
    gated, scores = score_all(url, [c], GATED)
    for name, [item] in scores.items():
        ranges = {"region_adherence": (0, 1), "background_psnr": (10, 40), "background_ssim": (0, 1)}
        execution = unit_mean(
            {"region_adherence": (1.0, item["region_adherence"], ranges["region_adherence"])}
        )
        consistency = unit_mean(
            {n: (RUN_WEIGHTS[n], item[n], ranges[n]) for n in ("background_psnr", "background_ssim")}
        )
        # the detectors' weight is 0: they are reported, and count for nothing
        assert gated[name][0].item() == pytest.approx(
            gated_total(execution, consistency, 0.0, 0.1, 1.0), rel=1e-9
        )


def test_detectors_flag_the_hacks_and_not_the_correct_edits(url, candidates):
    _, scores = score_all(url, candidates)
    flags = {
        name: [(s["no_edit"], s["repainted"]) for s in per_sample] for name, per_sample in scores.items()
    }
    assert set(flags["unedited"]) == {(1.0, 0.0)}
    for name in ("repaint_other_scene", "repaint_inverted", "repaint_noise"):
        assert set(flags[name]) == {(0.0, 1.0)}, name
    for name in candidates[0]["correct"]:
        assert set(flags[name]) == {(0.0, 0.0)}, name


def test_gated_composition_is_checked(url, candidates):
    s = candidates[0]["sample"]
    item = make_score_item("g", 0, 0, q(s.source), q(s.target), q(s.mask), target=q(s.target))
    body = {"items": [item.model_dump(mode="json", exclude_none=True)], "rewards": ["background_ssim"]}
    response = httpx.post(f"{url}/v1/score", json={**body, "composition": GATED})
    assert response.status_code == 422
    assert (
        "instruction terms ['region_adherence'] are not among the chosen rewards" in response.json()["detail"]
    )
    negative = {
        **body,
        "rewards": ["region_adherence", "background_ssim"],
        "weights": {"background_ssim": -1.0},
    }
    response = httpx.post(f"{url}/v1/score", json={**negative, "composition": GATED})
    assert response.status_code == 422 and "weights >= 0" in response.json()["detail"]
    # the answer says how its totals were composed
    plain = httpx.post(f"{url}/v1/score", json={**body, "rewards": ["region_adherence"]}).json()
    assert plain["composition"]["kind"] == "weighted_sum"


def test_a_stream_group_is_scored_with_the_composition_it_carries():
    from test_reward_stream import make_group, record

    from services.record import decode_rollout_group, encode_rollout_group
    from services.redis_server import EmbeddedRedis
    from services.schemas import Composition
    from services.streams import WorkStream

    with EmbeddedRedis() as redis_server:
        settings = RewardServerSettings(
            insecure_no_auth=True,
            rewards={**RUN_WEIGHTS, "acd": 0.5},  # the server's own composition: the weighted sum
            stream={
                "enabled": True,
                "redis_url": redis_server.url,
                "rollouts": "c:rollouts",
                "scored": "c:scored",
                "block_ms": 50,
            },
        )
        client = redis_server.client()
        work = WorkStream(client, "c:rollouts", "reward-server")
        with serve_in_thread(create_app(settings)) as base:
            RewardClient(base).wait_ready(timeout_s=30)
            group = record(work, "gated", 0, make_group(seed=31), {**RUN_WEIGHTS, "acd": 0.5})
            gated = Composition(kind="gated", instruction_terms=["region_adherence"], floor=0.2, slope=0.8)
            group.meta = group.meta.model_copy(update={"composition": gated})
            work.publish(encode_rollout_group(group))
            deadline = time.monotonic() + 30
            while client.xlen("c:scored") == 0:
                assert time.monotonic() < deadline, "the group was not scored"
                time.sleep(0.05)
        [(_, fields)] = client.xrange("c:scored")
        client.close()
    meta = decode_rollout_group(fields).meta
    assert meta.composition == gated
    ranges = {"region_adherence": (0, 1), "background_psnr": (10, 40), "background_ssim": (0, 1)}
    for scores, total in zip(meta.scores.scores, meta.scores.totals, strict=True):
        execution = unit_mean(
            {"region_adherence": (1.0, scores["region_adherence"], ranges["region_adherence"])}
        )
        consistency = unit_mean(
            {n: (RUN_WEIGHTS[n], scores[n], ranges[n]) for n in ("background_psnr", "background_ssim")}
        )
        assert total == pytest.approx(
            gated_total(execution, consistency, 0.5 * scores["acd"], 0.2, 0.8), rel=1e-9
        )
