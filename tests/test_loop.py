"""The distributed training loop on real parts: a private redis-server, the real reward server (uvicorn in
stream mode), rollout workers and learners on the shipped tiny editor, local Ray for the driver.

1. a 3-iteration end-to-end run through deploy.driver.run, and runs scored by an external reward
   server started with other weights (the run's weights apply) or not serving the run's rewards (refused);
2. the policy-version handshake: a new LoRA version reaches every worker and changes what it samples;
3. a rollout worker process killed with SIGKILL mid-task: its task is reclaimed and completed once;
4. a learner killed after an unsaved step and resumed: same step, same weights, same data;
5. the staleness bound: groups sampled by too old a policy are dropped and counted.
"""

import gc
import json
import math
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from PIL import Image
from prometheus_client import REGISTRY
from safetensors.torch import load_file

from deploy.evaluation import SUMMARY
from deploy.reward_process import reward_server_settings
from learner.learner import Learner
from rcgrpo.lora import lora_state_dict
from reward_server.app import create_app
from reward_server.settings import RewardServerSettings
from rollout_worker.worker import RolloutWorker
from services.blobstore import BlobIntegrityError, BlobMissingError
from services.bus import RunBus
from services.config import load_run_config
from services.http import serve_in_thread
from services.learner_stats import DRIVER_STATISTICS, LEARNER_STATISTICS
from services.record import GroupKey, Task, decode_rollout_group
from services.redis_server import EmbeddedRedis
from services.reward_client import RewardClient

TOKEN = "loop-test-token-0123456789abcdef"
# small enough for 2 CPU cores; torch threads as conftest sets them (workers and learners set them globally)
FAST = [
    "method.group_size=4",
    "method.num_steps=4",
    "method.anchors=2",
    "method.steps_per_anchor=2",
    "data.num_samples=8",
    "rollout.torch_threads=2",
    "learner.torch_threads=2",
]


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


def run_config(tmp_path, redis_url, name, *overrides):
    """A run config with its own name (so its own streams and keys) and runs_dir under tmp_path."""
    return load_run_config(
        None, [f"name={name}", f"runs_dir={tmp_path}", f"redis_url={redis_url}", *FAST, *overrides]
    )


def wait_until(condition, timeout_s=60.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.02)
    return value


def counter(name, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@contextmanager
def reward_server(cfg, redis_url, rewards=None):
    """The real reward server, with the settings the driver gives it (served `rewards` instead, if given),
    on a loopback port in this process."""
    values = reward_server_settings(cfg, redis_url, port=0)
    del values["host"], values["port"]
    if rewards is not None:
        values["rewards"] = rewards
    values["stream"]["block_ms"] = 50
    with serve_in_thread(create_app(RewardServerSettings(token=TOKEN, **values))) as url:
        RewardClient(url, token=TOKEN).wait_ready(timeout_s=60)
        yield url


def rollout_groups(bus):
    return [decode_rollout_group(fields, bus.blobs) for _, fields in bus.client.xrange(bus.rollouts.name)]


def scored_groups(bus):
    return [decode_rollout_group(fields) for _, fields in bus.client.xrange(bus.scored.name)]


def train_blob_exists(bus, group_id: str, policy_version: int) -> bool:
    """Whether the training tensors of a group are stored (under its group key)."""
    key = GroupKey(run=bus.cfg.name, group_id=group_id, policy_version=policy_version)
    return bool(bus.client.exists(bus.train_blobs.key_for(key.id)))


def publish_tasks(bus, tasks):
    for task in tasks:
        bus.tasks.publish(task.to_fields())


def produce_scored(bus, worker, tasks):
    """Roll out `tasks` with `worker` and wait until the reward server has scored them all."""
    before = bus.scored.length()
    publish_tasks(bus, tasks)
    assert worker.run(max_tasks=len(tasks)) == len(tasks)
    wait_until(lambda: bus.scored.length() == before + len(tasks), what=f"{len(tasks)} scored groups")


def assert_same_tensors(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:2]}"


