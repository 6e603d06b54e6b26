"""Message payload codec: JSON meta plus named image / mask / ref parts. No pickle.

Tensors travel as safetensors bytes, images (float (3,H,W) in [0,1]) as 8-bit RGB PNG, masks (float
(H,W) in [0,1]) as 8-bit grayscale PNG. A message encodes to flat `field -> bytes` pairs that fit a
Redis stream entry:

    meta          JSON of the message's meta dict
    parts         JSON {name: {"kind": "image"|"mask"}} for an inline part, or, for a part in the blob
                  store, {name: {"kind": "image"|"mask", "blob": {"key", "sha256", "size"}, "span": [offset,
                  length]}} or {name: {"kind": "ref", "blob": {...}}}
    part:<name>   the encoded bytes of each inline part

Image and mask parts larger than `inline_limit` bytes go to the blob store as one bundle (their bytes
concatenated; each part's span says where it lies): one command to write, one to read, one key to
delete, however many candidates a group has. Decoding fetches the bundle and verifies its sha256. Ref
parts are blobs the sender stored itself; decoding hands back their BlobRef.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from services.blobstore import BlobRef, BlobStore

DEFAULT_INLINE_LIMIT = 256 * 1024
# Fast zlib level: payloads cross a LAN or loopback, where CPU time costs more than bytes.
PNG_COMPRESS_LEVEL = 1
PART_KINDS = ("image", "mask", "ref")


class CodecError(ValueError):
    pass


def encode_tensors(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise CodecError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    # safetensors needs contiguous CPU tensors.
    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return safetensors_save(prepared, metadata=metadata)


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors_load(bytes(data))
    except Exception as error:
        raise CodecError(f"not a valid safetensors payload ({len(data)} bytes): {error}") from error


def _to_uint8(x: torch.Tensor, what: str) -> np.ndarray:
    if x.dtype == torch.uint8:
        return x.detach().cpu().numpy()
    if not x.is_floating_point():
        raise CodecError(f"{what} must be float in [0,1] or uint8, got dtype {x.dtype}")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise CodecError(f"{what} has NaN or inf values")
    # Clamp like diffusers' postprocessing: decoders overshoot [0,1] slightly.
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _open_png(data: bytes, mode: str, what: str) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(bytes(data)))
        image.load()
    except Exception as error:
        raise CodecError(f"{what} is not a readable PNG ({len(data)} bytes): {error}") from error
    if image.format != "PNG" or image.mode != mode:
        raise CodecError(f"{what} must be a {mode} PNG, got {image.format} mode {image.mode}")
    return np.asarray(image)


def encode_image(image: torch.Tensor) -> bytes:
    """Float (3,H,W) in [0,1] (or uint8) -> 8-bit RGB PNG."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise CodecError(f"image must have shape (3,H,W), got {tuple(image.shape)}")
    return _png_bytes(
        Image.fromarray(np.ascontiguousarray(_to_uint8(image, "image").transpose(1, 2, 0)), "RGB")
    )


def decode_image(data: bytes) -> torch.Tensor:
    """8-bit RGB PNG -> float32 (3,H,W) in [0,1]."""
    pixels = _open_png(data, "RGB", "image")
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def encode_mask(mask: torch.Tensor) -> bytes:
    """Float (H,W) in [0,1] (or uint8) -> 8-bit grayscale PNG."""
    if mask.ndim != 2:
        raise CodecError(f"mask must have shape (H,W), got {tuple(mask.shape)}")
    return _png_bytes(Image.fromarray(_to_uint8(mask, "mask"), "L"))


def decode_mask(data: bytes) -> torch.Tensor:
    """8-bit grayscale PNG -> float32 (H,W) in [0,1]."""
    return torch.from_numpy(_open_png(data, "L", "mask").copy()).float() / 255


def encode_json(value) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":")).encode()
    except (TypeError, ValueError) as error:
        raise CodecError(f"value is not JSON-serialisable: {error}") from error


def decode_json(data: bytes | str):
    try:
        return json.loads(data)
    except ValueError as error:
        raise CodecError(f"not valid JSON: {error}") from error


@dataclass
class Message:
    """JSON meta plus named parts: images and masks (PNG, inline or moved to the blob store when large)
    and refs (blobs the sender stored itself, e.g. a group's training tensors), carried as references and
    never fetched by decoding."""

    meta: dict = field(default_factory=dict)
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    refs: dict[str, BlobRef] = field(default_factory=dict)


