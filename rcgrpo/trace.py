"""A dry run of the real rollout and update at full size on tensors that hold no memory (`rcgrpo plan --trace`).

The project's own code (`rcgrpo.sampler.rollout` with the ACD capture, `rcgrpo.train_step.rc_grpo_step`
with peft's LoRA, gradient checkpointing, AdamW and the background anchor's reference pass) runs on
PyTorch's `meta` device, which stands in for the GPU: every op computes its output's shape, dtype and
strides and no data. `DeviceTracker`, a TorchDispatchMode, watches every op:

- memory: the bytes of every live meta storage (a storage is freed when its last tensor goes), so its
  peak is the GPU's peak allocation for the traced code, before allocator rounding and fragmentation;
- placement: an op that mixes a device tensor with a CPU tensor that is not a 0-dim scalar raises
  `PlacementError` naming the line that made the call (CUDA refuses the same op, but only on the GPU);
- host syncs: `.item()` / `bool()` / `int()` on a device tensor and device -> host copies are counted per
  line; as meta has no data they return stand-ins (True, 1, 1.0, zeros), which is all a dry run needs.

Why meta and not FakeTensorMode with device="cuda": on the CPU build of torch (2.13.0+cpu) a fake CUDA
tensor takes a matmul and F.linear, but building nn.Linear(..., device="cuda") under the mode fails in
its initialisation ("PyTorch is not linked with support for cuda devices": uniform_ wants the CUDA
generator), as would every random op; meta tensors need no CUDA runtime, have kernels for every op this
path uses (peft, checkpointing, the fused attention ops, AdamW, clip_grad_norm_) and storages whose
nbytes are real.

FLOPs are counted with torch.utils.flop_counter's formulas (FlopCounterMode's) from the shapes
(matmuls, convolutions and attention; elementwise ops are not counted) and turned into the roofline
time at an H100's dense bf16 peak.
"""

from __future__ import annotations

import traceback
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from rcgrpo.config import MethodConfig
from rcgrpo.editor import EditCondition, Editor
from rcgrpo.plan import Calibration, editor_configs

H100_DENSE_BF16_FLOPS = 989e12  # H100 SXM, dense bf16 tensor-core peak: the roofline, not a prediction
DEVICE = torch.device("meta")
_REPO = Path(__file__).resolve().parent.parent
_HERE = Path(__file__).resolve()
aten = torch.ops.aten


class PlacementError(RuntimeError):
    """A CPU tensor met device tensors in one op: on a GPU this op fails (or copies every step)."""


def _caller() -> str:
    """The innermost frame of the project's code (not this module, not torch): 'path:line: code'."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path != _HERE and _REPO in path.parents and "site-packages" not in path.parts:
            return f"{path.relative_to(_REPO)}:{frame.lineno}: {(frame.line or '').strip()}"
    return "outside the project's code"


def _stand_in(dtype: torch.dtype):
    if dtype == torch.bool:
        return True  # checks read `if not ok.all(): raise`, data-free: they pass
    return 1.0 if dtype.is_floating_point else 1


class DeviceTracker(TorchDispatchMode):
    """Live meta-storage bytes and their peak, placement checks and host syncs (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[int, str | None]] = {}  # id(storage) -> (bytes, tag)
        self.current = 0
        self.peak = 0
        self.syncs: Counter[str] = Counter()  # "kind at path:line: code" -> count
        self._tag: str | None = None
        self.tagged: Counter[str] = Counter()  # bytes live per tag now
        self.tagged_at_peak: Counter[str] = Counter()
        self.tag_peaks: Counter[str] = Counter()  # the most bytes each tag held at once
        # FlopCounterMode's formulas, counted here: the mode itself tracks modules with hooks that keep
        # activations alive (a third more peak at 1 + 1 blocks) and costs more time than the meta kernels
        self.flops = 0

    def track(self, tensors) -> None:
        """Count tensors made before the tracker ran (weights) as live."""
        for t in tensors:
            self._track(t)

    def reset_peak(self) -> None:
        self.peak = self.current
        self.tagged_at_peak = Counter(self.tagged)
        self.tag_peaks = Counter(self.tagged)

    @contextmanager
    def tagged_as(self, tag: str):
        """Storages allocated inside are summed under `tag` too (the split of the peak)."""
        previous, self._tag = self._tag, tag
        try:
            yield
        finally:
            self._tag = previous

    def _free(self, key: int) -> None:
        size, tag = self._live.pop(key)
        self.current -= size
        if tag is not None:
            self.tagged[tag] -= size

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device != DEVICE:
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = (size, self._tag)
        self.current += size
        if self._tag is not None:
            self.tagged[self._tag] += size
            self.tag_peaks[self._tag] = max(self.tag_peaks[self._tag], self.tagged[self._tag])
        weakref.finalize(storage, self._free, key)
        if self.current > self.peak:
            self.peak = self.current
            self.tagged_at_peak = Counter(self.tagged)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if t.device == DEVICE]
        if on_device:
            if func is aten._local_scalar_dense.default:
                self.syncs[f"item() at {_caller()}"] += 1
                return _stand_in(args[0].dtype)
            to_host = (
                func is aten._to_copy.default and torch.device(kwargs.get("device") or DEVICE) != DEVICE
            ) or (func is aten.copy_.default and args[0].device != DEVICE)
            if to_host:
                self.syncs[f"device -> host copy at {_caller()}"] += 1
                source = args[1] if func is aten.copy_.default else args[0]
                dtype = kwargs.get("dtype") or source.dtype
                host = torch.zeros(source.shape, dtype=dtype)
                return args[0] if func is aten.copy_.default else host
            moves = func in (aten._to_copy.default, aten.copy_.default)
            on_host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if on_host and not moves:
                raise PlacementError(
                    f"{func} mixes a CPU tensor of shape {tuple(on_host[0].shape)} with device tensors at "
                    f"{_caller()}"
                )
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            self._track(t)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


