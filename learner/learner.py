"""The learner: consumes scored groups, assembles batches of whole groups, computes group-normalised
advantages, takes one RC-GRPO step, and publishes new weight versions. Runs as a Ray actor under the
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
from rcgrpo.advantages import group_advantages, reward_term_diagnostics, zero_variance_groups
from rcgrpo.lora import load_lora_state_dict, lora_state_dict, save_lora
from rcgrpo.train_step import TrainGroup, make_optimizer, rc_grpo_step
from services import metrics
from services.bus import RunBus
from services.config import RunConfig
from services.payloads import decode_train_payload
from services.policy import start_component
from services.schemas import decode_scored_group
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
        self.state = LearnerState(step=0, weight_version=-1, task_cursor=0)
        self._consumed = set()
        self._unacked: list[str] = []  # scored entries whose effect is not in a checkpoint yet
        # payloads of those entries: freed with the ack, as a resumed learner re-reads the entries
        self._unfreed: list[tuple[str, int]] = []
        self._backlog: list[StreamEntry] | None = None  # own pending entries, read once at start
        if resume:
            self._resume()

    # -- weights and checkpoints -----------------------------------------------------------------
    def _resume(self) -> None:
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.checkpoint_dir}")
        self.state, lora = load_checkpoint(path, self.optimizer, self.generator)
        if self.state.step >= self.cfg.learner.total_steps:
            raise ValueError(
                f"--resume: checkpoint {path.name} is at step {self.state.step}, already at learner.total_steps="
                f"{self.cfg.learner.total_steps}; raise learner.total_steps to train further"
            )
        load_lora_state_dict(self.editor.transformer, lora)
        self._consumed = set(self.state.consumed)
        log.info("resumed from %s at step %d", path, self.state.step)

    def resume_point(self) -> tuple[int, int]:
        """(optimiser step, driver task cursor) this learner continues from."""
        return self.state.step, self.state.task_cursor

    def publish_weights(self) -> int:
        """Publish the current LoRA as the next version (after any a crashed predecessor published)."""
        latest = self.bus.weights.latest()
        version = max(self.state.weight_version, -1 if latest is None else latest.version) + 1
        self.bus.weights.publish(lora_state_dict(self.editor.transformer), version=version)
        self.state.weight_version = version
        metrics.LEARNER_WEIGHT_VERSION.set(version)
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
        for group_id, policy_version in self._unfreed:
            self.bus.payloads.delete(group_id, policy_version)
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

    def collect_groups(self, timeout_s: float | None = None) -> list[tuple]:
        """groups_per_step fresh scored groups with their payloads; stale or seen ones are skipped."""
        cfg = self.cfg.learner
        batch = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(batch) < cfg.groups_per_step:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"learner waited {timeout_s}s for {cfg.groups_per_step} scored groups, got {len(batch)}"
                )
            for entry in self._read_scored(cfg.groups_per_step - len(batch)):
                scored = decode_scored_group(entry.fields)
                key = f"{scored.group_id}:{scored.policy_version}"
                self._unacked.append(entry.id)
                if key in self._consumed:  # re-delivered after a crash: already trained on
                    metrics.LEARNER_GROUPS.labels("duplicate").inc()
                    continue
                self._consumed.add(key)
                staleness = max(self.state.weight_version, 0) - scored.policy_version
                metrics.LEARNER_STALENESS.observe(staleness)
                if staleness > cfg.max_staleness:
                    metrics.LEARNER_GROUPS.labels("stale").inc()
                    self._unfreed.append((scored.group_id, scored.policy_version))
                    continue
                payload = decode_train_payload(
                    self.bus.payloads.get(scored.group_id, scored.policy_version), self.editor.device
                )
                batch.append((scored, payload, staleness))
        return batch

    def step(self, timeout_s: float | None = None) -> dict:
        """Collect a batch, take one optimiser step, publish every publish_every steps; returns stats."""
        cfg, method = self.cfg.learner, self.cfg.method
        waited = time.perf_counter()
        batch = self.collect_groups(timeout_s)
        started = time.perf_counter()
        rewards = torch.tensor([scored.totals for scored, _, _ in batch])  # r_i: (groups, G)
        flat = zero_variance_groups(rewards, method.zero_std_eps)
        # A_i = sqrt(G) (r_i - mean) / ||r - mean||_p, clipped; zero for flat groups
        advantages = group_advantages(rewards, method.adv_p, method.adv_clip, method.zero_std_eps)
        groups = [
            TrainGroup(
                cond=payload["cond"],
                sigmas=payload["sigmas"],
                state_indices=payload["state_indices"],
                states=payload["states"],
                token_weights=payload["token_weights"],
                background_weights=payload["background_weights"],
                advantages=advantages[i],
            )
            for i, (_, payload, _) in enumerate(batch)
            if not flat[i]
        ]
        stats = rc_grpo_step(
            self.editor, self.optimizer, groups, method, self.generator, cfg.micro_batch_rows
        )
        self.state.step += 1
        updated = time.perf_counter()
        if self.state.step % cfg.publish_every == 0:
            self.publish_weights()
        self._unfreed += [(scored.group_id, scored.policy_version) for scored, _, _ in batch]
        terms = {
            name: torch.tensor([[c[name] for c in s.scores] for s, _, _ in batch])
            for name in batch[0][0].weights
        }
        instruction = sum(terms[name] for name in self.cfg.reward.instruction_terms)  # unweighted
        signal = reward_term_diagnostics(
            terms,
            batch[0][0].weights,
            self.cfg.reward.instruction_terms,
            method.adv_p,
            method.adv_clip,
            method.zero_std_eps,
        )
        result = {
            "step": self.state.step,
            "weight_version": self.state.weight_version,
            **{name: value for name, value in asdict(stats).items() if name != "distance_scale"},
            # JSON keys are strings: the grid index j of each measured distance scale
            "distance_scale": {str(j): c for j, c in stats.distance_scale.items()},
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std(dim=1, unbiased=False).mean().item(),
            "instruction_reward_mean": instruction.mean().item(),
            "acd_mean": terms["acd"].mean().item() if "acd" in terms else math.nan,
            **signal,
            "zero_variance_ratio": flat.float().mean().item(),
            "staleness_mean": sum(s for _, _, s in batch) / len(batch),
            "wait_seconds": started - waited,  # the learner idle, waiting for scored groups
            "update_seconds": updated - started,
            "publish_seconds": time.perf_counter() - updated,
            "groups": len(batch),
        }
        self.bus.observe()
        self.bus.set_learner_stats(result)  # what a driver follows when the learner is external
        _export(result, len(groups), int(flat.sum()))
        return result

    def run_standalone(self) -> None:
        """The learner's own loop (outside Ray): publish, then step and checkpoint until total_steps."""
        self.publish_weights()
        cfg = self.cfg.learner
        while self.state.step < cfg.total_steps and not self.bus.stop_requested():
            stats = self.step()
            if stats["step"] % cfg.checkpoint_every == 0 or stats["step"] == cfg.total_steps:
                self.checkpoint(self.bus.task_cursor())
            log.info("step %(step)d reward %(reward_mean).4f loss %(loss).4f v%(weight_version)d", stats)
        self.save_final_lora(self.cfg.run_dir / "lora")


