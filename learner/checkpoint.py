"""Learner checkpoints: LoRA, optimiser, step, RNG state, data cursor, policy version and the groups
already trained on. Tensors as safetensors, the rest as JSON (no pickle); written to a temporary
directory, fsynced and renamed, so a crash or a full volume mid-write leaves the previous checkpoint
intact."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from services.blobstore import fsync_directory, write_durably

CHECKPOINT_PREFIX = "step_"


@dataclass
class LearnerState:
    step: int  # optimiser steps taken
    policy_version: int  # newest policy version this learner published
    task_cursor: int  # tasks the driver had issued when this checkpoint was taken
    consumed: list[str] = field(default_factory=list)  # GroupKey ids of the groups trained on or dropped


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class CheckpointError(OSError):
    """A checkpoint that could not be written (a full volume): no part of it is left, and the previous
    checkpoint is intact."""


def save_checkpoint(
    directory: Path, state: LearnerState, lora: dict[str, torch.Tensor], optimizer, generator
) -> Path:
    """Write the checkpoint of `state.step`: each file fsynced in a temporary directory, then the directory
    renamed into place and the rename fsynced. Raises CheckpointError, in one line, if it cannot."""
    directory = Path(directory)
    final = directory / f"{CHECKPOINT_PREFIX}{state.step:06d}"
    partial = directory / f".partial-{state.step:06d}"
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    files = {  # serialised here, so a write error is an OSError naming its errno
        "lora.safetensors": save(lora),
        "optimizer.safetensors": save(opt_tensors),
        "rng.safetensors": save({"generator": generator.get_state()}),
        "state.json": json.dumps({**asdict(state), "optimizer": opt_meta}).encode(),
    }
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name, data in files.items():
            write_durably(partial / name, data)
        fsync_directory(partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        fsync_directory(directory)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        previous = latest_checkpoint(directory)
        kept = f"{previous.name} is intact" if previous else "there is no earlier checkpoint"
        raise CheckpointError(
            f"checkpoint of step {state.step} not written to {directory}: {error}; {kept}"
        ) from None
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(Path(directory).glob(f"{CHECKPOINT_PREFIX}*")) if Path(directory).is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path, optimizer, generator) -> tuple[LearnerState, dict[str, torch.Tensor]]:
    """Restore optimiser and generator in place; returns the state and the LoRA tensors."""
    path = Path(path)
    raw = json.loads((path / "state.json").read_text())
    optimizer.load_state_dict(
        _optimizer_state(load_file(path / "optimizer.safetensors"), raw.pop("optimizer"))
    )
    generator.set_state(load_file(path / "rng.safetensors")["generator"])
    return LearnerState(**raw), load_file(path / "lora.safetensors")
