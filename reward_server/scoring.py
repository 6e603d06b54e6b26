"""The scoring core that REST and stream mode share: wire items to checked tensors, the choice of
rewards and weights, and scores through the micro-batcher.

Per candidate the total is r_i = sum_j w_j r_j (docs/METHOD.md section 5.1), the passed-through ACD being one
of the r_j with w = lambda_ACD, or its gated form (services.schemas.Composition) that guards against
reward hacking.

Fail closed: a reward that cannot be computed raises RewardFailedError (HTTP 503 naming the reward and
the cause; a stream group stays pending); it is never replaced by a number.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from rcgrpo.rewards import gated_total, unit_mean
from reward_server.batcher import MicroBatcher
from reward_server.metrics import RewardServerMetrics
from reward_server.registry import (
    MODEL_LOADERS,
    MODEL_SECTIONS,
    OPTIONAL_INPUTS,
    REWARDS,
    Reward,
)
from reward_server.reward_batch import RewardBatch
from reward_server.settings import RewardServerSettings
from services.codec import CodecError, decode_image, decode_mask
from services.record import RolloutGroup
from services.schemas import Composition, RewardInfo, RewardsResponse, ScoreItem, b64_to_bytes

MIN_IMAGE_SIDE = 16  # smaller images cannot be scored (SSIM's 11x11 window, CLIP crops)


class BadInputError(ValueError):
    """The request is well-formed JSON but cannot be scored (answered with 422 and this reason)."""


class NotReadyError(RuntimeError):
    """The served models are still loading (answered with 503)."""


class RewardFailedError(RuntimeError):
    """A reward could not be computed (a judge timed out, a model raised, a score was not finite):
    answered with 503 naming the reward and the cause, never with a made-up score."""

    def __init__(self, reward: str, cause: str):
        super().__init__(f"reward {reward!r} could not be computed: {cause}")
        self.reward = reward
        self.cause = cause


@dataclass
class Item:
    """One edit to score, decoded: edit, source, target (3,H,W) in [0,1]; mask (H,W) in [0,1]."""

    edit: torch.Tensor
    source: torch.Tensor
    mask: torch.Tensor
    instruction: str = ""
    caption: str = ""
    target: torch.Tensor | None = None
    acd: float | None = None


def check_item(item: Item, where: str) -> Item:
    if item.edit.shape != item.source.shape:
        raise BadInputError(
            f"{where}: edit is {_hw(item.edit)} but source is {_hw(item.source)}; they must have the same size"
        )
    if item.target is not None and item.target.shape != item.source.shape:
        raise BadInputError(f"{where}: target is {_hw(item.target)} but source is {_hw(item.source)}")
    if item.mask.shape != item.source.shape[1:]:
        raise BadInputError(
            f"{where}: mask is {_hw(item.mask)} but the images are {_hw(item.source)}; the mask must be one "
            "grayscale plane of the same height and width"
        )
    return item


def _hw(x: torch.Tensor) -> str:
    return f"{x.shape[-1]}x{x.shape[-2]} (WxH)"


def _decode_png(data: str, what: str, kind: str, max_pixels: int) -> torch.Tensor:
    try:
        raw = b64_to_bytes(data, what)
        # Check the size from the header before decoding, so a small PNG of a huge image is refused
        # without allocating it.
        try:
            width, height = Image.open(io.BytesIO(raw)).size
        except Exception as error:
            raise CodecError(f"{what} is not a readable PNG ({len(raw)} bytes): {error}") from error
        if min(width, height) < MIN_IMAGE_SIDE:
            raise CodecError(
                f"{what} is {width}x{height} pixels; both sides must be at least {MIN_IMAGE_SIDE}"
            )
        if width * height > max_pixels:
            raise CodecError(f"{what} is {width}x{height} pixels, over this server's limit of {max_pixels}")
        return decode_image(raw) if kind == "image" else decode_mask(raw)
    except CodecError as error:
        message = str(error)
        raise BadInputError(message if message.startswith(what) else f"{what}: {message}") from error


def decode_score_item(wire: ScoreItem, index: int, max_pixels: int) -> Item:
    where = f"items[{index}]"

    def image(name: str, kind: str = "image") -> torch.Tensor:
        return _decode_png(getattr(wire, name), f"{where}.{name}", kind, max_pixels)

    item = Item(
        edit=image("edit"),
        source=image("source"),
        mask=image("mask", "mask"),
        instruction=wire.instruction,
        caption=wire.caption,
        target=image("target") if wire.target is not None else None,
        acd=wire.intrinsic.acd if wire.intrinsic is not None else None,
    )
    return check_item(item, where)


def items_from_group(group: RolloutGroup) -> list[Item]:
    """One item per candidate of a record that has its images."""
    meta, images = group.meta, group.images
    items = []
    for i, edit in enumerate(images.edits):
        item = Item(
            edit=edit,
            source=images.source,
            mask=images.mask,
            instruction=meta.instruction,
            caption=meta.caption,
            target=images.target,
            acd=meta.acd[i],
        )
        items.append(check_item(item, f"group {meta.key.id!r} candidate {i}"))
    return items


def _failed(reward: Reward, cause: str, metrics: RewardServerMetrics | None) -> RewardFailedError:
    if metrics is not None:
        metrics.reward_failures.labels(reward=reward.name).inc()
    return RewardFailedError(reward.name, cause)


def compute_reward(
    reward: Reward, items: Sequence[Item], models: dict, metrics: RewardServerMetrics | None = None
) -> list[float]:
    """One score per item; items of different sizes run as separate batches."""
    by_size: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        by_size.setdefault(tuple(item.edit.shape), []).append(i)
    scores = [0.0] * len(items)
    for indices in by_size.values():
        chosen = [items[i] for i in indices]
        batch = RewardBatch(
            edits=torch.stack([it.edit for it in chosen]),
            sources=torch.stack([it.source for it in chosen]),
            masks=torch.stack([it.mask for it in chosen]),
            instructions=[it.instruction for it in chosen],
            captions=[it.caption for it in chosen],
            targets=torch.stack([it.target for it in chosen]) if "target" in reward.inputs else None,
            acd=torch.tensor([it.acd for it in chosen], dtype=torch.float64)
            if "acd" in reward.inputs
            else None,
        )
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                values = reward.fn(batch, models)
        except ValueError as error:  # reward functions raise ValueError for inputs they cannot score
            raise BadInputError(f"reward {reward.name!r} cannot score this input: {error}") from error
        except Exception as error:  # anything else: the reward is unavailable, not zero
            raise _failed(reward, f"{type(error).__name__}: {error}", metrics) from error
        if metrics is not None:
            metrics.reward_latency.labels(reward=reward.name).observe(time.perf_counter() - start)
        values = values.detach().cpu().double().reshape(-1).tolist()
        if len(values) != len(indices):
            raise _failed(reward, f"returned {len(values)} scores for {len(indices)} items", metrics)
        for i, value in zip(indices, values, strict=True):
            if not math.isfinite(value):
                raise _failed(reward, f"returned a non-finite score {value}", metrics)
            scores[i] = value
    return scores


@dataclass
class ScoredItem:
    scores: dict[str, float]
    total: float


class Scorer:
    """The served rewards with their weights and models, and the batcher their model-based ones share."""

    def __init__(
        self,
        settings: RewardServerSettings,
        metrics: RewardServerMetrics,
        registry: Mapping[str, Reward] = REWARDS,
        model_loaders: Mapping[str, Callable] = MODEL_LOADERS,
        model_sections: Mapping[str, str] = MODEL_SECTIONS,
    ):
        unknown = sorted(set(settings.rewards) - set(registry))
        if unknown:
            raise ValueError(f"config names unknown rewards {unknown}; registered: {sorted(registry)}")
        if not settings.rewards:
            raise ValueError("config serves no rewards: list at least one under `rewards:`")
        self.registry = registry
        self.served = {name: registry[name] for name in settings.rewards}
        self.weights = dict(settings.rewards)
        self.composition = settings.composition
        self.check_composition(self.composition, self.weights)
        self.model_dirs = {}  # model name -> its directory, or its settings section's settings
        for reward in self.served.values():
            if reward.model is None:
                continue
            if reward.model not in model_loaders:
                raise ValueError(f"reward {reward.name!r} needs model {reward.model!r}, which has no loader")
            if reward.model in model_sections:
                section = model_sections[reward.model]
                if getattr(settings, section, None) is None:
                    raise ValueError(
                        f"reward {reward.name!r} needs model {reward.model!r}: configure it under `{section}:`"
                    )
                self.model_dirs[reward.model] = getattr(settings, section)
                continue
            if reward.model not in settings.models:
                raise ValueError(
                    f"reward {reward.name!r} needs model {reward.model!r}: set models.{reward.model} to a local directory"
                )
            if not Path(settings.models[reward.model]).is_dir():
                raise ValueError(
                    f"models.{reward.model} = {str(settings.models[reward.model])!r} is not a directory"
                )
            self.model_dirs[reward.model] = settings.models[reward.model]
        self.model_loaders = model_loaders
        self.model_sections = model_sections
        self.models: dict[str, object] = {}
        self.metrics = metrics
        self.max_image_pixels = settings.max_image_pixels
        batching = settings.batching
        self.batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=batching.max_batch_size if batching.enabled else 1,
            max_wait_ms=batching.max_wait_ms if batching.enabled else 0.0,
            max_queue_items=batching.max_queue_items,
            retry_after_s=batching.retry_after_s,
            metrics=metrics,
        )

    @property
    def ready(self) -> bool:
        return set(self.models) == set(self.model_dirs)

    def load_models(self) -> None:
        for name, source in self.model_dirs.items():
            if name in self.model_sections:
                self.models[name] = self.model_loaders[name](source, self.metrics)
            else:
                self.models[name] = self.model_loaders[name](str(source))
        self.metrics.models_ready.set(1)

    def close(self) -> None:
        """Release what the loaded models hold (the judge's connections and threads)."""
        for model in self.models.values():
            close = getattr(model, "close", None)
            if callable(close):
                close()

    def listing(self) -> RewardsResponse:
        return RewardsResponse(
            rewards=[
                RewardInfo(
                    name=r.name,
                    description=r.description,
                    inputs=list(r.inputs),
                    model_based=r.model_based,
                    weight=self.weights[r.name],
                )
                for r in self.served.values()
            ]
        )

    def choose(
        self, rewards: list[str] | None = None, weights: dict[str, float] | None = None
    ) -> dict[str, float]:
        """The rewards to compute and their weights: a request's choice among the served ones."""
        names = list(dict.fromkeys(rewards)) if rewards else list(self.served)
        for name in names:
            if name not in self.registry:
                raise BadInputError(f"unknown reward {name!r}; this server serves {list(self.served)}")
            if name not in self.served:
                raise BadInputError(
                    f"reward {name!r} is not served by this server; it serves {list(self.served)}"
                )
        stray = sorted(set(weights or {}) - set(names))
        if stray:
            raise BadInputError(f"weights given for {stray}, which are not among the chosen rewards {names}")
        return {name: (weights or {}).get(name, self.weights[name]) for name in names}

    def check_composition(self, composition: Composition, chosen: Mapping[str, float]) -> None:
        """BadInputError unless the gated composition can be applied to the chosen rewards."""
        if composition.kind != "gated":
            return
        missing = [name for name in composition.instruction_terms if name not in chosen]
        if missing:
            raise BadInputError(
                f"the gated composition's instruction terms {missing} are not among the chosen rewards "
                f"{list(chosen)}"
            )
        for name, weight in chosen.items():
            if name in composition.ungated_terms:
                continue
            if self.registry[name].unit_range is None:
                raise BadInputError(
                    f"reward {name!r} has no bounded range, so the gated composition can only take it as "
                    "an ungated term (composition.ungated_terms)"
                )
            if weight < 0:
                raise BadInputError(f"the gated composition needs weights >= 0; {name!r} has {weight}")

    def total(
        self, scores: Mapping[str, float], chosen: Mapping[str, float], composition: Composition
    ) -> float:
        """r_i of one candidate; BadInputError if the weights make it non-finite."""
        if composition.kind == "gated":

            def terms(names) -> dict:
                return {n: (chosen[n], scores[n], self.registry[n].unit_range) for n in names}

            instruction = composition.instruction_terms
            ungated = [n for n in chosen if n in composition.ungated_terms]
            preservation = [n for n in chosen if n not in instruction and n not in ungated]
            total = gated_total(
                execution=unit_mean(terms(instruction)),  # E
                consistency=unit_mean(terms(preservation)),  # C
                ungated=sum(chosen[n] * scores[n] for n in ungated),  # U
                floor=composition.floor,
                slope=composition.slope,
            )
        else:
            total = sum(chosen[name] * scores[name] for name in chosen)  # r_i = sum_j w_j r_j
        if not math.isfinite(total):
            raise BadInputError(f"the weights {dict(chosen)} make a total of {total}; choose smaller weights")
        return total

    def check_inputs(self, chosen: Mapping[str, float], items: Sequence[Item], where: str = "items") -> None:
        for name in chosen:
            for field in OPTIONAL_INPUTS:
                if field not in self.served[name].inputs:
                    continue
                lacking = [i for i, item in enumerate(items) if getattr(item, field) is None]
                if lacking:
                    label = "intrinsic.acd" if field == "acd" else field
                    raise BadInputError(
                        f"reward {name!r} needs {label!r}, which {where} {lacking[:10]} lack; "
                        f"give it or choose other rewards"
                    )

    def expecting(self, chosen: Mapping[str, float]):
        """Context around a request's decoding: batches of its model-based rewards may wait for it."""
        if any(self._batched(name) for name in chosen):
            return self.batcher.expecting()
        return contextlib.nullcontext()

    def _batched(self, name: str) -> bool:
        reward = self.served[name]
        return reward.model_based and reward.batched

    def _run_batch(self, name: str, items: list[Item]) -> list[float | Exception]:
        try:
            return compute_reward(self.served[name], items, self.models, self.metrics)
        except BadInputError as error:
            if len(items) == 1:
                return [error]
        # A batch mixes callers: score item by item so only the offending item's caller gets the 422.
        return [self._run_batch(name, [item])[0] for item in items]

    def _run_direct(self, names: list[str], items: Sequence[Item]) -> dict[str, list[float]]:
        return {name: compute_reward(self.served[name], items, self.models, self.metrics) for name in names}

    async def score(
        self,
        items: Sequence[Item],
        chosen: Mapping[str, float],
        source: str,
        composition: Composition | None = None,
    ) -> list[ScoredItem]:
        """Every chosen reward for every item and their total (by `composition`, default the weighted
        sum). Raises NotReadyError, BadInputError, QueueFullError, RewardFailedError.

        The batcher submit happens before this coroutine first awaits, so a caller leaving
        `expecting()` just before calling this is already queued when the batcher looks again."""
        if not self.ready:
            raise NotReadyError("the reward models are still loading")
        composition = composition or Composition()
        self.check_composition(composition, chosen)
        self.check_inputs(chosen, items)
        batched = [name for name in chosen if self._batched(name)]
        direct = [name for name in chosen if not self._batched(name)]
        jobs = [(name, item) for name in batched for item in items]
        pending = self.batcher.submit(jobs) if jobs else None  # admitted (or refused) before any work
        try:
            per_reward = await asyncio.to_thread(self._run_direct, direct, items) if direct else {}
        except BaseException:
            if pending is not None:  # free the batcher's slots; nobody waits for these scores now
                pending.cancel()
            raise
        if pending is not None:
            flat = await pending
            for k, name in enumerate(batched):
                per_reward[name] = flat[k * len(items) : (k + 1) * len(items)]
        results = []
        for i in range(len(items)):
            scores = {name: per_reward[name][i] for name in chosen}
            results.append(ScoredItem(scores, self.total(scores, chosen, composition)))
        self.metrics.items_scored.labels(source=source).inc(len(items))
        return results
