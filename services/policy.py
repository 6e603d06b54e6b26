"""The editor every training-loop component holds: the run's base editor with empty LoRA slots
(rank, alpha and targets from the method config) that published LoRAs are loaded into."""

from __future__ import annotations

import torch

from rcgrpo.editor import Editor, load_editor
from rcgrpo.lora import add_lora
from services import metrics
from services.config import RunConfig


def start_component(cfg: RunConfig, torch_threads: int, metrics_port: int) -> Editor:
    """Set this process's torch threads, serve its metrics (port 0: off) and load the policy editor."""
    torch.set_num_threads(torch_threads)
    if metrics_port:
        metrics.serve_metrics(metrics_port, cfg.metrics_host)
    editor = load_editor(cfg.editor, dtype=cfg.dtype)
    method = cfg.method
    # the LoRA's initial A matrices come from the global RNG: seeded, a run's first update (and so the
    # whole run) is the same every time, and every component starts from the same weights
    torch.manual_seed(cfg.learner.seed)
    add_lora(editor.transformer, method.lora_rank, method.lora_alpha, method.lora_targets)
    return editor
