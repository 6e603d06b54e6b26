import numpy as np
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from PIL import Image

from rcgrpo.acd import acd_reward
from rcgrpo.attention import (
    TextAttentionCapture,
    TextAttentionCaptureProcessor,
    TextAttentionQuery,
    capture_text_attention,
    resolve_layers,
)
from rcgrpo.noise import latent_mask, token_weights
from rcgrpo.sampler import rollout

TEXT, TARGET, CONTEXT, BATCH = 8, 16, 16, 2


def _source(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, 64, 64, generator=g) * 255).round() / 255  # 8-bit exact for the PIL path


def _latents(editor, n, seed=0):
    h, w = editor.latent_size(64, 64)
    return torch.randn(n, editor.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))


def _block_inputs(transformer, seed=0):
    """Random block inputs for the sequence [text | target | context] with a padded text mask."""
    g = torch.Generator().manual_seed(seed)
    dim = transformer.inner_dim
    text = torch.randn(BATCH, TEXT, dim, generator=g)
    image = torch.randn(BATCH, TARGET + CONTEXT, dim, generator=g)
    ids = torch.cat([torch.zeros(TEXT, 3), torch.randint(0, 4, (TARGET + CONTEXT, 3), generator=g).float()])
    rotary = transformer.pos_embed(ids)
    text_mask = torch.zeros(BATCH, TEXT, dtype=torch.bool)
    text_mask[0, :5], text_mask[1, :3] = True, True  # per-sample padding
    return text, image, rotary, text_mask


def _reference(attn, query, key, value, text_mask):
    """Brute force: the full (S x S) softmax, its output, and the text -> target map from it."""
    scale = query.shape[-1] ** -0.5
    probs = torch.einsum("bqhd,bkhd->bhqk", query.double(), key.double()).mul(scale).softmax(dim=-1)
    output = torch.einsum("bhqk,bkhd->bqhd", probs, value.double()).flatten(2, 3).float()
    target = probs[:, :, :TEXT, TEXT : TEXT + TARGET]
    target = target / target.sum(dim=-1, keepdim=True)
    weights = text_mask.double()[:, None, :, None]
    attention_map = (target * weights).sum(dim=(1, 2)) / (weights.sum(dim=2) * attn.heads).squeeze(1)
    return output, attention_map.float()


def _heads(attn, projection, norm, states):
    return norm(projection(states).unflatten(-1, (-1, attn.head_dim)))


def _capture_processor(rows_per_chunk):
    """A recording processor on a fresh capture, built as capture_text_attention builds them."""
    capture = TextAttentionCapture(["test"], rows_per_chunk)
    return TextAttentionCaptureProcessor(capture, FluxAttnProcessor()), capture


def test_dual_stream_processor_matches_stock_and_brute_force(tiny_editor):
    transformer = tiny_editor.transformer
    attn = transformer.transformer_blocks[0].attn
    text, image, rotary, text_mask = _block_inputs(transformer)
    stock_image, stock_text = FluxAttnProcessor()(attn, image, text, None, rotary)
    processor, capture = _capture_processor(rows_per_chunk=2)  # chunks of 2 rows over 5 used rows
    query = TextAttentionQuery(text_mask=text_mask, num_target=TARGET)
    ours_image, ours_text = processor(attn, image, text, None, rotary, text_attention=query)
    assert (ours_image - stock_image).abs().max().item() <= 1e-6
    assert (ours_text - stock_text).abs().max().item() <= 1e-6

    q = torch.cat(
        [_heads(attn, attn.add_q_proj, attn.norm_added_q, text), _heads(attn, attn.to_q, attn.norm_q, image)],
        1,
    )
    k = torch.cat(
        [_heads(attn, attn.add_k_proj, attn.norm_added_k, text), _heads(attn, attn.to_k, attn.norm_k, image)],
        1,
    )
    v = torch.cat([attn.add_v_proj(text), attn.to_v(image)], 1).unflatten(-1, (-1, attn.head_dim))
    q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    output, expected = _reference(attn, q, k, v, text_mask)
    # the reference's probabilities are the block's real attention: they reproduce its output
    assert (attn.to_out[0](output[:, TEXT:]) - stock_image).abs().max().item() <= 1e-5
    recorded = capture.attention_map()
    assert recorded.shape == (BATCH, TARGET) and capture.calls == 1
    assert torch.allclose(recorded.sum(dim=1), torch.ones(BATCH), atol=1e-6)
    assert (recorded - expected).abs().max().item() <= 1e-6


