"""What makes a run's `lora/` folder shareable: a model card (README.md with Hugging Face YAML front
matter) and provenance inside `pytorch_lora_weights.safetensors`' metadata, as diffusers' own LoRA
training scripts leave them. The weights stay loadable by a stock `FluxKontextPipeline.load_lora_weights`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import rcgrpo
from services.config import RunConfig

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
TAGS = ["lora", "diffusers", "flux-kontext", "rc-grpo", "image-editing", "reinforcement-learning"]
# what the card shows of the run: copied beside the weights so the folder is self-contained
IMAGES = {"before_after.png": "Held-out edits", "reward_curves.png": "Training curves"}
# diffusers' own key in the safetensors metadata (its LoRA config); ours sit beside it under "rcgrpo."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


def editor_name(cfg: RunConfig) -> str:
    """The base model as the card names it: model_card.base_model, else the editor's path (a path
    inside the installed package, such as the shipped tiny editor, relative to the package's parent)."""
    if cfg.model_card.base_model:
        return cfg.model_card.base_model
    editor = Path(cfg.editor).resolve()
    package_root = Path(rcgrpo.__file__).resolve().parent.parent
    return str(editor.relative_to(package_root)) if editor.is_relative_to(package_root) else str(cfg.editor)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_settings(weights: Path) -> dict:
    """Rank, alpha and target modules of the saved adapter, as diffusers recorded them in the file."""
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as file:
        metadata = file.metadata() or {}
    if DIFFUSERS_METADATA_KEY not in metadata:
        raise ValueError(f"{weights} has no {DIFFUSERS_METADATA_KEY!r}: not saved by rcgrpo.lora.save_lora")
    adapter = json.loads(metadata[DIFFUSERS_METADATA_KEY])  # peft's LoraConfig, keys "transformer.<field>"
    return {
        "rank": adapter["transformer.r"],
        "alpha": adapter["transformer.lora_alpha"],
        "target_modules": sorted(adapter["transformer.target_modules"]),
    }


def stamp_weights(weights: Path, extra: dict[str, str]) -> None:
    """Add `extra` to the safetensors metadata of `weights`, keeping its tensors and diffusers' keys."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(weights, framework="pt") as file:
        metadata = dict(file.metadata() or {})
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    partial = weights.with_suffix(".partial")
    save_file(tensors, partial, metadata={**metadata, **extra})
    partial.chmod(weights.stat().st_mode)  # save_file's file is private to its owner; keep the original's
    partial.replace(weights)  # never a half-written weights file


def _number(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


def _eval_table(evaluation: dict, cfg: RunConfig) -> str:
    metrics = list(evaluation["base"])
    lines = [
        f"Held-out {cfg.data.source} {cfg.eval.split} split, {cfg.eval.num_samples} samples, the same initial "
        "noise for both; change is the mean paired per-sample change ± its standard error.",
        "",
        "| metric | base editor | + this LoRA | change ± s.e. |",
        "|---|---|---|---|",
    ]
    for metric in metrics:
        change = evaluation.get("change", {}).get(metric, math.nan)
        error = evaluation.get("change_standard_error", {}).get(metric, math.nan)
        lines.append(
            f"| {metric} | {_number(evaluation['base'][metric])} | {_number(evaluation['trained'][metric])} | "
            f"{change:+.4f} ± {_number(error)} |"
        )
    return "\n".join(lines)


def _card_text(cfg: RunConfig, base_model: str, lora: dict, steps: int, config_sha256: str, images) -> str:
    m = cfg.method
    rewards = "\n".join(f"| {name} | {weight:g} |" for name, weight in cfg.rewards.items())
    composition = (
        "r = sum_j w_j r_j"
        if cfg.reward.composition == "weighted_sum"
        else (
            f"gated: r = E ({cfg.reward.gate_floor:g} + {cfg.reward.gate_slope:g} P) + w_acd R_ACD, E the "
            f"weighted instruction terms ({', '.join(cfg.reward.instruction_terms)}), P the others"
        )
    )
    evaluation_path = cfg.run_dir / "eval.json"
    if evaluation_path.exists():
        evaluation = _eval_table(json.loads(evaluation_path.read_text()), cfg)
    else:
        evaluation = "Not evaluated (eval.num_samples was 0)."
    shown = "\n\n".join(f"### {title}\n\n![{title}]({name})" for name, title in images)
    return f"""