def _encode_part(kind: str, name: str, value: torch.Tensor) -> bytes:
    if not isinstance(value, torch.Tensor):
        raise CodecError(f"{kind} part {name!r} is a {type(value).__name__}, not a torch.Tensor")
    return encode_image(value) if kind == "image" else encode_mask(value)


def encode_message(
    message: Message, blobs: BlobStore | None = None, inline_limit: int = DEFAULT_INLINE_LIMIT
) -> dict[str, bytes]:
    if not isinstance(message.meta, dict):
        raise CodecError(f"message meta must be a dict, got {type(message.meta).__name__}")
    fields = {"meta": encode_json(message.meta)}
    parts = {}

    def add(name: str, spec: dict) -> None:
        if name in parts:
            raise CodecError(f"part name {name!r} is used twice in one message")
        parts[name] = spec

    large = []  # (kind, name, data) of the parts that go to the blob store, as one bundle
    for kind, named in (("image", message.images), ("mask", message.masks)):
        for name, value in named.items():
            data = _encode_part(kind, name, value)
            if len(data) <= inline_limit:
                add(name, {"kind": kind})
                fields[f"part:{name}"] = data
            elif blobs is None:
                raise CodecError(
                    f"{kind} part {name!r} is {len(data)} bytes, over inline_limit={inline_limit}, and no blob store was given"
                )
            else:
                large.append((kind, name, data))
    if large:
        ref, offset = blobs.put(b"".join(data for _, _, data in large)).to_dict(), 0
        for kind, name, data in large:
            add(name, {"kind": kind, "blob": ref, "span": [offset, len(data)]})
            offset += len(data)
    for name, ref in message.refs.items():
        add(name, {"kind": "ref", "blob": ref.to_dict()})
    fields["parts"] = encode_json(parts)
    return fields


def stored_blobs(fields: Mapping) -> list[BlobRef]:
    """The blobs a message's image and mask parts were moved to (what to delete once it is consumed)."""
    fields = {as_str(k): v for k, v in fields.items()}
    specs = decode_json(fields["parts"]) if "parts" in fields else {}
    refs = {
        s["blob"]["key"]: BlobRef.from_dict(s["blob"])
        for s in specs.values()
        if "blob" in s and s.get("kind") != "ref"
    }
    return list(refs.values())


def as_str(value: bytes | str) -> str:
    """A stream entry's id or field name as str (redis returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def decode_message(fields: Mapping, blobs: BlobStore | None = None) -> Message:
    """Decode fields from encode_message (str or bytes keys, as redis returns them)."""
    fields = {as_str(k): v for k, v in fields.items()}
    for required in ("meta", "parts"):
        if required not in fields:
            raise CodecError(f"message has no {required!r} field (fields: {sorted(fields)})")
    message = Message(meta=decode_json(fields["meta"]))
    if not isinstance(message.meta, dict):
        raise CodecError(f"message meta must be a JSON object, got {type(message.meta).__name__}")
    targets = {"image": message.images, "mask": message.masks}
    specs = decode_json(fields["parts"])
    stored = {
        name: BlobRef.from_dict(s["blob"])
        for name, s in specs.items()
        if "blob" in s and s.get("kind") != "ref"
    }
    if stored and blobs is None:
        raise CodecError(f"parts {sorted(stored)} are in a blob store but no blob store was given")
    bundles = list({ref.key: ref for ref in stored.values()}.values())  # one fetch per distinct blob
    fetched = dict(zip([ref.key for ref in bundles], blobs.get_many(bundles), strict=True)) if bundles else {}
    for name, spec in specs.items():
        kind = spec.get("kind")
        if kind not in PART_KINDS:
            raise CodecError(f"part {name!r} has unknown kind {kind!r}; expected one of {PART_KINDS}")
        ref = BlobRef.from_dict(spec["blob"]) if "blob" in spec else None
        if kind == "ref":
            if ref is None:
                raise CodecError(f"part {name!r} is a ref without a blob")
            message.refs[name] = ref
            continue
        if ref is not None:
            data = fetched[ref.key]
            if "span" in spec:
                offset, length = spec["span"]
                if offset < 0 or length < 0 or offset + length > len(data):
                    raise CodecError(f"part {name!r} spans {spec['span']}, outside its {len(data)}-byte blob")
                data = data[offset : offset + length]
        elif f"part:{name}" in fields:
            data = fields[f"part:{name}"]
        else:
            raise CodecError(f"part {name!r} is listed but its field 'part:{name}' is missing")
        targets[kind][name] = decode_image(data) if kind == "image" else decode_mask(data)
    return message