def _export(result: dict, trained: int, zero_variance: int) -> None:
    """The step's numbers as Prometheus metrics."""
    metrics.LEARNER_STEP.set(result["step"])
    metrics.LEARNER_STEP_SECONDS.observe(result["update_seconds"])
    metrics.LEARNER_LOSS.set(result["loss"])
    metrics.LEARNER_REWARD_MEAN.set(result["reward_mean"])
    metrics.LEARNER_REWARD_STD.set(result["reward_std"])
    metrics.LEARNER_ACD.set(result["acd_mean"])
    metrics.LEARNER_CLIP_FRACTION.set(result["clip_fraction"])
    for quantile in ("p50", "p90", "max"):
        metrics.LEARNER_RATIO_DEVIATION.labels(quantile).set(result[f"ratio_deviation_{quantile}"])
    metrics.LEARNER_APPROX_KL.set(result["approx_kl"])
    metrics.LEARNER_POLICY_ENTROPY.set(result["policy_entropy"])
    metrics.LEARNER_EFFECTIVE_NEIGHBOURS.set(result["effective_neighbours"])
    metrics.LEARNER_GRAD_NORM.set(result["grad_norm"])
    metrics.LEARNER_BACKGROUND_ANCHOR.set(result["background_anchor_loss"])
    for timestep, scale in result["distance_scale"].items():
        metrics.LEARNER_DISTANCE_SCALE.labels(timestep).set(scale)
    for reward, spread in result["term_spread"].items():
        metrics.LEARNER_REWARD_TERM_SPREAD.labels(reward).set(spread)
    metrics.LEARNER_INSTRUCTION_SHARE.set(result["instruction_share"])
    metrics.LEARNER_INSTRUCTION_DOMINANT.set(result["instruction_dominant"])
    metrics.LEARNER_ZERO_VARIANCE_RATIO.set(result["zero_variance_ratio"])
    metrics.LEARNER_GROUPS.labels("trained").inc(trained)
    metrics.LEARNER_GROUPS.labels("zero_variance").inc(zero_variance)