# {cfg.name}: RC-GRPO LoRA for {base_model}

A LoRA (rank {lora["rank"]}, alpha {lora["alpha"]}) on the attention projections of `{base_model}`'s
transformer, post-trained with Region-Constrained GRPO by rcgrpo {rcgrpo.__version__} for {steps} optimiser
steps. Target modules: {", ".join(f"`{t}`" for t in lora["target_modules"])}.

## Use it

```python
import torch
from diffusers import FluxKontextPipeline
from diffusers.utils import load_image

pipe = FluxKontextPipeline.from_pretrained("{base_model}", torch_dtype=torch.bfloat16)
pipe.load_lora_weights("path/to/this/folder")  # or its Hub repo id
edited = pipe(image=load_image("source.png"), prompt="turn the blue circle red").images[0]
```

## Training data

`{cfg.data.source}`, split `{cfg.data.split}`, {cfg.data.num_samples} samples, data seed {cfg.data.seed}.

## Rewards

Each group of {m.group_size} edits of one source is scored with these rewards and weights ({composition}):

| reward | weight |
|---|---|
{rewards}

## Training

Group size {m.group_size}, {m.num_steps} sampling steps, region-dependent noise {"on" if m.rdp else "off"}
(s_in {m.s_in:g}, s_out {m.s_out:g}), learning rate {m.learning_rate:g}, {cfg.learner.groups_per_step} groups
per step. The whole run config is `config.yaml` beside the weights (sha256 `{config_sha256}`, also in the
weights' metadata).

## Held-out evaluation

{evaluation}

{shown}
"""


def write_model_card(cfg: RunConfig, lora_dir: Path, steps: int) -> Path:
    """README.md, config.yaml and the run's images in `lora_dir`, and provenance in its weights' metadata;
    reads the run's config.yaml, eval.json and images from cfg.run_dir. Returns the card's path."""
    from huggingface_hub import ModelCard, ModelCardData

    lora_dir = Path(lora_dir)
    weights = lora_dir / WEIGHTS_FILE
    lora = lora_settings(weights)
    base_model = editor_name(cfg)
    config_path = lora_dir / "config.yaml"
    shutil.copyfile(cfg.run_dir / "config.yaml", config_path)
    config_sha256 = file_sha256(config_path)
    images = []
    for name, title in IMAGES.items():
        if (cfg.run_dir / name).exists():
            shutil.copyfile(cfg.run_dir / name, lora_dir / name)
            images.append((name, title))
    stamp_weights(
        weights,
        {
            "rcgrpo.version": rcgrpo.__version__,
            "rcgrpo.editor": base_model,
            "rcgrpo.rank": str(lora["rank"]),
            "rcgrpo.alpha": str(lora["alpha"]),
            "rcgrpo.target_modules": json.dumps(lora["target_modules"]),
            "rcgrpo.config_sha256": config_sha256,
            "rcgrpo.steps": str(steps),
            "rcgrpo.rewards": json.dumps(cfg.rewards),
            "rcgrpo.data": cfg.data.source,
        },
    )
    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        license=cfg.model_card.license,
        license_name=cfg.model_card.license_name,
        pipeline_tag="image-to-image",
        tags=TAGS,
    )
    card = ModelCard(
        f"---\n{data.to_yaml()}\n---\n{_card_text(cfg, base_model, lora, steps, config_sha256, images)}"
    )
    path = lora_dir / "README.md"
    card.save(path)
    return path
