"""The run's lora/ folder as people share LoRAs: a Hugging Face model card and provenance in the
safetensors metadata, read back with huggingface_hub's and safetensors' own readers, and the weights
still loaded by a stock FluxKontextPipeline."""

import hashlib
import json
import re

import pytest
import torch
from rich.console import Console

from deploy.evaluation import evaluate_base_vs_trained
from deploy.report import save_curves
from rcgrpo.editor import load_editor
from rcgrpo.lora import add_lora, lora_parameters, lora_state_dict, save_lora
from rcgrpo.tiny_editor import SHIPPED_EDITOR_DIR
from services.config import load_run_config
from services.model_card import editor_name, write_model_card


@pytest.fixture
def trained_run(tiny_editor_dir, tmp_path):
    """A run directory as the driver leaves it before the card: config.yaml, a LoRA with non-zero
    weights (rank 4, alpha 8), reward curves, and a real held-out evaluation of that LoRA."""
    cfg = load_run_config(
        None,
        [
            f"editor={tiny_editor_dir}",
            f"runs_dir={tmp_path}",
            "name=card",
            "method.lora_rank=4",
            "method.lora_alpha=8",
            "method.num_steps=4",
            "method.steps_per_anchor=2",
            "eval.num_samples=2",
            "eval.grid_samples=2",
            "rollout.torch_threads=2",
            "reward.composition=gated",
        ],
    )
    cfg.run_dir.mkdir()
    (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())
    editor = load_editor(tiny_editor_dir)
    add_lora(editor.transformer, rank=4, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(editor.transformer):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    save_lora(editor, cfg.run_dir / "lora")
    rows = [{"step": s, "reward_mean": 0.1 * s, "loss": 1.0 / s} for s in (1, 2, 3)]
    (cfg.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_curves(cfg.run_dir / "metrics.jsonl", cfg.run_dir / "reward_curves.png")
    evaluate_base_vs_trained(cfg, cfg.run_dir / "lora", Console(quiet=True))
    return cfg, lora_state_dict(editor.transformer)


def test_the_lora_folder_has_a_hub_model_card_and_provenance_in_its_weights(trained_run, tiny_editor_dir):
    from diffusers import FluxKontextPipeline
    from huggingface_hub import ModelCard
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    cfg, trained = trained_run
    lora_dir = cfg.run_dir / "lora"
    mode = (lora_dir / "pytorch_lora_weights.safetensors").stat().st_mode
    write_model_card(cfg, lora_dir, steps=3)
    assert (lora_dir / "pytorch_lora_weights.safetensors").stat().st_mode == mode

    card = ModelCard.load(lora_dir / "README.md")
    assert card.data.base_model == str(tiny_editor_dir)
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0"
    assert {"lora", "flux-kontext", "rc-grpo", "image-editing"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "image-to-image"
    text = card.text
    assert "`shapes`, split `train`, 512 samples, data seed 0" in text
    # every reward with its weight, lambda_ACD included, and the gated composition
    for name, weight in {
        "region_adherence": 1.0,
        "background_psnr": 0.02,
        "background_ssim": 0.2,
        "acd": 0.5,
    }.items():
        assert f"| {name} | {weight:g} |" in text
    assert "gated: r = E (0.1 + 1 P)" in text
    # the held-out table is eval.json's numbers
    evaluation = json.loads((cfg.run_dir / "eval.json").read_text())
    for metric in ("region_adherence", "background_psnr", "background_ssim"):
        base, trained_score = evaluation["base"][metric], evaluation["trained"][metric]
        change = evaluation["change"][metric]
        assert f"| {metric} | {base:.4f} | {trained_score:.4f} | {change:+.4f} ± " in text
    # the images it shows are in the folder, byte for byte the run's
    for name in ("before_after.png", "reward_curves.png"):
        assert f"]({name})" in text
        assert (lora_dir / name).read_bytes() == (cfg.run_dir / name).read_bytes()
    [snippet] = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    compile(snippet, "snippet", "exec")
    assert (
        f'FluxKontextPipeline.from_pretrained("{tiny_editor_dir}"' in snippet
        and "load_lora_weights" in snippet
    )

    with safe_open(lora_dir / "pytorch_lora_weights.safetensors", framework="pt") as file:
        metadata = file.metadata()
    config_sha256 = hashlib.sha256((cfg.run_dir / "config.yaml").read_bytes()).hexdigest()
    assert metadata["rcgrpo.config_sha256"] == config_sha256 and f"sha256 `{config_sha256}`" in text
    assert (lora_dir / "config.yaml").read_bytes() == (cfg.run_dir / "config.yaml").read_bytes()
    assert (metadata["rcgrpo.rank"], metadata["rcgrpo.alpha"]) == ("4", "8")
    assert json.loads(metadata["rcgrpo.target_modules"]) == sorted(cfg.method.lora_targets)
    assert metadata["rcgrpo.editor"] == str(tiny_editor_dir) and metadata["rcgrpo.steps"] == "3"
    assert json.loads(metadata["rcgrpo.rewards"]) == cfg.rewards
    assert "lora_adapter_metadata" in metadata and metadata["format"] == "pt"  # diffusers' keys kept

    # a stock pipeline still loads exactly the trained weights
    pipe = FluxKontextPipeline.from_pretrained(tiny_editor_dir, local_files_only=True)
    pipe.load_lora_weights(lora_dir)
    [adapter] = pipe.transformer.peft_config
    assert pipe.transformer.peft_config[adapter].r == 4
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[name], trained[name]) for name in trained)


def test_a_run_without_evaluation_says_so_and_the_hub_id_can_be_named(trained_run):
    from huggingface_hub import ModelCard

    cfg, _ = trained_run
    (cfg.run_dir / "eval.json").unlink()
    (cfg.run_dir / "before_after.png").unlink()
    cfg = cfg.model_copy(
        update={
            "model_card": cfg.model_card.model_copy(
                update={
                    "base_model": "black-forest-labs/FLUX.1-Kontext-dev",
                    "license": "other",
                    "license_name": "flux-1-dev-non-commercial-license",
                }
            )
        }
    )
    card = ModelCard.load(write_model_card(cfg, cfg.run_dir / "lora", steps=3))
    assert card.data.base_model == "black-forest-labs/FLUX.1-Kontext-dev"
    assert (card.data.license, card.data.license_name) == ("other", "flux-1-dev-non-commercial-license")
    assert "Not evaluated" in card.text and "before_after.png" not in card.text


def test_the_shipped_editor_is_named_by_its_path_in_the_package():
    cfg = load_run_config(None, [f"editor={SHIPPED_EDITOR_DIR}"])
    assert editor_name(cfg) == "rcgrpo/assets/tiny_kontext_shapes"
