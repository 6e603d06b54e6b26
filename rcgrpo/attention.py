"""Text -> target-image attention capture in FluxTransformer2DModel, for the ACD reward (docs/METHOD.md section 4).

The MMDiT joint attention runs over the sequence [text | target image | context image]. For every
instruction text token (padding dropped) we take its attention probabilities over ALL keys, keep the
target-image columns and renormalise them over the target image, then average over text tokens, heads,
the chosen layers and every transformer call (rollout step) into a map A(p) over target tokens that
sums to 1.

Only the text-query rows are computed, a chunk of rows at a time, from the same post-RoPE queries and
keys the block uses; the (seq x seq) attention matrix is never formed, so this works at FLUX.1-Kontext
scale (a full matrix there is several GB per layer per sample) and with flash-style backends that never
form probabilities. The block's output still comes from diffusers' own attention dispatch, unchanged.

    with capture_text_attention(editor, layers="double") as cap:
        result = rollout(editor, cond, z, num_steps, attention_kwargs=cap.attention_kwargs(cond))
    attention_map = cap.attention_map()  # (G, N_target)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from rcgrpo.editor import EditCondition

# The keyword under which the capture's per-call information travels in joint_attention_kwargs.
ATTENTION_KWARG = "text_attention"
DUAL_STREAM, SINGLE_STREAM = "transformer_blocks", "single_transformer_blocks"
# Text-query rows per chunk: (B, heads, rows, seq) float32 scores, ~0.6 GB for G = 12 at Kontext 1024^2.
DEFAULT_ROWS_PER_CHUNK = 32


@dataclass
class TextAttentionQuery:
    """What a capturing processor needs to know about the sequence it sees."""

    text_mask: torch.Tensor  # (B or 1, L) bool, True for instruction tokens; L is also the text length
    num_target: int  # target-image tokens, right after the text; context-image tokens follow them


def text_to_target_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    text_mask: torch.Tensor,
    num_target: int,
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
) -> torch.Tensor:
    """Mean text -> target-image attention of one attention call: (B, N_target), each row summing to 1.

    `query` and `key` are the post-RoPE (B, S, H, D) tensors of the joint sequence [text (L) | target
    (num_target) | rest]. Every text row is computed, `rows_per_chunk` at a time, in float32, and padding
    rows are weighted 0 (selecting the instruction rows would be a data-dependent shape: a host sync on
    every attention call of the rollout, for rows that cost a few thousandths of the transformer's
    FLOPs); each row is a softmax over all S keys, restricted to the target columns, renormalised.
    Every sample needs an instruction token (`TextAttentionCapture.attention_kwargs` checks, once).
    """
    batch, seq, heads, head_dim = query.shape
    text_len = text_mask.shape[1]
    if text_len + num_target > seq:
        raise ValueError(
            f"sequence of {seq} tokens is shorter than {text_len} text + {num_target} target-image tokens"
        )
    row_weights = text_mask.to(query.device).expand(batch, -1).float()  # (B, L): 0 for padding
    tokens_per_sample = row_weights.sum(dim=1)
    # (B, H, D, S) float32, laid out contiguously once (one copy) for every chunk's matmul
    keys_t = key.permute(0, 2, 3, 1).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    queries = query[:, :text_len].float().transpose(1, 2)  # (B, H, L, D): the text rows
    scale = head_dim**-0.5  # scaled_dot_product_attention's default, as the stock processor uses
    total = torch.zeros(batch, num_target, device=query.device)
    for start in range(0, text_len, rows_per_chunk):
        scores = torch.matmul(queries[:, :, start : start + rows_per_chunk], keys_t) * scale  # (B, H, r, S)
        probs = scores.softmax(dim=-1)[..., text_len : text_len + num_target]
        probs = probs / probs.sum(dim=-1, keepdim=True)  # renormalise over target-image tokens
        total += torch.einsum("bhrn,br->bn", probs, row_weights[:, start : start + rows_per_chunk])
    return total / (heads * tokens_per_sample[:, None])


class TextAttentionCapture:
    """Accumulates text -> target-image attention maps over layers and transformer calls."""

    def __init__(self, layer_names: list[str], rows_per_chunk: int):
        self.layer_names = layer_names  # the recording blocks, in model order
        self.rows_per_chunk = rows_per_chunk
        self._total: torch.Tensor | None = None
        self._calls = 0

    def attention_kwargs(self, cond: EditCondition) -> dict:
        """joint_attention_kwargs for `rollout(..., attention_kwargs=...)` or `editor.pipe(...)`."""
        num_target = cond.image_ids.shape[0] - cond.context_latents.shape[1]
        # once per group (a host sync), not per attention call
        if not cond.text_mask.any(dim=1).all():
            raise ValueError(
                "text_mask has a sample with no instruction token; attention cannot be averaged over it"
            )
        return {ATTENTION_KWARG: TextAttentionQuery(text_mask=cond.text_mask.bool(), num_target=num_target)}

    def record(self, attention_map: torch.Tensor) -> None:
        if self._total is not None and self._total.shape != attention_map.shape:
            raise ValueError(
                f"attention map of shape {tuple(attention_map.shape)} does not match the "
                f"{tuple(self._total.shape)} recorded so far; call reset() between groups"
            )
        self._total = attention_map if self._total is None else self._total + attention_map
        self._calls += 1

    @property
    def calls(self) -> int:
        """Attention calls recorded (captured layers x transformer calls)."""
        return self._calls

    def attention_map(self) -> torch.Tensor:
        """A(p): (G, N_target) float32, the mean over instruction tokens, heads, layers and steps."""
        if self._total is None:
            raise RuntimeError(
                "no text attention was recorded: pass cap.attention_kwargs(cond) as "
                "rollout(..., attention_kwargs=...) inside the capture_text_attention context"
            )
        return self._total / self._calls

    def reset(self) -> None:
        self._total, self._calls = None, 0


class TextAttentionCaptureProcessor(FluxAttnProcessor):
    """FluxAttnProcessor that also records text -> target attention when given a TextAttentionQuery.

    The output path repeats diffusers' FluxAttnProcessor.__call__ step for step (same projections,
    norms, RoPE and attention dispatch with the original processor's backend), so outputs are identical
    to the stock processor; tests/test_attention.py checks that. Without a capture (a block outside
    the layer set) or without the query keyword it simply is the stock processor; blocks outside the
    layer set get one too so that the extra keyword does not make diffusers warn on every call.
    """

    def __init__(self, capture: TextAttentionCapture | None, original: FluxAttnProcessor):
        super().__init__()
        self.capture = capture
        self._attention_backend = original._attention_backend
        self._parallel_config = original._parallel_config

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        text_attention: TextAttentionQuery | None = None,
    ) -> torch.Tensor:
        if self.capture is None or text_attention is None:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        if attention_mask is not None or self._parallel_config is not None:
            raise ValueError(
                "text attention capture supports neither attention masks nor context parallelism "
                "(FluxKontextPipeline uses neither)"
            )
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        text_len = text_attention.text_mask.shape[1]
        if attn.added_kv_proj_dim is not None:  # dual-stream: the text stream is a separate input
            if encoder_hidden_states.shape[1] != text_len:
                raise ValueError(
                    f"text_mask covers {text_len} tokens but the block sees {encoder_hidden_states.shape[1]} text tokens"
                )
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        with torch.no_grad():
            self.capture.record(
                text_to_target_attention(
                    query.detach(),
                    key.detach(),
                    text_attention.text_mask,
                    text_attention.num_target,
                    self.capture.rows_per_chunk,
                )
            )

        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=None, backend=self._attention_backend, parallel_config=None
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:  # single-stream: the block splits text and image itself
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def attention_blocks(transformer) -> dict[str, torch.nn.Module]:
    """Every attention-bearing block by name: transformer_blocks.N then single_transformer_blocks.N."""
    blocks = {f"{DUAL_STREAM}.{i}": block for i, block in enumerate(transformer.transformer_blocks)}
    blocks.update(
        {f"{SINGLE_STREAM}.{i}": block for i, block in enumerate(transformer.single_transformer_blocks)}
    )
    return blocks


def resolve_layers(transformer, layers: str) -> list[str]:
    """The block names a layer-set spec selects: "double", "all", or comma-separated block names."""
    names = list(attention_blocks(transformer))
    if layers == "double":
        return [name for name in names if name.startswith(DUAL_STREAM + ".")]
    if layers == "all":
        return names
    selected = [name.strip() for name in layers.split(",") if name.strip()]
    unknown = [name for name in selected if name not in names]
    if not selected or unknown:
        raise ValueError(
            f"attention layer set {layers!r} names unknown blocks {unknown}; use 'double', 'all', or "
            f"comma-separated names from {names[0]}..{names[-1]} (e.g. '{DUAL_STREAM}.0,{SINGLE_STREAM}.1')"
        )
    return list(dict.fromkeys(selected))


@contextmanager
def capture_text_attention(editor, layers: str = "double", rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK):
    """Swap in capturing processors on `layers` for the duration of the context; yields the capture.

    Every block gets a TextAttentionCaptureProcessor (recording only on the selected ones); the
    original processors are put back on exit, also when the body raises.
    """
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    blocks = attention_blocks(editor.transformer)
    selected = set(resolve_layers(editor.transformer, layers))
    originals = {name: block.attn.processor for name, block in blocks.items()}
    foreign = {name: type(p).__name__ for name, p in originals.items() if type(p) is not FluxAttnProcessor}
    if foreign:
        raise ValueError(
            f"attention capture needs the stock FluxAttnProcessor on every block, found {foreign} "
            "(nested capture contexts or IP-adapter processors are not supported)"
        )
    capture = TextAttentionCapture(sorted(selected, key=list(blocks).index), rows_per_chunk)
    try:
        for name, block in blocks.items():
            block.attn.set_processor(
                TextAttentionCaptureProcessor(capture if name in selected else None, originals[name])
            )
        yield capture
    finally:
        for name, block in blocks.items():
            block.attn.set_processor(originals[name])