def stream_id(entry_id: bytes) -> tuple[int, int]:
    milliseconds, sequence = entry_id.decode().split("-")
    return int(milliseconds), int(sequence)


def optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {f"{i}.{k}": torch.as_tensor(v).clone() for i, values in state.items() for k, v in values.items()}


# ---------------------------------------------------------------------------------------------------
# 1. end to end through the driver


@pytest.mark.slow
def test_three_iteration_run_through_the_driver(tmp_path, redis_url, monkeypatch):
    from diffusers import FluxKontextPipeline
    from peft.utils import get_peft_model_state_dict

    from deploy.driver import run

    for variable in ("RCGRPO_REWARD_URL", "RAY_ADDRESS", "REDIS_URL"):
        monkeypatch.delenv(variable, raising=False)  # a local Ray, the driver's own reward server
    cfg = run_config(
        tmp_path,
        redis_url,
        "e2e",
        "rollout.num_workers=2",
        "rollout.torch_threads=1",
        "learner.torch_threads=1",
        "learner.total_steps=3",
        "learner.groups_per_step=2",
        "learner.checkpoint_every=2",
        "eval.num_samples=2",
    )
    summary = run(cfg)

    run_dir = tmp_path / "e2e"
    assert summary["steps"] == 3 and summary["run_dir"] == str(run_dir)
    assert load_run_config(run_dir / "config.yaml") == cfg
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]  # publish_every=1: one version per update
    # every number of a row is a declared statistic, and every declared one is there (but a publish error)
    declared = {s.key for s in (*LEARNER_STATISTICS, *DRIVER_STATISTICS)}
    assert all(set(r) == declared - {"publish_error"} for r in rows)
    assert all(
        r["groups"] == 2 and math.isfinite(r["reward_mean"]) and math.isfinite(r["loss"]) for r in rows
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    state = json.loads((run_dir / "checkpoints" / "step_000003" / "state.json").read_text())
    # the cursor is what the driver had fed: supply follows consumption, (1 + max_staleness) updates of
    # groups ahead of what the learner had consumed (4 groups after step 2, at most 6 during step 3)
    assert (state["step"], state["policy_version"]) == (3, 3)
    # consumed = trained on (3 steps x 2 groups) or dropped as stale: with max_staleness 1, only a v0 group
    # read at step 3 (learner at v2) can be stale, which happens when a worker is slow to its second task
    trained = [g["group_id"] for r in rows for g in r["group_signal"]]
    checkpointed = {key.split(":")[1]: key for key in state["consumed"]}  # run:group_id:v<policy version>
    assert len(set(trained)) == 6 and set(trained) <= set(checkpointed)
    assert all(key.endswith(":v0") for group_id, key in checkpointed.items() if group_id not in trained)
    assert 4 + 4 <= state["task_cursor"] <= len(checkpointed) + 4

    # the final LoRA is the step-3 checkpoint and the latest published version, and a stock pipeline loads it
    final = load_file(run_dir / "checkpoints" / "step_000003" / "lora.safetensors")
    bus = RunBus(cfg, redis_url)
    assert bus.lora.latest().policy_version == 3
    assert_same_tensors(bus.lora.load(3), final)
    assert any(t.abs().max() > 0 for n, t in final.items() if "lora_B" in n)  # trained, not the zero init
    pipe = FluxKontextPipeline.from_pretrained(cfg.editor, local_files_only=True)
    pipe.load_lora_weights(run_dir / "lora")
    [adapter] = pipe.transformer.peft_config
    assert_same_tensors(get_peft_model_state_dict(pipe.transformer, adapter_name=adapter), final)

    with Image.open(run_dir / "reward_curves.png") as curves:
        assert curves.format == "PNG" and curves.size == (1200, 5 * 210)
    with Image.open(run_dir / "before_after.png") as grid:  # 2 rows of source | base | trained | target
        assert grid.format == "PNG" and grid.size == (4 * 128, 2 * (128 + 14))
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert set(evaluation) == {
        "base", "trained", "change", "change_standard_error", "tasks", "samples", "velocity_drift"
    }  # fmt: skip
    # the trained LoRA's drift at every grid step, inside and outside the mask: it moved the editor
    drift = evaluation["velocity_drift"]
    assert len(drift["inside"]) == len(drift["outside"]) == cfg.method.num_steps
    assert drift["trained"] == cfg.method.trained_steps and max(drift["inside"]) > 0
    assert summary["eval"] == {name: evaluation[name] for name in SUMMARY}
    for name in ("region_adherence", "background_psnr", "background_ssim"):
        assert math.isfinite(evaluation["base"][name]) and math.isfinite(evaluation["trained"][name])
        # the change is the mean of per-sample changes, so it equals the change of the means
        change = evaluation["trained"][name] - evaluation["base"][name]
        assert evaluation["change"][name] == pytest.approx(change, abs=1e-9)
        assert evaluation["change_standard_error"][name] >= 0
    assert len(evaluation["samples"]["base"]) == len(evaluation["samples"]["trained"]) == cfg.eval.num_samples

    # the staleness bound held for every trained group: at step s the learner held version s - 1
    scored = bus.client.xrange(bus.scored.name)
    [info] = bus.client.xinfo_groups(bus.scored.name)
    last_delivered = stream_id(info["last-delivered-id"])
    consumed = [
        decode_rollout_group(fields).meta.key
        for entry_id, fields in scored
        if stream_id(entry_id) <= last_delivered
    ]
    version_of = {key.group_id: key.policy_version for key in consumed}
    staleness = [r["step"] - 1 - version_of[g["group_id"]] for r in rows for g in r["group_signal"]]
    assert all(0 <= s <= cfg.learner.max_staleness for s in staleness), staleness
    dropped = set(version_of) - set(trained)  # read, found stale, not trained on
    assert len(consumed) == 6 + len(dropped) and info["pending"] == 0  # the final checkpoint acked them all
    # workers sampled with the version current when their task was fed: task i is fed once the learner
    # has read i - 3 groups (4 ahead), which is after step (i - 3) // 2 (on a slow machine the learner
    # reads the first group of a step before that step's update), so a worker stuck on the initial
    # policy fails here
    for group in scored_groups(bus):
        key = group.meta.key
        task_index = int(key.group_id.split("-")[1])
        assert key.policy_version >= max(0, (task_index - 3) // 2), key
    assert max(key.policy_version for key in consumed) >= 1
    # stopped cleanly: every task a worker took was completed, none dead-lettered
    assert bus.tasks.pending_count() == 0 and bus.tasks.dead_letter_length() == 0


@pytest.mark.slow
def test_an_external_reward_server_scores_the_runs_groups_with_the_runs_weights(
    tmp_path, redis_url, monkeypatch
):
    from deploy.driver import run

    for variable in ("RCGRPO_REWARD_URL", "RAY_ADDRESS", "REDIS_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("RCGRPO_REWARD_TOKEN", TOKEN)
    overrides = [
        "rollout.num_workers=1",
        "learner.total_steps=2",
        "eval.num_samples=0",
        "method.acd_weight=0.25",
        "blob_store=directory",  # and the training tensors travel as files on the run's volume
    ]
    cfg = run_config(tmp_path, redis_url, "external", *overrides)
    # a shared reward server on the run's streams, started with its own, other weights
    server_weights = {"region_adherence": 5.0, "background_psnr": 0.0, "background_ssim": 0.0, "acd": 1.0}
    with reward_server(cfg, redis_url, server_weights) as url:
        summary = run(cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"url": url})}))
    assert summary["steps"] == 2
    scored = scored_groups(RunBus(cfg, redis_url))
    assert len(scored) >= 2 * cfg.learner.groups_per_step
    assert cfg.rewards == {
        "region_adherence": 1.0,
        "background_psnr": 0.02,
        "background_ssim": 0.2,
        "acd": 0.25,
    }
    for group in scored:
        assert group.meta.rewards == cfg.rewards
        for scores, total in zip(group.meta.scores.scores, group.meta.scores.totals, strict=True):
            assert total == pytest.approx(sum(w * scores[name] for name, w in cfg.rewards.items()), rel=1e-9)
            assert total != pytest.approx(sum(w * scores[name] for name, w in server_weights.items()))
    # no payload in Redis; the final checkpoint freed the files of the groups it holds, and only those
    bus = RunBus(cfg, redis_url)
    assert not bus.client.keys(cfg.keys.train_prefix + "*") and not bus.client.keys(
        cfg.keys.blob_prefix + "*"
    )
    [final] = sorted((tmp_path / "external" / "checkpoints").iterdir())[-1:]
    consumed = set(json.loads((final / "state.json").read_text())["consumed"])
    assert consumed and {g.meta.key.id for g in scored} >= consumed
    for group in scored:
        assert group.train.key == f"train-{group.meta.key.id}"
        held = (cfg.blob_path / group.train.key).exists()
        assert held != (group.meta.key.id in consumed), group.meta.key.id
        if held:
            assert bus.train_blobs.get(group.train)  # verified against the ref's sha256

    # a server that does not serve one of the run's rewards: the run refuses to start, naming it
    with reward_server(cfg, redis_url, {"background_psnr": 0.02, "background_ssim": 1.0, "acd": 0.5}) as url:
        refused = cfg.model_copy(
            update={"name": "refused", "reward": cfg.reward.model_copy(update={"url": url})}
        )
        with pytest.raises(ValueError, match=r"does not serve \['region_adherence'\]"):
            run(refused)
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()  # refused before any step


