"""A full volume under the checkpoints or the policy versions: the write fails with one line, leaves no
partial file and the previous checkpoint or version intact and loadable, and succeeds once there is
space again. The volume is a real tmpfs of 4 MiB (mounting it needs root; elsewhere these are skipped),
filled with a file until the kernel answers ENOSPC. Slow: a whole run whose checkpoints are on it goes
on past a checkpoint that fails, stops at a last one that fails, and `--resume` completes from disk.
"""

import errno
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from learner.checkpoint import (
    CheckpointError,
    LearnerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from services.blobstore import DirectoryBlobStore
from services.lora_store import LoraPublishError, LoraStore
from services.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def volume(tmp_path):
    mount = tmp_path / "volume"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (root needed): {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(volume: Path) -> Path:
    """Write a file until the volume is full; the file (delete it to free the space)."""
    filler = volume / "filler"
    with open(filler, "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def learner_state(seed: int, step: int):
    """A LoRA of ~200 KB, an Adam optimiser that has taken a step, and a generator."""
    generator = torch.Generator().manual_seed(seed)
    lora = {f"block{i}.lora_A": torch.randn(64, 256, generator=generator) for i in range(3)}
    params = [torch.nn.Parameter(t.clone()) for t in lora.values()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    return LearnerState(step=step, policy_version=step, task_cursor=4 * step), lora, optimizer, generator


def test_a_checkpoint_onto_a_full_volume_fails_in_one_line_and_leaves_the_previous_one_loadable(volume):
    directory = volume / "checkpoints"
    state, lora, optimizer, generator = learner_state(0, step=2)
    save_checkpoint(directory, state, lora, optimizer, generator)
    filler = fill(volume)

    later, later_lora, later_optimizer, later_generator = learner_state(1, step=4)
    with pytest.raises(CheckpointError) as failed:
        save_checkpoint(directory, later, later_lora, later_optimizer, later_generator)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint of step 4 not written to {directory}: [Errno 28] No space left")
    assert message.endswith("step_000002 is intact")
    assert sorted(p.name for p in directory.iterdir()) == ["step_000002"]  # no partial directory

    restored_optimizer = learner_state(2, step=0)[2]
    restored, restored_lora = load_checkpoint(
        latest_checkpoint(directory), restored_optimizer, torch.Generator()
    )
    assert restored.step == 2 and restored.task_cursor == 8
    assert all(torch.equal(restored_lora[k], lora[k]) for k in lora)
    assert torch.equal(
        restored_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )

    filler.unlink()  # space is back: the next checkpoint is written
    path = save_checkpoint(directory, later, later_lora, later_optimizer, later_generator)
    assert latest_checkpoint(directory) == path and path.name == "step_000004"


def test_a_policy_version_onto_a_full_volume_fails_in_one_line_and_the_previous_stays_latest(
    volume, tmp_path
):
    lora = learner_state(0, step=0)[1]
    with EmbeddedRedis(data_dir=tmp_path / "redis") as server:
        client = server.client()
        store = LoraStore(
            client, namespace="full", blobs=DirectoryBlobStore(volume / "weights", prefix="lora-")
        )
        store.publish(lora)
        filler = fill(volume)

        newer = {name: tensor + 1 for name, tensor in lora.items()}
        with pytest.raises(LoraPublishError) as failed:
            store.publish(newer)
        message = str(failed.value)
        assert "\n" not in message
        assert message.startswith("policy version v1 not published: [Errno 28] No space left on device")
        assert message.endswith("the latest is still v0")
        assert store.latest_version() == 0 and store.versions() == [0]
        assert sorted(p.name for p in (volume / "weights").iterdir()) == ["lora-v0"]  # no partial file
        loaded = store.load(0)  # verified against its sha256
        assert all(torch.equal(loaded[k], lora[k]) for k in lora)

        filler.unlink()
        assert store.publish(newer).policy_version == 1
        assert torch.equal(store.load(1)["block0.lora_A"], newer["block0.lora_A"])
        client.close()


# ---------------------------------------------------------------------------------------------------
# the whole `rcgrpo train` (bench/chaos.py's small run) with its checkpoints on the volume


@pytest.mark.slow
def test_a_run_whose_checkpoint_volume_fills_goes_on_stops_at_its_last_checkpoint_and_resumes(
    volume, tmp_path
):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import chaos
        import run_checks
    finally:
        sys.path.remove(str(ROOT / "bench"))
    runs_dir, checkpoints = tmp_path / "runs", volume / "checkpoints"
    runs_dir.mkdir()
    checkpoints.mkdir()
    run_dir = runs_dir / "full"
    overrides = [
        "name=full",
        "learner.total_steps=8",
        "learner.checkpoint_every=2",
        "eval.num_samples=0",
        *chaos.SMALL_RUN,
    ]
    train = chaos.TrainProcess(runs_dir, overrides)
    resume = None
    try:

        def wait_for(ready, what: str, timeout_s: float = 300.0) -> None:
            deadline = time.monotonic() + timeout_s
            while not ready():
                assert train.process.poll() is None, f"the run exited {train.process.poll()} before {what}"
                assert time.monotonic() < deadline, f"no {what} in {timeout_s:.0f} s"
                train.descendants()
                time.sleep(0.1)

        wait_for(run_dir.exists, "run directory")
        (run_dir / "checkpoints").symlink_to(checkpoints)  # before the learner's first checkpoint
        wait_for((checkpoints / "step_000002").exists, "checkpoint of step 2")
        filler = fill(volume)
        wait_for(lambda: "checkpoint of step 4 not written" in train.log.read_text(), "failed checkpoint")
        filler.unlink()  # space is back: the run went on, and its next checkpoint is written
        wait_for((checkpoints / "step_000006").exists, "checkpoint of step 6")
        fill(volume)  # full again for the last one: the run stops, and says why
        assert train.wait(timeout_s=300) == 1
        log = train.log.read_text()
        [step_4] = [line for line in log.splitlines() if "checkpoint of step 4" in line]
        assert step_4 == (
            f"rcgrpo: checkpoint of step 4 not written to {run_dir / 'checkpoints'}: [Errno 28] No space "
            "left on device; step_000002 is intact; training goes on, the next checkpoint tries again"
        )
        assert log.rstrip().splitlines()[-1] == (
            f"rcgrpo train: error: checkpoint of step 8 not written to {run_dir / 'checkpoints'}: [Errno 28] "
            "No space left on device; step_000006 is intact; `rcgrpo train --resume` continues from it"
        )
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002", "step_000006"]
        assert train.left_behind() == []

        (volume / "filler").unlink()
        resume = chaos.TrainProcess(runs_dir, overrides, resume=True, log_name="resume.log")
        assert resume.wait(timeout_s=300) == 0, resume.log.read_text()[-2000:]
        assert "step 6" in resume.log.read_text()  # it continued from the checkpoint on disk
        assert run_checks.check_run(run_dir, steps=8) == []  # every step once, no group lost or trained twice
        assert resume.left_behind() == []
    finally:
        for one in (train, resume):
            if one is not None:
                one.kill_all()
