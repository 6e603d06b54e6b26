"""The rollout worker: takes editing tasks, rolls out one region-perturbed group per task with the
newest policy, and publishes it for scoring (images to the rollouts stream, the states the surrogate
needs to the payload store). Runs as a Ray actor under the driver or standalone (`rcgrpo rollout-worker`).
"""

from __future__ import annotations

import logging
import time

import torch

from rcgrpo.acd import acd_reward
from rcgrpo.attention import capture_text_attention
from rcgrpo.evaluate import load_samples
from rcgrpo.lora import load_lora_state_dict
from rcgrpo.noise import group_noise, latent_mask, token_background, token_weights
from rcgrpo.sampler import rollout, surrogate_state_indices
from services import metrics
from services.bus import RunBus
from services.config import RunConfig
from services.payloads import Task, encode_train_payload
from services.policy import start_component
from services.schemas import encode_rollout_group

log = logging.getLogger("rcgrpo.rollout_worker")


class RolloutWorker:
    def __init__(self, cfg: RunConfig, redis_url: str, worker_id: str = "worker-0", metrics_port: int = 0):
        self.editor = start_component(cfg, cfg.rollout.torch_threads, metrics_port)
        self.cfg = cfg
        self.worker_id = worker_id
        self.bus = RunBus(cfg, redis_url)
        method = cfg.method
        self.samples = load_samples(
            cfg.data.source, split=cfg.data.split, limit=cfg.data.num_samples, seed=cfg.data.seed
        )
        self.keep_states = None
        if cfg.rollout.keep_timesteps is not None:
            self.keep_states = surrogate_state_indices(method.num_steps, cfg.rollout.keep_timesteps)
        self.policy_version: int | None = None

    def sync_weights(self) -> int:
        """Load the newest published LoRA (sha256-verified) unless it is already loaded."""
        latest = self.bus.weights.latest()
        if latest is None:
            raise RuntimeError("no weight version is published yet: the learner publishes version 0 first")
        if latest.version != self.policy_version:
            load_lora_state_dict(self.editor.transformer, self.bus.weights.load(latest))
            self.policy_version = latest.version
            metrics.ROLLOUT_WEIGHT_VERSION.labels(self.worker_id).set(latest.version)
        return self.policy_version

    @torch.no_grad()
    def rollout_group(self, task: Task) -> tuple[dict, bytes, torch.Tensor]:
        """One group for `task` with the loaded policy: (rollout-group fields, training payload, ACD)."""
        cfg, editor = self.cfg.method, self.editor
        sample = self.samples[task.sample_index % len(self.samples)]
        cond = editor.encode_condition(sample.source[None], [sample.instruction], cfg.guidance_scale)
        h, w = editor.latent_size(cond.height, cond.width)
        mask_latent = latent_mask(sample.mask, (h, w), cfg.mask_dilation, cfg.mask_feather)
        generator = torch.Generator().manual_seed(task.noise_seed)
        # RDP: z_i = sqrt(1 - s^2) z* + s d_i with s = s_in inside the mask, s_out outside (global if not cfg.rdp)
        initial = group_noise(cfg, mask_latent, (editor.latent_channels, h, w), generator)
        with capture_text_attention(editor, cfg.acd_layers) as capture:
            group_cond = cond.repeat(cfg.group_size)
            result = rollout(
                editor,
                group_cond,
                initial,
                cfg.num_steps,
                self.keep_states,
                capture.attention_kwargs(group_cond),
            )
            attention = capture.attention_map()
        weights = token_weights(mask_latent)
        acd = acd_reward(attention, weights > 0.5)  # R_ACD per candidate
        fields = encode_rollout_group(
            group_id=task.task_id,
            policy_version=self.policy_version,
            instruction=sample.instruction,
            caption=sample.caption,
            source=sample.source,
            mask=sample.mask,
            edits=result.images.cpu(),
            target=sample.target,
            acd=acd,
            blobs=self.bus.blobs,
        )
        return fields, encode_train_payload(cond, result, weights, token_background(sample.mask, (h, w))), acd

    def process(self, entry) -> bool:
        """Roll out one task entry and complete it: publish + mark done + ack, atomically."""
        started = time.perf_counter()
        task = Task.from_fields(entry.fields)
        version = self.sync_weights()
        fields, payload, acd = self.rollout_group(task)
        self.bus.payloads.put(task.task_id, version, payload)
        published = self.bus.tasks.complete(
            entry.id, self.bus.task_done_key(task.task_id), self.bus.rollouts.name, fields
        )
        if published:
            metrics.ROLLOUT_GROUPS.labels(self.worker_id).inc()
            metrics.ROLLOUT_IMAGES.labels(self.worker_id).inc(self.cfg.method.group_size)
            metrics.ROLLOUT_ACD.labels(self.worker_id).set(float(acd.mean()))
            metrics.ROLLOUT_GROUP_SECONDS.labels(self.worker_id).observe(time.perf_counter() - started)
        return published

    def next_entries(self) -> list:
        """A task another worker left pending (it died) first, else a new one."""
        cfg = self.cfg.rollout
        reclaimed = self.bus.tasks.reclaim(
            self.worker_id, cfg.reclaim_idle_ms, count=1, max_deliveries=cfg.max_deliveries
        )
        return reclaimed or self.bus.tasks.read(self.worker_id, count=1, block_ms=200)

    def run(self, max_tasks: int | None = None) -> int:
        """Process tasks until the run's stop flag is set (or max_tasks); returns groups published."""
        published = 0
        while not self.bus.stop_requested() and (max_tasks is None or published < max_tasks):
            for entry in self.next_entries():
                published += self.process(entry)
        log.info("%s stopping after %d groups", self.worker_id, published)
        return published