def test_the_ray_and_the_external_learner_offer_what_the_driver_asks():
    import inspect

    from deploy.driver import ExternalLearner, LearnerHandle, RayLearner

    asked = {
        name: list(inspect.signature(fn).parameters)
        for name, fn in vars(LearnerHandle).items()
        if inspect.isfunction(fn) and not name.startswith("_")
    }
    assert set(asked) == {"resume_point", "publish_lora", "try_step", "checkpoint", "save_final_lora"}
    for learner in (RayLearner, ExternalLearner, Learner):
        for name, parameters in asked.items():
            offered = inspect.signature(getattr(learner, name)).parameters
            assert list(offered)[: len(parameters)] == parameters, (learner.__name__, name)
            assert all(p.default is not p.empty for p in list(offered.values())[len(parameters) :])


def test_a_run_needing_more_cpus_than_the_local_ray_has_is_refused():
    from deploy.driver import check_local_cpus

    cfg = load_run_config(None, ["rollout.num_workers=3", "rollout.cpus_per_worker=1"])
    check_local_cpus(cfg, 3)
    with pytest.raises(
        ValueError, match=r"rollout.num_workers=3 x rollout.cpus_per_worker=1.0 needs 3 CPUs.* has 2"
    ):
        check_local_cpus(cfg, 2)


