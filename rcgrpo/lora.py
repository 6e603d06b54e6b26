"""LoRA on the editor transformer's attention projections (docs/METHOD.md section 5.4), through peft.

Adapters are added with `transformer.add_adapter` and saved in the diffusers LoRA format, the way
diffusers' Flux(-Kontext) LoRA training scripts do, so a stock `FluxKontextPipeline.load_lora_weights`
reproduces the trained editor. `lora_state_dict` / `load_lora_state_dict` move the adapter weights
between processes as a plain dict of tensors (learner -> rollout workers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from rcgrpo.config import MethodConfig
from rcgrpo.editor import silenced

ADAPTER_NAME = "default"  # the name `add_adapter` gives a single adapter


def add_lora(transformer, rank: int = 8, alpha: int = 16, targets: Sequence[str] | None = None) -> None:
    """Add one trainable LoRA adapter (rank r, scale alpha / r) to `targets` of the transformer.

    targets are module-name suffixes; the default, MethodConfig.lora_targets, covers the dual-stream
    to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out and, by the same suffixes, the single-stream to_q/k/v.
    The LoRA parameters are kept in float32 even on a bfloat16 transformer (mixed-precision training).
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if getattr(transformer, "peft_config", None):
        raise ValueError(f"transformer already has LoRA adapter(s) {sorted(transformer.peft_config)}")
    if rank < 1 or alpha <= 0:
        raise ValueError(f"LoRA rank must be >= 1 and alpha > 0 (got rank={rank}, alpha={alpha})")
    targets = list(MethodConfig().lora_targets if targets is None else targets)
    # Gaussian A and zero B, as diffusers' scripts: the adapter starts as the identity edit
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    transformer.add_adapter(config)
    cast_training_params(transformer, dtype=torch.float32)


@contextmanager
def base_weights(transformer) -> Iterator[None]:
    """The transformer without its LoRA adapters inside the block (a no-op when it has none)."""
    if not getattr(transformer, "peft_config", None):
        yield
        return
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def lora_steps_callback(pipe, steps: Sequence[int]):
    """The LoRA of a stock diffusers pipeline (`load_lora_weights` done) on the grid steps `steps` only,
    as `method.lora_steps: trained` samples: switches it for step 0 now and returns the
    `callback_on_step_end` that switches it for each next step.

        pipe(..., num_inference_steps=8, callback_on_step_end=lora_steps_callback(pipe, range(4, 8)))
    """
    steps = set(steps)
    (pipe.enable_lora if 0 in steps else pipe.disable_lora)()

    def switch(pipe, i, t, callback_kwargs):
        (pipe.enable_lora if i + 1 in steps else pipe.disable_lora)()
        return callback_kwargs

    return switch


def lora_parameters(transformer) -> list[torch.nn.Parameter]:
    """The trainable (LoRA) parameters; raises if the transformer has none."""
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError("transformer has no trainable parameters: call add_lora(transformer, ...) first")
    return params


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The adapter weights as peft names them (no adapter name), as contiguous CPU tensors in their
    training dtype (float32): a published policy version is exactly what the learner trained, since a
    bf16 cast would move each weight by up to 2^-9 of itself, more than one update moves it late in a
    run (lr 1e-5), and the workers would sample with another policy than the one pi_old stands for."""
    from peft.utils import get_peft_model_state_dict

    if not getattr(transformer, "peft_config", None):
        raise ValueError("transformer has no LoRA adapter")
    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state.items()}


def load_lora_state_dict(transformer, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights from `lora_state_dict` output into a transformer with the same adapter."""
    from peft.utils import set_peft_model_state_dict

    expected = lora_state_dict(transformer)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"LoRA state dict does not match the transformer's adapter: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''} ({len(missing)}), unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''} ({len(unexpected)})"
        )
    wrong = [n for n in expected if expected[n].shape != state_dict[n].shape]
    if wrong:
        raise ValueError(
            f"LoRA tensor shapes differ (another rank?): {wrong[0]} is {tuple(state_dict[wrong[0]].shape)}, "
            f"expected {tuple(expected[wrong[0]].shape)}"
        )
    set_peft_model_state_dict(transformer, state_dict, adapter_name=ADAPTER_NAME)


def save_lora(editor, directory: str | Path) -> Path:
    """Write the adapter as `pytorch_lora_weights.safetensors` (diffusers format, with its LoRA config
    as metadata so rank and alpha survive), loadable by `FluxKontextPipeline.load_lora_weights`."""
    from diffusers import FluxKontextPipeline
    from peft.utils import get_peft_model_state_dict

    transformer = editor.transformer
    if not getattr(transformer, "peft_config", None):
        raise ValueError("editor transformer has no LoRA adapter to save")
    directory = Path(directory)
    FluxKontextPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME),
        transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER_NAME].to_dict(),
    )
    return directory


def load_trained_lora(pipe, directory: str | Path) -> None:
    """`pipe.load_lora_weights(directory)` without diffusers' notice that the LoRA holds no text-encoder
    keys: an rcgrpo LoRA adapts the transformer only, so the notice would say nothing about the run."""
    with silenced("diffusers.loaders.lora_base", "No LoRA keys associated to"):
        pipe.load_lora_weights(directory)
