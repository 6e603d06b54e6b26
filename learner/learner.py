"""The learner: consumes scored groups, assembles batches of whole groups, computes group-normalised
advantages, takes one RC-GRPO step, and publishes new policy versions. Runs as a Ray actor under the
driver or standalone (`rcgrpo learner`).

Scored entries are acknowledged only once a checkpoint holds their update; after a crash the
resumed learner re-reads what was pending and skips groups its checkpoint already trained on.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from learner.checkpoint import LearnerState, latest_checkpoint, load_checkpoint, save_checkpoint
from rcgrpo.advantages import group_advantages, groups_without_signal, reward_term_diagnostics
from rcgrpo.lora import load_lora_state_dict, lora_state_dict, save_lora
from rcgrpo.train_step import make_optimizer, rc_grpo_step
from services import metrics
from services.blobstore import BlobRef
from services.bus import RunBus
from services.config import RunConfig
from services.lora_store import LoraPublishError
from services.policy import start_component
from services.record import RolloutGroup, decode_rollout_group, load_train_group
from services.streams import StreamEntry

log = logging.getLogger("rcgrpo.learner")


class Learner:
    def __init__(
        self,
        cfg: RunConfig,
        redis_url: str,
        resume: bool = False,
        consumer: str = "learner-0",
        metrics_port: int = 0,
    ):
        self.editor = start_component(cfg, cfg.learner.torch_threads, metrics_port)
        self.cfg = cfg
        self.consumer = consumer
        self.bus = RunBus(cfg, redis_url)
        if cfg.learner.gradient_checkpointing:
            self.editor.transformer.enable_gradient_checkpointing()
        self.optimizer = make_optimizer(self.editor.transformer, cfg.method)
        self.generator = torch.Generator().manual_seed(cfg.learner.seed)
        self.checkpoint_dir = cfg.run_dir / "checkpoints"
        self.state = LearnerState(step=0, policy_version=-1, task_cursor=0)
        self._consumed = set()  # group key ids trained on or dropped
        self._unacked: list[str] = []  # scored entries whose effect is not in a checkpoint yet
        # training tensors of those entries: freed with the ack, as a resumed learner re-reads the entries
        self._unfreed: list[BlobRef] = []
        self._backlog: list[StreamEntry] | None = None  # own pending entries, read once at start
        self._batch: list[tuple[RolloutGroup, int]] = []  # fresh groups collected for the next update
        if resume:
            self._resume()
        self.bus.set_groups_consumed(self.groups_consumed())  # not what a crashed predecessor had said

    # -- LoRA versions and checkpoints ---------------------------------------------------------
    def _resume(self) -> None:
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.checkpoint_dir}")
        self.state, lora = load_checkpoint(path, self.optimizer, self.generator)
        self.cfg.learner.check_resumable(f"checkpoint {path.name}", self.state.step)
        load_lora_state_dict(self.editor.transformer, lora)
        self._consumed = set(self.state.consumed)
        log.info("resumed from %s at step %d", path, self.state.step)

    def resume_point(self) -> tuple[int, int]:
        """(optimiser step, driver task cursor) this learner continues from."""
        return self.state.step, self.state.task_cursor

    def groups_consumed(self) -> int:
        """Distinct groups this learner has trained on or dropped: what the driver's task supply replaces.
        Groups collected for the next update are not counted yet: under staleness_policy "wait" a task
        fed for them before the update would be sampled with the policy the update is about to replace."""
        return len(self._consumed) - len(self._batch)

    def publish_lora(self) -> int:
        """Publish the current LoRA as the next policy version (after any a crashed predecessor published)."""
        latest = self.bus.lora.latest_version()
        version = max(self.state.policy_version, -1 if latest is None else latest) + 1
        # float32, as trained (rcgrpo.lora.lora_state_dict): the workers' float32 adapters load it unrounded
        lora = lora_state_dict(self.editor.transformer)
        self.bus.lora.publish(lora, policy_version=version)
        self.state.policy_version = version
        metrics.LEARNER_POLICY_VERSION.set(version)
        return version

    def checkpoint(self, task_cursor: int) -> Path:
        """Write a checkpoint, then acknowledge the scored entries it accounts for."""
        self.state.task_cursor = task_cursor
        self.state.consumed = sorted(self._consumed)
        path = save_checkpoint(
            self.checkpoint_dir,
            self.state,
            lora_state_dict(self.editor.transformer),
            self.optimizer,
            self.generator,
        )
        self.bus.scored.ack(*self._unacked)
        self._unacked.clear()
        self.bus.train_blobs.delete(*self._unfreed)
        self._unfreed.clear()
        return path

    def save_final_lora(self, directory: Path) -> Path:
        return save_lora(self.editor, directory)

    # -- one update ----------------------------------------------------------------------------
    def _read_scored(self, count: int) -> list[StreamEntry]:
        if self._backlog is None:  # first read: this consumer's entries delivered before a crash
            self._backlog = self.bus.scored.read(self.consumer, count=None, own_pending=True)
        if self._backlog:
            taken, self._backlog = self._backlog[:count], self._backlog[count:]
            return taken
        return self.bus.scored.read(self.consumer, count=count, block_ms=500)

    def collect_groups(self, timeout_s: float | None = None) -> list[tuple[RolloutGroup, int]]:
        """groups_per_step fresh scored groups, with their staleness; stale or seen ones are skipped.
        On a timeout the groups collected so far are kept for the next call."""
        cfg = self.cfg.learner
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(self._batch) < cfg.groups_per_step:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"learner waited {timeout_s}s for {cfg.groups_per_step} scored groups, "
                    f"got {len(self._batch)}"
                )
            for entry in self._read_scored(cfg.groups_per_step - len(self._batch)):
                group = decode_rollout_group(entry.fields)
                key = group.meta.key
                if group.meta.scores is None:
                    raise ValueError(f"scored stream entry {entry.id} holds group {key.id!r} without scores")
                self._unacked.append(entry.id)
                missing = _missing_terms(group)
                if missing:  # fail closed: never train on a total with a term left out
                    log.error("group %s lacks reward terms %s: not trained on", key.id, missing)
                    metrics.LEARNER_GROUPS.labels("incomplete").inc()
                    self._unfreed.append(group.train)
                    continue
                if key.id in self._consumed:  # re-delivered after a crash: already trained on
                    metrics.LEARNER_GROUPS.labels("duplicate").inc()
                    continue
                self._consumed.add(key.id)
                staleness = max(self.state.policy_version, 0) - key.policy_version
                metrics.LEARNER_STALENESS.observe(staleness)
                if staleness > cfg.max_staleness:
                    metrics.LEARNER_GROUPS.labels("stale").inc()
                    self._unfreed.append(group.train)
                    continue
                self._batch.append((group, staleness))
        # in task order, not arrival order: which group is row 0 of the update must not depend on which
        # worker finished first (group ids are zero-padded task indices)
        batch, self._batch = sorted(self._batch, key=lambda item: item[0].meta.key.group_id), []
        return batch

    def step(self, timeout_s: float | None = None) -> dict:
        """Collect a batch, take one optimiser step, publish every publish_every steps; returns stats."""
        cfg, method = self.cfg.learner, self.cfg.method
        waited = time.perf_counter()
        batch = self.collect_groups(timeout_s)
        started = time.perf_counter()
        rewards = torch.tensor([group.meta.scores.totals for group, _ in batch])  # r_i: (groups, G)
        weights = batch[0][0].meta.rewards  # the run's rewards, which every group carries
        terms = {
            name: torch.tensor([[c[name] for c in group.meta.scores.scores] for group, _ in batch])
            for name in weights
        }
        instruction = sum(terms[name] for name in self.cfg.reward.instruction_terms)  # unweighted
        # a group whose candidates' instruction rewards differ by less than the reward's own noise has
        # no outcome to select on: its advantages would rank rounding and background jitter
        flat, below_floor = groups_without_signal(
            rewards, instruction, method.zero_std_eps, self.cfg.reward.noise_floor, method.drop_noise_groups
        )
        # A_i = sqrt(G) (r_i - mean) / max(||r - mean||_p, G^(1/p) sigma_min), clipped; zero for flat groups
        advantages = group_advantages(
            rewards, method.adv_p, method.adv_clip, method.zero_std_eps, method.adv_std_floor
        )
        kept = [(i, group) for i, (group, _) in enumerate(batch) if not flat[i]]
        tensors = self.bus.train_blobs.get_many([group.train for _, group in kept])  # one round trip
        groups = [
            load_train_group(group, advantages[i], self.editor.device, data)
            for (i, group), data in zip(kept, tensors, strict=True)
        ]
        stats = rc_grpo_step(
            self.editor, self.optimizer, groups, method, self.generator, cfg.micro_batch_rows
        )
        self.state.step += 1
        updated = time.perf_counter()
        publish_error = None
        if self.state.step % cfg.publish_every == 0:
            try:
                self.publish_lora()
            except LoraPublishError as error:  # workers keep the latest version; the next publish retries
                publish_error = str(error)
        self._unfreed += [group.train for group, _ in batch]
        signal = reward_term_diagnostics(
            terms,
            weights,
            self.cfg.reward.instruction_terms,
            method.adv_p,
            method.adv_clip,
            method.zero_std_eps,
        )
        per_group = _group_rows(
            batch, rewards, instruction, below_floor, flat, kept, stats, signal["per_group"]
        )
        stepped = {
            name: value
            for name, value in asdict(stats).items()
            if name not in ("distance_scale", "group_gradient_norm", "group_gradient_share")
        }
        result = {
            "step": self.state.step,
            "policy_version": self.state.policy_version,
            **stepped,
            # JSON keys are strings: the grid index j of each measured distance scale
            "distance_scale": {str(j): c for j, c in stats.distance_scale.items()},
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std(dim=1, unbiased=False).mean().item(),
            "instruction_reward_mean": instruction.mean().item(),
            "acd_mean": terms["acd"].mean().item() if "acd" in terms else math.nan,
            **{name: value for name, value in signal.items() if name != "per_group"},
            "group_signal": per_group,  # per group, with its task: what a study aggregates per task kind
            "zero_variance_ratio": flat.float().mean().item(),
            "noise_floor_groups": int(below_floor.sum()),
            # the part of the update's gradient that groups below the noise floor carry
            "noise_gradient_share": sum(
                row["gradient_share"] for row in per_group if row["below_noise_floor"]
            ),
            "staleness_mean": sum(s for _, s in batch) / len(batch),
            "wait_seconds": started - waited,  # the learner idle, waiting for scored groups
            "update_seconds": updated - started,
            "publish_seconds": time.perf_counter() - updated,
            "groups": len(batch),
        }
        if publish_error is not None:
            result["publish_error"] = publish_error
        self.bus.observe(learner_stats=result)
        metrics.export_learner_update(result, len(groups), int(flat.sum()))
        return result

    def try_step(self, wait_s: float) -> dict | None:
        """step() if groups_per_step fresh groups arrive within wait_s, else None (keeping those that did),
        so the caller can replace dropped groups and watch the run between tries."""
        try:
            return self.step(timeout_s=wait_s)
        except TimeoutError:
            return None
        finally:
            self.bus.set_groups_consumed(self.groups_consumed())

    def run_standalone(self) -> None:
        """The learner's own loop (outside Ray): publish, then step and checkpoint until total_steps."""
        self.publish_lora()
        cfg = self.cfg.learner
        while self.state.step < cfg.total_steps and not self.bus.stop_requested():
            if (stats := self.try_step(wait_s=1.0)) is None:
                continue
            if cfg.checkpoint_due(stats["step"]):
                self.checkpoint(self.bus.task_cursor())
            log.info("step %(step)d reward %(reward_mean).4f loss %(loss).4f v%(policy_version)d", stats)
        self.save_final_lora(self.cfg.run_dir / "lora")