# ---------------------------------------------------------------------------------------------------
# 2. the policy-version handshake


def test_new_policy_version_reaches_every_worker_and_changes_its_samples(tmp_path, redis_url):
    cfg = run_config(tmp_path, redis_url, "handshake")
    bus = RunBus(cfg, redis_url)
    workers = [RolloutWorker(cfg, redis_url, f"handshake-{i}") for i in range(2)]
    template = lora_state_dict(workers[0].editor.transformer)
    g = torch.Generator().manual_seed(0)
    # v0: the adapter as a learner starts it (B = 0); v1: as after training, B visibly non-zero
    v0 = {
        n: torch.zeros_like(t) if "lora_B" in n else torch.randn(t.shape, generator=g)
        for n, t in template.items()
    }
    v1 = {n: 0.2 * torch.randn(t.shape, generator=g) if "lora_B" in n else t for n, t in v0.items()}
    bus.lora.publish(v0, policy_version=0)

    def sample(prefix: str) -> list:
        """Every worker rolls out the same task (same sample and noise seed) under its own id."""
        for i, worker in enumerate(workers):
            publish_tasks(bus, [Task(f"{prefix}-{i}", dataset_index=3, noise_seed=11)])
            assert worker.run(max_tasks=1) == 1
        return [g for g in rollout_groups(bus) if g.meta.key.group_id.startswith(prefix)]

    def edits(group):
        return torch.stack(group.images.edits)

    before = sample("before")
    assert [g.meta.key.policy_version for g in before] == [0, 0]
    assert torch.equal(edits(before[0]), edits(before[1]))  # rollouts are reproducible across workers

    # the workers already hold v0; a newer version must replace it before their next task
    bus.lora.publish(v1, policy_version=1)
    after = sample("after")
    assert [g.meta.key.policy_version for g in after] == [1, 1]
    for worker in workers:
        assert worker.policy_version == 1
        assert counter("rcgrpo_rollout_policy_version", worker=worker.worker_id) == 1
        assert_same_tensors(lora_state_dict(worker.editor.transformer), v1)
    assert torch.equal(edits(after[0]), edits(after[1]))
    # same task, same noise: only the weights changed, and the edits with them (64x the PNG quantum)
    change = (edits(after[0]) - edits(before[0])).abs()
    assert change.max() > 0.25 and change.mean() > 0.05, (
        f"v1 edits ~ v0 edits (max change {change.max():.4f}, mean {change.mean():.4f}): workers ignore new weights"
    )
    # the record's training tensors are stored under its group key: the version that sampled it
    assert after[0].train.key == bus.train_blobs.key_for(after[0].meta.key.id)
    assert bus.train_blobs.get(after[0].train)
    assert train_blob_exists(bus, "after-0", 1) and not train_blob_exists(bus, "after-0", 0)

    # a corrupted version is refused (sha256), and the worker keeps sampling the version it verified
    corrupted = bus.lora.publish({n: t + 1 for n, t in v1.items()}, policy_version=2)
    data = bytearray(bus.client.get(corrupted.blob.key))
    data[-1] ^= 0xFF
    bus.client.set(corrupted.blob.key, bytes(data))
    with pytest.raises(BlobIntegrityError, match="sha256"):
        workers[0].sync_lora()
    assert workers[0].policy_version == 1
    assert_same_tensors(lora_state_dict(workers[0].editor.transformer), v1)
    # in its loop the worker reports the refusal instead of ending, so the driver can republish
    assert bus.rejected_lora() is None
    assert workers[1].sync_lora_or_report() is False
    version, reason = bus.rejected_lora()
    assert version == 2 and reason.startswith("handshake-1: ") and "sha256" in reason
    # a task taken after the loop's check (the corrupt version published in between) is still rolled
    # out, with the verified weights, and tagged with their version
    publish_tasks(bus, [Task("race-0", dataset_index=3, noise_seed=11)])
    [entry], version, stop = workers[0].next_entries()
    assert version == 2 and not stop  # the newest, as of the task's arrival: the corrupt one
    assert workers[0].process(entry, version)
    [raced] = [g for g in rollout_groups(bus) if g.meta.key.group_id == "race-0"]
    assert raced.meta.key.policy_version == 1
    bus.lora.publish(v1, policy_version=3)  # the learner's republish
    assert (
        bus.rejected_lora() is None
        and workers[1].sync_lora_or_report() is True
        and workers[1].policy_version == 3
    )