@contextmanager
def fused_attention():
    """scaled_dot_product_attention on the device as the GPU runs it: a fused kernel that never holds
    the (S x S) scores (flash attention up to head_dim 256, FLUX's 128; memory-efficient attention for
    the VAE's one 512-wide head). On meta, PyTorch would pick the math path, whose scores at 8,704
    tokens are 40 GiB per attention call of a group, which the GPU never allocates. The function itself is swapped (not a
    TorchFunctionMode): checkpointing recomputes blocks in autograd's thread, where modes are not active."""
    stock = F.scaled_dot_product_attention
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    def fused(*args, **kwargs):
        options = {**dict(zip(names, args, strict=False)), **kwargs}
        query, key, value = options["query"], options["key"], options["value"]
        plain = (
            options.get("attn_mask") is None
            and not options.get("dropout_p")
            and not options.get("enable_gqa")
        )
        if query.device != DEVICE or not plain:
            return stock(*args, **kwargs)
        causal, scale = bool(options.get("is_causal")), options.get("scale")
        if query.shape[-1] <= 256:
            return aten._scaled_dot_product_flash_attention(
                query, key, value, 0.0, causal, False, scale=scale
            )[0]
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, None, query.requires_grad, 0.0, causal, scale=scale
        )[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = stock


@dataclass
class Phase:
    """One traced phase: its FLOPs (flop_counter's formulas) and the peak of live device bytes while it ran."""

    flops: int
    peak_bytes: int
    breakdown: dict[str, int]  # weights, lora_and_optimizer, captured_attention, activations (the rest)
    # the most the ACD capture held at once (its float32 keys and score chunks), at the peak or not
    captured_attention_peak_bytes: int = 0

    @property
    def roofline_s(self) -> float:
        return self.flops / H100_DENSE_BF16_FLOPS


@dataclass
class ComponentTrace:
    """What one component's traced work costs on its device; its peak is its largest phase's."""

    phases: dict[str, Phase]
    syncs: dict[str, int] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: self.phases[name].peak_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.phases[self.peak_phase].peak_bytes

    @property
    def breakdown(self) -> dict[str, int]:
        return self.phases[self.peak_phase].breakdown

    @property
    def flops(self) -> int:
        return sum(p.flops for p in self.phases.values())

    @property
    def roofline_s(self) -> float:
        return sum(p.roofline_s for p in self.phases.values())

    def to_json(self, analytic_peak_bytes: int) -> dict:
        return {
            "traced_peak_bytes": self.peak_bytes,
            "analytic_peak_bytes": analytic_peak_bytes,
            "peak_phase": self.peak_phase,
            "breakdown": self.breakdown,
            "flops": self.flops,
            "roofline_s": self.roofline_s,
            "phases": {
                name: {
                    "flops": p.flops,
                    "roofline_s": p.roofline_s,
                    "peak_bytes": p.peak_bytes,
                    "breakdown": p.breakdown,
                    "captured_attention_peak_bytes": p.captured_attention_peak_bytes,
                }
                for name, p in self.phases.items()
            },
            "host_syncs": self.syncs,
        }


class _Phases:
    """Measures consecutive phases under one tracker: the FLOPs and the peak split of each (a phase
    started again adds its FLOPs and keeps the larger peak)."""

    def __init__(self, tracker: DeviceTracker, weights: list[torch.Tensor], lora):
        self.tracker, self.weights, self.lora = tracker, weights, lora
        self.phases: dict[str, Phase] = {}
        self._current: tuple[str, int] | None = None  # the phase and the tracker's FLOPs when it started

    def start(self, name: str) -> None:
        """End the current phase, if any, and start `name`."""
        self.stop()
        self.tracker.reset_peak()
        self._current = (name, self.tracker.flops)

    def stop(self) -> None:
        if self._current is None:
            return
        name, flops_before = self._current
        self._current = None
        weights, lora = _bytes(self.weights), _bytes(self.lora())
        captured = self.tracker.tagged_at_peak["captured_attention"]
        peak = self.tracker.peak
        phase = Phase(
            flops=self.tracker.flops - flops_before,
            peak_bytes=peak,
            breakdown={
                "weights": weights,
                "lora_and_optimizer": lora,
                "captured_attention": captured,
                "activations": peak - weights - lora - captured,
            },
            captured_attention_peak_bytes=self.tracker.tag_peaks["captured_attention"],
        )
        earlier = self.phases.get(name)
        if earlier is not None:
            larger = phase if phase.peak_bytes >= earlier.peak_bytes else earlier
            phase = Phase(
                earlier.flops + phase.flops,
                larger.peak_bytes,
                larger.breakdown,
                max(earlier.captured_attention_peak_bytes, phase.captured_attention_peak_bytes),
            )
        self.phases[name] = phase


def _bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {id(t.untyped_storage()): t for t in tensors}.values())