def _group_rows(batch, rewards, instruction, below_floor, flat, kept, stats, signals) -> list[dict]:
    """One row per group of the batch, in batch order: its task, reward spread, noise-floor verdict, the
    share of the update's gradient it carried (0 if not trained on), its reward terms' spread and the
    hacking detectors' counts: what a study aggregates per task kind."""
    gradient_norm, gradient_share = [0.0] * len(batch), [0.0] * len(batch)
    for (i, _), norm, share in zip(kept, stats.group_gradient_norm, stats.group_gradient_share, strict=True):
        gradient_norm[i], gradient_share[i] = norm, share
    return [
        {
            "group_id": group.meta.key.group_id,
            "task": group.meta.task,
            "reward_std": rewards[i].std(unbiased=False).item(),
            "instruction_std": instruction[i].std(unbiased=False).item(),
            "below_noise_floor": bool(below_floor[i]),
            "trained": not bool(flat[i]),
            "gradient_norm": gradient_norm[i],
            "gradient_share": gradient_share[i],
            **signals[i],
            **_hacks(group),
        }
        for i, (group, _) in enumerate(batch)
    ]


def _hacks(group: RolloutGroup) -> dict[str, int]:
    """Per group, how many candidates the reward server's hacking detectors flagged (those it ran)."""
    return {
        name: int(sum(scores[name] for scores in group.meta.scores.scores))
        for name in ("no_edit", "repainted")
        if name in group.meta.rewards
    }


def _missing_terms(group: RolloutGroup) -> list[str]:
    """The run's reward terms some candidate of the scored group lacks (none for a complete group)."""
    wanted = set(group.meta.rewards)
    return sorted(set().union(*(wanted - set(scores) for scores in group.meta.scores.scores)))