def test_a_worker_completes_a_task_and_takes_the_next_in_one_round_trip(tmp_path, redis_url, round_trips):
    cfg = run_config(tmp_path, redis_url, "chained")
    bus = RunBus(cfg, redis_url)
    worker = RolloutWorker(cfg, redis_url, "chained-0")
    bus.lora.publish(lora_state_dict(worker.editor.transformer), policy_version=0)
    publish_tasks(bus, [Task(f"chain-{i}", dataset_index=i, noise_seed=i) for i in range(3)])
    [first], version, stop = worker.next_entries()  # its own pending, the look for reclaimable, a read
    assert version == 0 and not stop
    worker.sync_lora(version)
    published, answers = [], []

    def complete(entry, **kwargs):
        published.append(worker.process(entry, version, **kwargs))

    # blobs, completion and the next task's read (with the version and the stop flag): one request
    assert round_trips(worker.bus.client, lambda: complete(first, take_next=True)) == 1
    assert round_trips(worker.bus.client, lambda: answers.append(worker.next_entries())) == 0
    [second], version, stop = answers[0]
    assert Task.from_fields(second.fields).group_id == "chain-1" and (version, stop) == (0, False)
    assert published == [True] and [g.meta.key.group_id for g in rollout_groups(bus)] == ["chain-0"]
    assert bus.tasks.pending_count() == 1  # the second: taken, not completed
    # a stop that comes with the next task ends the loop before it: that task stays pending
    bus.request_stop()
    complete(second, take_next=True)
    assert worker.run() == 0 and bus.tasks.pending_count() == 1
    assert [g.meta.key.group_id for g in rollout_groups(bus)] == ["chain-0", "chain-1"]
    [left] = [e for e, f in bus.client.xrange(bus.tasks.name) if Task.from_fields(f).group_id == "chain-2"]
    pending = bus.client.xpending_range(
        bus.tasks.name, bus.tasks.group, "-", "+", 10, consumername="chained-0"
    )
    assert [p["message_id"] for p in pending] == [left]
    bus.clear_stop()