def test_single_stream_processor_matches_stock_and_brute_force(tiny_editor):
    transformer = tiny_editor.transformer
    attn = transformer.single_transformer_blocks[0].attn
    text, image, rotary, text_mask = _block_inputs(transformer, seed=1)
    joint = torch.cat([text, image], dim=1)
    stock = FluxAttnProcessor()(attn, joint, None, None, rotary)
    processor, capture = _capture_processor(rows_per_chunk=4)
    query = TextAttentionQuery(text_mask=text_mask, num_target=TARGET)
    ours = processor(attn, joint, None, None, rotary, text_attention=query)
    assert (ours - stock).abs().max().item() <= 1e-6

    q = apply_rotary_emb(_heads(attn, attn.to_q, attn.norm_q, joint), rotary, sequence_dim=1)
    k = apply_rotary_emb(_heads(attn, attn.to_k, attn.norm_k, joint), rotary, sequence_dim=1)
    v = attn.to_v(joint).unflatten(-1, (-1, attn.head_dim))
    output, expected = _reference(attn, q, k, v, text_mask)
    assert (output - stock).abs().max().item() <= 1e-5
    assert (capture.attention_map() - expected).abs().max().item() <= 1e-6


def test_whole_transformer_output_is_unchanged_and_processors_restored(tiny_editor):
    cond = tiny_editor.encode_condition(_source(), ["turn the blue circle red"], 2.5).repeat(3)
    x = tiny_editor.pack(_latents(tiny_editor, 3))
    sigma = torch.tensor(0.7)
    originals = [m.processor for m in tiny_editor.transformer.modules() if hasattr(m, "processor")]
    with torch.no_grad():
        stock = tiny_editor.velocity(x, sigma, cond)
        with capture_text_attention(tiny_editor, layers="all") as cap:
            ours = tiny_editor.velocity(x, sigma, cond, attention_kwargs=cap.attention_kwargs(cond))
    assert (ours - stock).abs().max().item() <= 1e-6
    assert cap.calls == 4  # 2 dual-stream + 2 single-stream blocks, one transformer call
    assert cap.attention_map().shape == (3, 64)  # 64x64 image -> 16x16 latents -> 8x8 tokens
    restored = [m.processor for m in tiny_editor.transformer.modules() if hasattr(m, "processor")]
    assert all(a is b for a, b in zip(originals, restored, strict=True))
    assert all(type(p) is FluxAttnProcessor for p in restored)


def test_capture_keeps_gradients_flowing(tiny_editor):
    cond = tiny_editor.encode_condition(_source(), ["add a red star"], 2.5)
    x = tiny_editor.pack(_latents(tiny_editor, 1)).requires_grad_(True)
    with capture_text_attention(tiny_editor) as cap:
        tiny_editor.velocity(
            x, torch.tensor(0.5), cond, attention_kwargs=cap.attention_kwargs(cond)
        ).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not cap.attention_map().requires_grad


def test_processors_restored_after_an_exception(tiny_editor):
    originals = [b.attn.processor for b in tiny_editor.transformer.transformer_blocks]
    with pytest.raises(RuntimeError, match="boom"):
        with capture_text_attention(tiny_editor):
            assert isinstance(
                tiny_editor.transformer.transformer_blocks[0].attn.processor, TextAttentionCaptureProcessor
            )
            raise RuntimeError("boom")
    assert [b.attn.processor for b in tiny_editor.transformer.transformer_blocks] == originals


def test_capture_through_rollout_averages_layers_and_steps(tiny_editor):
    cond = tiny_editor.encode_condition(_source(2), ["remove the small green square"], 2.5)
    z = _latents(tiny_editor, 4, seed=1)
    plain = rollout(tiny_editor, cond, z, num_steps=3, decode=False)
    maps = {}
    for layers in ("double", "transformer_blocks.0", "transformer_blocks.1"):
        with capture_text_attention(tiny_editor, layers) as cap:
            result = rollout(
                tiny_editor, cond, z, num_steps=3, attention_kwargs=cap.attention_kwargs(cond), decode=False
            )
        assert torch.equal(result.final_latents, plain.final_latents)  # capture changes nothing
        assert cap.calls == 3 * len(resolve_layers(tiny_editor.transformer, layers))
        maps[layers] = cap.attention_map()
    assert maps["double"].shape == (4, 64)
    assert torch.allclose(maps["double"].sum(dim=1), torch.ones(4), atol=1e-6)
    # equal weight per layer: the double-stream map is the mean of the two per-layer maps
    mean = (maps["transformer_blocks.0"] + maps["transformer_blocks.1"]) / 2
    assert torch.allclose(maps["double"], mean, atol=1e-6)
    assert not torch.allclose(maps["transformer_blocks.0"], maps["transformer_blocks.1"], atol=1e-3)
    assert (maps["double"][0] - maps["double"][1]).abs().max() > 0  # candidates differ