def build_meta_editor(
    editor_dir: str | Path | None = None, transformer_overrides: dict | None = None
) -> Editor:
    """The run's pipeline on the meta device in bfloat16 from its configs (`rcgrpo.plan.editor_configs`:
    the directory's, or FLUX.1-Kontext's published ones), no weights: transformer, VAE, both text
    encoders, the scheduler; tokenizers are not needed by anything traced."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from rcgrpo.tiny_editor import SHIPPED_EDITOR_DIR

    configs, max_len, source = editor_configs(editor_dir, transformer_overrides)
    scheduler_dir = Path(source if source == str(editor_dir) else SHIPPED_EDITOR_DIR) / "scheduler"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are created in the run's GPU dtype
    try:
        with torch.device(DEVICE):
            transformer = FluxTransformer2DModel.from_config(configs["transformer"])
            vae = AutoencoderKL.from_config(configs["vae"])
            clip = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
            t5 = T5EncoderModel(T5Config(**configs["text_encoder_2"]))
    finally:
        torch.set_default_dtype(default)
    for module in (transformer, vae, clip, t5):
        module.eval().requires_grad_(False)
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler_dir),
        vae=vae,
        text_encoder=clip,
        tokenizer=None,
        text_encoder_2=t5,
        tokenizer_2=None,
        transformer=transformer,
    )
    return Editor(pipe, max_sequence_length=max_len)


def meta_condition(editor: Editor, size: int, instruction_tokens: int = 24) -> EditCondition:
    """A batch-1 condition of the real shapes on the device: T5 tokens, CLIP pooled, context latents, ids."""
    cfg = editor.transformer.config
    h, w = editor.latent_size(size, size)
    n, d, length = (h // 2) * (w // 2), 4 * editor.latent_channels, editor.max_sequence_length
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[:, :instruction_tokens] = True
    return EditCondition(
        prompt_embeds=torch.empty(1, length, cfg.joint_attention_dim, device=DEVICE, dtype=editor.dtype),
        pooled_prompt_embeds=torch.empty(1, cfg.pooled_projection_dim, device=DEVICE, dtype=editor.dtype),
        text_ids=torch.zeros(length, 3, device=DEVICE, dtype=editor.dtype),
        text_mask=mask.to(DEVICE),
        context_latents=torch.empty(1, n, d, device=DEVICE, dtype=editor.dtype),
        image_ids=torch.zeros(2 * n, 3, device=DEVICE, dtype=editor.dtype),
        guidance=torch.full((1,), 2.5, device=DEVICE) if cfg.guidance_embeds else None,
        height=size,
        width=size,
    )


def _lora_tensors(transformer, optimizer=None) -> list[torch.Tensor]:
    """The LoRA's parameters, their gradients and AdamW's moments, where they exist."""
    params = [p for p in transformer.parameters() if p.requires_grad]
    grads = [p.grad for p in params if p.grad is not None]
    states = [] if optimizer is None else [s for st in optimizer.state.values() for s in st.values()]
    return params + grads + [s for s in states if isinstance(s, torch.Tensor) and s.device == DEVICE]


def _base_weights(editor: Editor) -> list[torch.Tensor]:
    modules = (editor.transformer, editor.vae, editor.pipe.text_encoder, editor.pipe.text_encoder_2)
    return [t for m in modules for t in (*m.parameters(), *m.buffers()) if not t.requires_grad]


def trace_rollout(editor: Editor, cfg: MethodConfig, size: int, kept_states) -> ComponentTrace:
    """One group (cfg.group_size candidates, cfg.num_steps Euler steps with the ACD capture, then the
    VAE decode) on the device, as `rcgrpo.group.sample_group` runs it once the condition is encoded."""
    from rcgrpo import attention
    from rcgrpo.sampler import rollout

    tracker = DeviceTracker()
    phases = _Phases(tracker, _base_weights(editor), lambda: _lora_tensors(editor.transformer))
    h, w = editor.latent_size(size, size)
    capture_fn = attention.text_to_target_attention

    def captured(*args, **kwargs):
        with tracker.tagged_as("captured_attention"):
            return capture_fn(*args, **kwargs)

    attention.text_to_target_attention = captured  # the processors look it up per call
    try:
        with fused_attention(), tracker:
            tracker.track(phases.weights + phases.lora())
            cond = meta_condition(editor, size)
            initial = torch.empty(cfg.group_size, editor.latent_channels, h, w, device=DEVICE)
            phases.start("rollout")
            group_cond = cond.repeat(cfg.group_size)
            with attention.capture_text_attention(editor, cfg.acd_layers) as capture:
                kwargs = capture.attention_kwargs(group_cond)
                result = rollout(
                    editor, group_cond, initial, cfg.num_steps, kept_states, kwargs, decode=False
                )
                attention_map = capture.attention_map()
            # R_ACD from the map is (G, N) work; its input checks sync once a group
            phases.start("vae_decode")
            editor.decode(result.final_latents, size, size)
            phases.stop()
            del result, attention_map
    finally:
        attention.text_to_target_attention = capture_fn
    return ComponentTrace(phases.phases, dict(tracker.syncs))


def meta_train_groups(editor: Editor, cfg: MethodConfig, size: int, kept_states: list[int], count: int):
    """`count` scored groups as the learner loads them (`services.record.load_train_group`: on the device)."""
    from rcgrpo.train_step import TrainGroup

    h, w = editor.latent_size(size, size)
    n, d = (h // 2) * (w // 2), 4 * editor.latent_channels
    sigmas = editor.sigmas(cfg.num_steps, size, size)
    groups = []
    for _ in range(count):
        groups.append(
            TrainGroup(
                cond=meta_condition(editor, size),
                sigmas=sigmas.to(DEVICE),
                kept_states=kept_states,
                states=torch.empty(len(kept_states), cfg.group_size, n, d, device=DEVICE),
                token_weights=torch.empty(n, device=DEVICE),
                advantages=torch.empty(cfg.group_size, device=DEVICE),
                background_weights=torch.empty(n, device=DEVICE),
            )
        )
    return groups


def trace_update(
    editor: Editor,
    cfg: MethodConfig,
    size: int,
    kept_states: list[int],
    groups_per_step: int,
    micro_batch_rows: int | None,
    seed: int = 0,
) -> ComponentTrace:
    """One `rc_grpo_step` on the device (the caller adds the LoRA and sets checkpointing), with AdamW's
    moments already there, as on every update after the first. Phases: the background anchor's
    reference pass, then the epochs' forwards and backwards and the optimiser step.

    All `groups_per_step` groups are loaded on the device, as the learner holds them, but the step runs
    on one of them and its FLOPs are multiplied by groups_per_step: every group's B x K rows have the same
    shapes, so the micro-batches, and with them the peak, are the same, and the FLOPs scale exactly (with
    update_epochs > 1 the reference pass's distinct rows vary from group to group by draw). On meta every
    op costs its Python meta kernel, about a second per block and micro-batch at full size on this VM:
    the whole update of the flagship would take half an hour, one group's takes minutes."""
    from rcgrpo import train_step

    tracker = DeviceTracker()
    optimizer = train_step.make_optimizer(editor.transformer, cfg)
    phases = _Phases(tracker, _base_weights(editor), lambda: _lora_tensors(editor.transformer, optimizer))
    reference_fn = train_step._reference_predictions

    def reference(*args, **kwargs):
        phases.start("reference_pass")
        found = reference_fn(*args, **kwargs)
        phases.start("policy_update")
        return found

    train_step._reference_predictions = reference
    try:
        with fused_attention(), tracker:
            tracker.track(phases.weights + phases.lora())
            for p in optimizer.param_groups[0]["params"]:
                p.grad = torch.zeros_like(p)
            optimizer.step()  # creates the moments
            optimizer.zero_grad(set_to_none=True)
            groups = meta_train_groups(editor, cfg, size, kept_states, groups_per_step)
            # the other groups' x_ref (kept through the update for their rows) stay resident too
            x_refs = [
                torch.empty_like(g.states[0, : cfg.anchors * cfg.steps_per_anchor])
                for g in groups[1:]
                if cfg.background_anchor > 0
            ]
            phases.start("policy_update")
            train_step.rc_grpo_step(
                editor, optimizer, groups[:1], cfg, torch.Generator().manual_seed(seed), micro_batch_rows
            )
            phases.stop()
            del x_refs
    finally:
        train_step._reference_predictions = reference_fn
    for name, phase in phases.phases.items():
        phases.phases[name] = Phase(
            phase.flops * groups_per_step,
            phase.peak_bytes,
            phase.breakdown,
            phase.captured_attention_peak_bytes,
        )
    return ComponentTrace(phases.phases, dict(tracker.syncs))


def flops_summary(value: float) -> str:
    return f"{value / 1e15:.3g} PFLOP" if value >= 1e14 else f"{value / 1e12:.3g} TFLOP"


def traced_calibration(
    editor_dir: str | Path | None, size: int, method: MethodConfig, rows: int = 1
) -> Calibration:
    """`rcgrpo.plan`'s activation factors for an editor that is not on this machine, measured by
    tracing its own transformer at full width in bf16 with the run's LoRA: one training forward and
    backward of `rows` rows (as a micro-batch runs it) at two depths in FLUX's 1 : 2 ratio of dual- to
    single-stream blocks, without and with checkpointing. In units of dim x bf16 per token of a row:

        peak activations without checkpointing = blocks x saved_width + backward_width
        with checkpointing                     = blocks (the block inputs) + saved_width + backward_width

    so saved_width is the slope over depth and backward_width the backward's working set on top of what
    the forward keeps (the float32 copies peft and RoPE make, the gradients in flight). The shipped tiny
    editor, measured in float32, has no upcasts and a width of 96: it cannot show these."""
    from rcgrpo.lora import add_lora

    def peak_units(dual: int, single: int, checkpointing: bool) -> float:
        editor = build_meta_editor(editor_dir, {"num_layers": dual, "num_single_layers": single})
        add_lora(editor.transformer, method.lora_rank, method.lora_alpha, method.lora_targets)
        if checkpointing:
            editor.transformer.enable_gradient_checkpointing()
        params = [*editor.transformer.parameters(), *editor.transformer.buffers()]
        cond = EditCondition.cat([meta_condition(editor, size)] * rows)
        h, w = editor.latent_size(size, size)
        tracker = DeviceTracker()
        with fused_attention(), tracker:
            tracker.track(params)
            x = torch.empty(rows, (h // 2) * (w // 2), 4 * editor.latent_channels, device=DEVICE)
            sigma = torch.full((rows,), 0.5, device=DEVICE)
            tracker.reset_peak()
            base = tracker.current
            editor.velocity(x, sigma, cond).float().pow(2).mean().backward()
            lora_grads = _bytes([p.grad for p in params if p.grad is not None])
        cfg = editor.transformer.config
        unit = rows * (editor.max_sequence_length + 2 * (h // 2) * (w // 2))
        unit *= cfg.num_attention_heads * cfg.attention_head_dim * torch.bfloat16.itemsize
        return (tracker.peak - base - lora_grads) / unit

    shallow, deep = (1, 2), (2, 4)
    plain_shallow, plain_deep = peak_units(*shallow, False), peak_units(*deep, False)
    saved_width = (plain_deep - plain_shallow) / (sum(deep) - sum(shallow))
    return Calibration(
        source=f"traced at full width in bf16 on the meta device at {size}x{size} (rcgrpo.trace)",
        saved_width=saved_width,
        backward_width=plain_shallow - sum(shallow) * saved_width,
    )