# ---------------------------------------------------------------------------------------------------
# 3. a rollout worker process killed mid-task


def test_task_of_a_killed_worker_process_is_reclaimed_and_completed_once(tmp_path, redis_url):
    # the doomed worker's groups are large and long (G=32, 64 steps), so it is surely killed mid-task
    slow = run_config(tmp_path, redis_url, "sigkill", "method.group_size=32", "method.num_steps=64")
    fast = run_config(tmp_path, redis_url, "sigkill", "rollout.reclaim_idle_ms=100")
    bus = RunBus(fast, redis_url)
    rescuer = RolloutWorker(fast, redis_url, "rescuer")
    bus.lora.publish(lora_state_dict(rescuer.editor.transformer), policy_version=0)
    task = Task("task-doomed", dataset_index=2, noise_seed=5)
    task_entry = bus.tasks.publish(task.to_fields())

    config_path = tmp_path / "sigkill.yaml"
    config_path.write_text(slow.to_yaml())
    log_path = tmp_path / "doomed.log"
    with log_path.open("wb") as log:
        doomed = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "rollout-worker", "--config", str(config_path),
             "--worker-id", "doomed", "--metrics-port", "0"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def pending_to(consumer):
        pending = bus.client.xpending_range(
            bus.tasks.name, bus.tasks.group, "-", "+", 10, consumername=consumer
        )
        return [p["message_id"].decode() for p in pending]

    def taken_by_doomed():
        assert doomed.poll() is None, f"the doomed worker exited early:\n{log_path.read_text()[-3000:]}"
        return pending_to("doomed")

    try:
        taken = wait_until(taken_by_doomed, timeout_s=180, what="the doomed worker to take the task")
        assert taken == [task_entry]
        assert bus.rollouts.length() == 0  # mid-task: nothing published yet
        doomed.send_signal(signal.SIGKILL)
        assert doomed.wait(timeout=30) == -signal.SIGKILL
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait()
    assert bus.rollouts.length() == 0 and pending_to("doomed") == [task_entry]

    # another worker takes the task over once it has been idle reclaim_idle_ms, and completes it
    reclaimed = wait_until(lambda: rescuer.next_entries()[0], timeout_s=30, what="the task to be reclaimed")
    assert [e.id for e in reclaimed] == [task_entry] and Task.from_fields(reclaimed[0].fields) == task
    assert rescuer.process(reclaimed[0]) is True
    # a second completion (say the dead worker had finished after all) publishes nothing
    assert rescuer.process(reclaimed[0]) is False

    groups = [g for g in rollout_groups(bus) if g.meta.key.group_id == task.group_id]
    assert len(groups) == 1 and bus.rollouts.length() == 1
    assert groups[0].meta.group_size == fast.method.group_size and groups[0].meta.key.policy_version == 0
    assert bus.tasks.pending_count() == 0 and bus.tasks.dead_letter_length() == 0
    assert rescuer.next_entries()[0] == []  # nothing left to take


