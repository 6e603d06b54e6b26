import numpy as np
import pytest
import torch
from PIL import Image

from rcgrpo.config import MethodConfig
from rcgrpo.editor import load_editor
from rcgrpo.lora import add_lora, load_lora_state_dict, lora_parameters, lora_state_dict, save_lora
from rcgrpo.sampler import rollout

SIZE = 64


def _source(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, SIZE, SIZE, generator=g) * 255).round() / 255  # exact through PIL


def _latents(editor, n, seed=0):
    h, w = editor.latent_size(SIZE, SIZE)
    return torch.randn(n, editor.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))


def _perturb(transformer, seed=0, scale=0.3):
    """Stand-in for training: non-zero LoRA weights (B starts at zero, so the adapter is otherwise a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(transformer):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _velocity(editor, seed=0):
    cond = editor.encode_condition(_source(), ["add a red star"], 2.5)
    x = editor.pack(_latents(editor, 2, seed))
    with torch.no_grad():
        return editor.velocity(x, torch.tensor(0.7), cond.repeat(2))


@pytest.fixture
def editor(tiny_editor_dir):
    return load_editor(tiny_editor_dir)  # fresh: adapters mutate the transformer


def test_default_targets_cover_dual_and_single_stream_attention(editor):
    cfg = MethodConfig()
    before = _velocity(editor)
    add_lora(editor.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    adapted = {
        name.rsplit(".lora_A", 1)[0]
        for name, _ in editor.transformer.named_parameters()
        if ".lora_A." in name
    }
    dual = {f"transformer_blocks.{b}.attn.{m}" for b in range(2) for m in cfg.lora_targets}
    single = {f"single_transformer_blocks.{b}.attn.{m}" for b in range(2) for m in ("to_q", "to_k", "to_v")}
    assert adapted == dual | single
    trainable = dict((n, p) for n, p in editor.transformer.named_parameters() if p.requires_grad)
    assert all(".lora_" in n for n in trainable) and len(trainable) == 2 * len(adapted)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    a = editor.transformer.transformer_blocks[0].attn.to_q.lora_A["default"].weight
    assert a.shape == (cfg.lora_rank, editor.transformer.transformer_blocks[0].attn.to_q.in_features)
    assert editor.transformer.peft_config["default"].lora_alpha == cfg.lora_alpha
    # zero-initialised B: a fresh adapter does not change the editor
    assert torch.equal(_velocity(editor), before)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(editor.transformer)


def test_rank_alpha_and_targets_are_configurable(editor):
    add_lora(editor.transformer, rank=2, alpha=3, targets=["to_q"])
    state = lora_state_dict(editor.transformer)
    assert len(state) == 2 * 4  # to_q in 2 dual + 2 single blocks, A and B each
    assert state["single_transformer_blocks.1.attn.to_q.lora_A.weight"].shape[0] == 2
    assert editor.transformer.transformer_blocks[0].attn.to_q.scaling["default"] == pytest.approx(1.5)


def test_state_dict_moves_the_adapter_between_editors(tiny_editor_dir, editor):
    add_lora(editor.transformer)
    _perturb(editor.transformer)
    state = lora_state_dict(editor.transformer)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    other = load_editor(tiny_editor_dir)
    add_lora(other.transformer)
    assert not torch.equal(_velocity(other), _velocity(editor))
    load_lora_state_dict(other.transformer, state)
    assert torch.equal(_velocity(other), _velocity(editor))

    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(other.transformer, dict(list(state.items())[1:]))
    small = load_editor(tiny_editor_dir)
    add_lora(small.transformer, rank=4)
    with pytest.raises(ValueError, match="shapes differ"):
        load_lora_state_dict(small.transformer, state)


def _stock_edit(editor_dir, lora_dir, editor, source, instruction, initial, lora_steps=None):
    """The edits of a stock FluxKontextPipeline with the saved LoRA (on `lora_steps` only, if given)."""
    from diffusers import FluxKontextPipeline

    from rcgrpo.lora import lora_steps_callback

    pipe = FluxKontextPipeline.from_pretrained(editor_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_dir)
    pil = Image.fromarray((source[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return pipe(
        image=pil,
        prompt=[instruction] * len(initial),
        latents=editor.pack(initial),
        num_inference_steps=4,
        guidance_scale=2.5,
        height=SIZE,
        width=SIZE,
        max_area=SIZE * SIZE,
        _auto_resize=False,
        max_sequence_length=editor.max_sequence_length,
        output_type="pt",
        callback_on_step_end=None if lora_steps is None else lora_steps_callback(pipe, lora_steps),
    ).images


def test_saved_lora_loads_into_a_stock_kontext_pipeline(tiny_editor_dir, editor, tmp_path):
    add_lora(editor.transformer)
    source, instruction, initial = _source(1), "turn the blue circle red", _latents(editor, 2, seed=5)
    cond = editor.encode_condition(source, [instruction], 2.5)
    base = rollout(editor, cond, initial, num_steps=4).images
    _perturb(editor.transformer)
    ours = rollout(editor, cond, initial, num_steps=4).images
    assert (ours - base).abs().max() > 1e-2  # the adapter really changes the edit (1000x the tolerance)

    save_lora(editor, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    stock = _stock_edit(tiny_editor_dir, tmp_path / "lora", editor, source, instruction, initial)
    assert (stock - ours).abs().max().item() <= 1e-5


def test_a_stock_pipeline_samples_with_the_lora_on_the_trained_steps_only(tiny_editor_dir, editor, tmp_path):
    """method.lora_steps "trained": the few lines of lora_steps_callback give plain diffusers the rollout's edit."""
    add_lora(editor.transformer)
    source, instruction, initial = _source(1), "turn the blue circle red", _latents(editor, 2, seed=5)
    cond = editor.encode_condition(source, [instruction], 2.5)
    _perturb(editor.transformer)
    ours = rollout(editor, cond, initial, num_steps=4, lora_steps=[2, 3]).images
    everywhere = rollout(editor, cond, initial, num_steps=4).images
    assert (ours - everywhere).abs().max() > 1e-2

    save_lora(editor, tmp_path / "lora")
    stock = _stock_edit(
        tiny_editor_dir, tmp_path / "lora", editor, source, instruction, initial, lora_steps=[2, 3]
    )
    assert (stock - ours).abs().max().item() <= 1e-5


def test_loading_a_trained_lora_says_nothing_about_text_encoders_it_never_had(tiny_editor_dir, tmp_path):
    import logging

    from rcgrpo.lora import load_trained_lora

    trained = load_editor(tiny_editor_dir)
    add_lora(trained.transformer, rank=2, alpha=2)
    save_lora(trained, tmp_path)
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("diffusers.loaders.lora_base")  # where diffusers says it
    logger.addHandler(handler)
    try:
        load_editor(tiny_editor_dir).pipe.load_lora_weights(tmp_path)
        assert any(line.startswith("No LoRA keys associated to CLIPTextModel") for line in said)
        said.clear()
        editor = load_editor(tiny_editor_dir)
        load_trained_lora(editor.pipe, tmp_path)
    finally:
        logger.removeHandler(handler)
    assert said == []
    assert any("lora_A" in name for name, _ in editor.transformer.named_parameters())