def test_capture_through_the_stock_pipeline(tiny_editor):
    source, instruction, group, steps = _source(3), "replace the circle with a star", 2, 2
    cond = tiny_editor.encode_condition(source, [instruction], 2.5)
    z = _latents(tiny_editor, group, seed=4)
    pil = Image.fromarray((source[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    with capture_text_attention(tiny_editor, "transformer_blocks.0,single_transformer_blocks.1") as cap:
        tiny_editor.pipe(
            image=pil,
            prompt=[instruction] * group,
            latents=tiny_editor.pack(z),
            num_inference_steps=steps,
            guidance_scale=2.5,
            height=64,
            width=64,
            max_area=64 * 64,
            _auto_resize=False,
            max_sequence_length=32,
            output_type="pt",
            joint_attention_kwargs=cap.attention_kwargs(cond),
        )
        assert cap.calls == 2 * steps
        from_pipeline = cap.attention_map()
        cap.reset()
        rollout(
            tiny_editor, cond, z, num_steps=steps, attention_kwargs=cap.attention_kwargs(cond), decode=False
        )
        assert (cap.attention_map() - from_pipeline).abs().max().item() <= 1e-5


def test_acd_reward_values():
    mask = torch.zeros(8, 8)
    mask[2:4, 2:6] = 1
    tokens = token_weights(latent_mask(mask, (8, 8)))  # 4x4 tokens, 2 inside the mask
    assert tokens.sum().item() == 2
    inside = tokens / tokens.sum()
    uniform = torch.full((16,), 1 / 16)
    outside = (1 - tokens) / (1 - tokens).sum()
    rewards = acd_reward(torch.stack([inside, uniform, outside]), tokens)
    assert rewards.tolist() == pytest.approx([1.0, 0.5, 0.0], abs=1e-7)
    # twice the density inside as outside: rho_in / (rho_in + rho_out) = 2 / 3
    half = tokens * 2 + (1 - tokens)
    assert acd_reward((half / half.sum())[None], tokens).item() == pytest.approx(2 / 3, abs=1e-6)
    # empty and full masks: concentration is undefined, every candidate gets 0.5
    maps = torch.stack([inside, uniform])
    assert acd_reward(maps, torch.zeros(16)).tolist() == [0.5, 0.5]
    assert acd_reward(maps, torch.ones(16)).tolist() == [0.5, 0.5]


def test_acd_reward_of_a_rollout_is_in_unit_interval(tiny_editor):
    cond = tiny_editor.encode_condition(_source(), ["paint the square blue"], 2.5)
    mask = torch.zeros(64, 64)
    mask[8:40, 8:40] = 1
    with capture_text_attention(tiny_editor) as cap:
        rollout(
            tiny_editor,
            cond,
            _latents(tiny_editor, 3),
            num_steps=2,
            attention_kwargs=cap.attention_kwargs(cond),
            decode=False,
        )
    rewards = acd_reward(
        cap.attention_map(), token_weights(latent_mask(mask, tiny_editor.latent_size(64, 64)))
    )
    assert rewards.shape == (3,) and ((rewards > 0) & (rewards < 1)).all()


def test_bad_inputs_name_the_problem(tiny_editor):
    with pytest.raises(ValueError, match="unknown blocks \\['transformer_blocks.7'\\]"):
        resolve_layers(tiny_editor.transformer, "transformer_blocks.0,transformer_blocks.7")
    with pytest.raises(ValueError, match="unknown blocks"):
        resolve_layers(tiny_editor.transformer, " , ")
    with capture_text_attention(tiny_editor) as cap:
        with pytest.raises(RuntimeError, match="no text attention was recorded"):
            cap.attention_map()
        with pytest.raises(ValueError, match="nested capture"):
            with capture_text_attention(tiny_editor):
                pass
    with pytest.raises(ValueError, match="does not match the attention map's 16 target tokens"):
        acd_reward(torch.full((2, 16), 1 / 16), torch.zeros(15))
    with pytest.raises(ValueError, match=r"token_mask values must be in \[0, 1\]"):
        acd_reward(torch.full((2, 16), 1 / 16), torch.full((16,), 2.0))
    with pytest.raises(ValueError, match="no attention mass"):
        acd_reward(torch.zeros(2, 16), torch.zeros(16))