# ---------------------------------------------------------------------------------------------------
# 4. a learner killed and resumed


def test_learner_killed_after_an_unsaved_step_resumes_with_identical_weights(tmp_path, redis_url):
    cfg = run_config(
        tmp_path,
        redis_url,
        "resume",
        "learner.total_steps=3",
        "learner.groups_per_step=1",
        "learner.checkpoint_every=2",
        "learner.max_staleness=10",  # all groups are sampled up front with v0
    )
    bus = RunBus(cfg, redis_url)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Learner(cfg, redis_url, resume=True)

    learner_a = Learner(cfg, redis_url)
    assert learner_a.publish_lora() == 0
    worker = RolloutWorker(cfg, redis_url, "resume-worker")
    with reward_server(cfg, redis_url):
        produce_scored(
            bus, worker, [Task(f"task-{i}", dataset_index=i, noise_seed=100 + i) for i in range(3)]
        )
    assert [s.meta.key.policy_version for s in scored_groups(bus)] == [0, 0, 0]

    weights, stats = {}, []
    for _ in range(3):
        stats.append(learner_a.step(timeout_s=60))
        weights[learner_a.state.step] = lora_state_dict(learner_a.editor.transformer)
        if learner_a.state.step == 2:
            checkpoint_path = learner_a.checkpoint(task_cursor=3)
            optimizer_at_2 = optimizer_tensors(learner_a.optimizer)
            generator_at_2 = learner_a.generator.get_state().clone()
    assert [s["step"] for s in stats] == [1, 2, 3] and all(s["zero_variance_ratio"] == 0 for s in stats)
    assert any(not torch.equal(weights[2][n], weights[3][n]) for n in weights[3])  # step 3 changed the LoRA
    assert checkpoint_path.name == "step_000002"
    assert len(optimizer_at_2) == 3 * len(weights[2])  # AdamW: step, exp_avg, exp_avg_sq per LoRA tensor
    assert bus.scored.pending_count() == 1  # step 3's group: trained, but in no checkpoint
    del learner_a  # the crash: step 3 is lost with the process
    gc.collect()

    learner_b = Learner(cfg, redis_url, resume=True)
    assert learner_b.resume_point() == (2, 3)
    assert_same_tensors(lora_state_dict(learner_b.editor.transformer), weights[2])
    assert_same_tensors(optimizer_tensors(learner_b.optimizer), optimizer_at_2)
    assert torch.equal(learner_b.generator.get_state(), generator_at_2)

    redone = learner_b.step(timeout_s=10)  # the pending step-3 group, re-read
    assert redone["step"] == 3 and redone["groups"] == 1 and redone["reward_mean"] == stats[2]["reward_mean"]
    assert_same_tensors(lora_state_dict(learner_b.editor.transformer), weights[3])
    assert_same_tensors(bus.lora.load(bus.lora.latest()), weights[3])  # broadcast as a newer version
    learner_b.checkpoint(task_cursor=3)
    assert bus.scored.pending_count() == 0
    for group in scored_groups(
        bus
    ):  # every group's training tensors freed once a checkpoint holds its update
        with pytest.raises(BlobMissingError):
            bus.train_blobs.get(group.train)
    del learner_b
    gc.collect()
    with pytest.raises(ValueError, match="already at learner.total_steps=3"):
        Learner(cfg, redis_url, resume=True)


# ---------------------------------------------------------------------------------------------------
# 5. the staleness bound


def test_groups_older_than_max_staleness_are_dropped_and_counted(tmp_path, redis_url):
    cfg = run_config(tmp_path, redis_url, "stale", "learner.max_staleness=0", "learner.groups_per_step=1")
    bus = RunBus(cfg, redis_url)
    learner = Learner(cfg, redis_url)
    learner.publish_lora()
    worker = RolloutWorker(cfg, redis_url, "stale-worker")
    stale_before = counter("rcgrpo_learner_groups_total", outcome="stale")
    trained_before = counter("rcgrpo_learner_groups_total", outcome="trained")
    with reward_server(cfg, redis_url):
        produce_scored(bus, worker, [Task(f"v0-{i}", dataset_index=i, noise_seed=i) for i in range(3)])
        first = learner.step(timeout_s=60)  # trains v0-0 at version 0 and publishes version 1
        assert (first["groups"], first["policy_version"], first["staleness_mean"]) == (1, 1, 0)
        produce_scored(bus, worker, [Task("v1-0", dataset_index=3, noise_seed=3)])
    assert [(s.meta.key.group_id, s.meta.key.policy_version) for s in scored_groups(bus)] == [
        ("v0-0", 0),
        ("v0-1", 0),
        ("v0-2", 0),
        ("v1-0", 1),
    ]

    second = learner.step(timeout_s=10)  # v0-1 and v0-2 lag version 1 by one: dropped; v1-0 is trained
    assert (second["groups"], second["staleness_mean"], second["policy_version"]) == (1, 0, 2)
    assert counter("rcgrpo_learner_groups_total", outcome="stale") - stale_before == 2
    assert counter("rcgrpo_learner_groups_total", outcome="trained") - trained_before == 2
    # until a checkpoint accounts for them, their training tensors stay (a resumed learner re-reads the entries)
    assert train_blob_exists(bus, "v0-1", 0) and train_blob_exists(bus, "v0-2", 0)
    learner.checkpoint(task_cursor=4)
    assert bus.scored.pending_count() == 0  # dropped groups are acknowledged too, never re-read
    for group_id, version in (("v0-0", 0), ("v0-1", 0), ("v0-2", 0), ("v1-0", 1)):
        assert not train_blob_exists(bus, group_id, version)


def test_the_same_seed_gives_the_same_run(tmp_path, redis_url, monkeypatch):
    """Under staleness_policy "wait" (the tiny run's) which groups form an update, in which order and with
    which policy version is fixed by the task order, so two runs of one seed match number for number."""
    from deploy.driver import run

    for variable in ("RCGRPO_REWARD_URL", "RAY_ADDRESS", "REDIS_URL"):
        monkeypatch.delenv(variable, raising=False)
    timing = {"time", "wait_seconds", "update_seconds", "publish_seconds", "images_per_s", "streams"}
    runs = []
    for name in ("same-a", "same-b"):
        cfg = run_config(
            tmp_path,
            redis_url,
            name,
            "rollout.num_workers=2",
            "learner.total_steps=3",
            "learner.groups_per_step=2",
            "learner.staleness_policy=wait",
            "eval.num_samples=4",
        )
        run(cfg)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        evaluation = json.loads((tmp_path / name / "eval.json").read_text())
        runs.append(([{k: v for k, v in row.items() if k not in timing} for row in rows], evaluation))
    (rows_a, eval_a), (rows_b, eval_b) = runs
    assert [r["step"] for r in rows_a] == [1, 2, 3]
    assert rows_a == rows_b  # rewards, losses, ratios, gradients: every number of every step
    assert eval_a["samples"] == eval_b["samples"] and eval_a["change"] == eval_b["change"]
