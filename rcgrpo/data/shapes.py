"""ShapesEdit: a synthetic local-editing dataset with exact ground truth.

Each scene is a textured background (a smooth two-colour gradient plus low-amplitude stripes and
noise, different in every scene) with 2-5 flat-coloured shapes that never overlap. One object is
edited: recoloured, removed, added or replaced by another shape/colour at the same place. The
background is rendered as its own layer, so a removal's ground truth shows exactly what lay under
the object.

The test split holds out a fixed set of (colour, shape) pairs: the train split never shows them
anywhere, the test split always uses one as the edited object's new appearance (for "remove": the
removed object), so generalisation to unseen combinations is measurable.

Every sample is drawn from its own numpy Generator seeded by (seed, split, index): the first k
samples of `generate_shapes_edit(n, ...)` do not depend on n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rcgrpo.data.sample import EditSample

# Colour names and shape names are whole-word tokens of the tiny editor's tokenizer
# (rcgrpo.tiny_editor.WORDS). RGB values are far apart so a colour is never confused with another.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "purple": (0.55, 0.15, 0.75),
    "white": (0.98, 0.98, 0.98),
    "black": (0.05, 0.05, 0.05),
    "cyan": (0.10, 0.85, 0.90),
    "pink": (1.00, 0.55, 0.75),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon")
SIZES = ("small", "large")
KINDS = ("recolour", "remove", "add", "replace")
# One held-out colour per shape, each colour used once, so every shape and colour still appears in
# training with other partners.
HELD_OUT_PAIRS = (
    ("red", "star"),
    ("green", "triangle"),
    ("blue", "cross"),
    ("yellow", "circle"),
    ("orange", "hexagon"),
    ("purple", "square"),
    ("white", "diamond"),
    ("cyan", "ring"),
)
SPLITS = ("train", "test")
MAX_LAYOUT_ATTEMPTS = 1000  # random layouts tried per sample before the config is declared too crowded


@dataclass
class ShapesEditConfig:
    size: int = 64  # H = W in pixels
    min_objects: int = 2  # objects in the fuller of source/target
    max_objects: int = 5
    small_radius: float = 0.08  # object half-extent as a fraction of size
    large_radius: float = 0.15
    object_gap: float = 0.03  # minimum free space between two objects' bounding circles, fraction of size
    mask_dilation: int = 2  # pixels of square dilation of the edit footprint
    duplicate_prob: float = (
        0.3  # chance a distractor copies the edited object's look (forces size/position words)
    )
    stripe_amplitude: tuple[float, float] = (0.02, 0.06)
    noise_std: float = 0.015
    kinds: tuple[str, ...] = KINDS
    held_out: tuple[tuple[str, str], ...] = HELD_OUT_PAIRS

    def __post_init__(self):
        problems = []
        if self.size < 16:
            problems.append(f"size must be >= 16 (got {self.size})")
        if not 1 <= self.min_objects <= self.max_objects:
            problems.append(
                f"need 1 <= min_objects <= max_objects (got {self.min_objects}, {self.max_objects})"
            )
        if not 0 < self.small_radius < self.large_radius < 0.5:
            problems.append(
                f"need 0 < small_radius < large_radius < 0.5 (got {self.small_radius}, {self.large_radius})"
            )
        for kind in self.kinds:
            if kind not in KINDS:
                problems.append(f"unknown edit kind {kind!r} (known: {', '.join(KINDS)})")
        if not self.kinds:
            problems.append("kinds must not be empty")
        for colour, shape in self.held_out:
            if colour not in PALETTE or shape not in SHAPES:
                problems.append(f"held-out pair ({colour!r}, {shape!r}) is not a palette colour and shape")
        if problems:
            raise ValueError("invalid ShapesEditConfig: " + "; ".join(problems))
        self.kinds = tuple(self.kinds)
        self.held_out = tuple(tuple(p) for p in self.held_out)


@dataclass
class _Object:
    colour: str
    shape: str
    size: str  # "small" | "large"
    x: float  # centre, pixels
    y: float
    radius: float  # half-extent, pixels

    def as_dict(self) -> dict:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "x": self.x,  # exact, so shape_footprint(shape, x, y, radius, size) redraws the object
            "y": self.y,
            "radius": self.radius,
        }


# -- rendering --------------------------------------------------------------------------------------


def shape_footprint(shape: str, x: float, y: float, radius: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at pixel (x, y) with half-extent radius."""
    coords = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    dx = coords[None, :] - x
    dy = coords[:, None] - y
    r = radius
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        arm = 0.33 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "hexagon":  # flat-topped regular hexagon with circumradius r
        s3 = np.sqrt(3.0)
        return (np.abs(dy) <= s3 / 2 * r) & (s3 * np.abs(dx) + np.abs(dy) <= s3 * r)
    if shape == "triangle":  # pointing up, apex at y - r, base at y + 0.8 r
        return (dy <= 0.8 * r) & (np.abs(dx) <= 0.95 * r * (dy + r) / (1.8 * r))
    if shape == "star":  # five points, outer radius r, inner radius 0.45 r, one point up
        # Fold every angle into the wedge [0, alpha] between an outer tip (angle 0) and the next inner
        # corner (angle alpha); inside means on the centre's side of the edge joining them.
        alpha = np.pi / 5
        angle = np.mod(np.arctan2(dx, -dy), 2 * alpha)
        angle = np.where(angle > alpha, 2 * alpha - angle, angle)
        dist = np.sqrt(dx**2 + dy**2)
        px, py = dist * np.cos(angle), dist * np.sin(angle)
        inner = 0.45 * r
        ex, ey = inner * np.cos(alpha) - r, inner * np.sin(alpha)  # edge vector from tip to corner
        return ex * py - ey * (px - r) >= 0  # cross product; positive on the centre's side
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")


def render_background(rng: np.random.Generator, size: int, config: ShapesEditConfig) -> np.ndarray:
    """(size, size, 3) float32: a muted two-colour gradient plus stripes and pixel noise."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = coords[None, :], coords[:, None]
    angle = rng.uniform(0, 2 * np.pi)
    along = np.float32(np.cos(angle)) * xx + np.float32(np.sin(angle)) * yy
    along = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    # Muted colours (0.3-0.7) keep every palette colour, white and black included, clearly visible.
    start = rng.uniform(0.3, 0.7, size=3).astype(np.float32)
    end = rng.uniform(0.3, 0.7, size=3).astype(np.float32)
    stripe_angle = rng.uniform(0, np.pi)
    frequency = rng.uniform(3, 8)  # stripes per image width
    phase = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(*config.stripe_amplitude)
    ramp = np.float32(np.cos(stripe_angle)) * xx + np.float32(np.sin(stripe_angle)) * yy
    stripes = np.float32(amplitude) * np.sin(np.float32(2 * np.pi * frequency) * ramp + np.float32(phase))
    image = start + (end - start) * along[..., None] + stripes[..., None]
    image += np.float32(config.noise_std) * rng.standard_normal(size=(size, size, 1), dtype=np.float32)
    return np.clip(image, 0.0, 1.0, out=image)


def _composite(background: np.ndarray, objects: list[_Object], size: int) -> np.ndarray:
    image = background.copy()
    for obj in objects:
        image[shape_footprint(obj.shape, obj.x, obj.y, obj.radius, size)] = PALETTE[obj.colour]
    return image


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Square (Chebyshev) dilation, done separably as shifted ORs along each axis."""
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        for shift in range(1, pixels + 1):
            for sign in (1, -1):
                rolled = np.roll(out, sign * shift, axis=axis)
                # np.roll wraps around; clear the wrapped rows/columns.
                edge = [slice(None), slice(None)]
                edge[axis] = slice(0, shift) if sign > 0 else slice(-shift, None)
                rolled[tuple(edge)] = False
                grown |= rolled
        out = grown
    return out


# -- words ------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _position_words(x: float, y: float, size: int) -> str:
    """Where a point lies on a 3x3 grid: 'top left', 'top', 'center', ..."""
    col = min(int(3 * x / size), 2)
    row = min(int(3 * y / size), 2)
    vertical = ("top", "", "bottom")[row]
    horizontal = ("left", "", "right")[col]
    return " ".join(w for w in (vertical, horizontal) if w) or "center"


def _location_phrase(rng: np.random.Generator, where: str) -> str:
    if where == "center":
        return str(rng.choice(["in the center", "in the middle", "at the center"]))
    if " " in where:  # a corner
        return str(rng.choice([f"at the {where}", f"in the {where} corner", f"in the {where}"]))
    if where in ("left", "right"):
        return str(rng.choice([f"on the {where}", f"at the {where}"]))
    return f"at the {where}"


def _reference(target: _Object, scene: list[_Object], size: int) -> str | None:
    """The shortest words that pick target out of scene, or None when no phrasing is unique.

    Colour + shape if unique; else size + colour + shape; else, for a pair of look-alikes,
    colour + shape + "on the left/right" or "at the top/bottom" along the axis that separates them.
    """
    same_look = [o for o in scene if (o.colour, o.shape) == (target.colour, target.shape)]
    if len(same_look) == 1:
        return f"{target.colour} {target.shape}"
    same_size = [o for o in same_look if o.size == target.size]
    if len(same_size) == 1:
        return f"{target.size} {target.colour} {target.shape}"
    if len(same_look) == 2:
        other = same_look[0] if same_look[1] is target else same_look[1]
        dx, dy = target.x - other.x, target.y - other.y
        if max(abs(dx), abs(dy)) < 0.1 * size:
            return None
        if abs(dx) >= abs(dy):
            side = "on the left" if dx < 0 else "on the right"
        else:
            side = "at the top" if dy < 0 else "at the bottom"
        return f"{target.colour} {target.shape} {side}"
    return None


def _size_word(rng: np.random.Generator, size: str) -> str:
    return str(rng.choice(["small", "little", "tiny"] if size == "small" else ["large", "big"]))


def _with_size_synonym(rng: np.random.Generator, reference: str) -> str:
    first, _, rest = reference.partition(" ")
    if first in SIZES:
        return f"{_size_word(rng, first)} {rest}"
    return reference


def _instruction(rng: np.random.Generator, kind: str, ref: str, new: _Object | None, where: str) -> str:
    the = f"the {_with_size_synonym(rng, ref)}" if ref else ""
    if kind == "recolour":
        c = new.colour
        templates = [
            f"turn {the} {c}",
            f"make {the} {c}",
            f"change {the} to {c}",
            f"paint {the} {c}",
            f"recolour {the} {c}",
            f"change the colour of {the} to {c}",
        ]
    elif kind == "remove":
        templates = [
            f"remove {the}",
            f"delete {the}",
            f"erase {the}",
            f"take away {the}",
            f"get rid of {the}",
        ]
    elif kind == "add":
        thing = f"{_size_word(rng, new.size)} {new.colour} {new.shape}"
        place = _location_phrase(rng, where)
        a = _article(thing)
        templates = [
            f"add {a} {thing} {place}",
            f"put {a} {thing} {place}",
            f"draw {a} {thing} {place}",
            f"place {a} {thing} {place}",
            f"insert {a} {thing} {place}",
        ]
    else:  # replace
        thing = f"{new.colour} {new.shape}"
        a = _article(thing)
        templates = [
            f"replace {the} with {a} {thing}",
            f"turn {the} into {a} {thing}",
            f"change {the} into {a} {thing}",
            f"swap {the} with {a} {thing}",
            f"put {a} {thing} in place of {the}",
        ]
    return str(rng.choice(templates))


# -- sampling ---------------------------------------------------------------------------------------


def _allowed_pairs(config: ShapesEditConfig) -> list[tuple[str, str]]:
    held = set(config.held_out)
    return [(c, s) for s in SHAPES for c in PALETTE if (c, s) not in held]


def _place(
    rng: np.random.Generator,
    radius: float,
    placed: list[_Object],
    config: ShapesEditConfig,
    cell: tuple[int, int] | None = None,
    tries: int = 30,
) -> tuple[float, float] | None:
    """A centre where a bounding circle of `radius` fits in the image (and in the 3x3 grid cell, if
    given) without touching any placed object, or None."""
    size, gap = config.size, config.object_gap * config.size
    lo, hi = radius + 1.0, size - radius - 1.0
    x_lo, x_hi, y_lo, y_hi = lo, hi, lo, hi
    if cell is not None:
        row, col = cell
        x_lo, x_hi = max(lo, col * size / 3), min(hi, (col + 1) * size / 3)
        y_lo, y_hi = max(lo, row * size / 3), min(hi, (row + 1) * size / 3)
        if x_lo >= x_hi or y_lo >= y_hi:
            return None
    for _ in range(tries):
        x, y = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
        if all((x - o.x) ** 2 + (y - o.y) ** 2 > (radius + o.radius + gap) ** 2 for o in placed):
            return float(x), float(y)
    return None


def _random_object(
    rng: np.random.Generator, look: tuple[str, str], placed: list[_Object], config: ShapesEditConfig
) -> _Object | None:
    size_name = str(rng.choice(SIZES))
    radius = (config.small_radius if size_name == "small" else config.large_radius) * config.size
    centre = _place(rng, radius, placed, config)
    if centre is None:
        return None
    return _Object(look[0], look[1], size_name, centre[0], centre[1], radius)


def _draw_edit(rng: np.random.Generator, kind: str, split: str, config: ShapesEditConfig):
    """One attempt at (source objects, target objects, old object, new object, reference, where);
    None when the random layout failed (the caller draws again from the same generator)."""
    allowed = _allowed_pairs(config)
    # The edited object's new look (for "remove": the removed object's look).
    pool = list(config.held_out) if split == "test" else allowed
    colour, shape = pool[rng.integers(len(pool))]
    if kind == "recolour":
        old_colours = [c for c in PALETTE if c != colour and (c, shape) in allowed]
        old_look = (str(rng.choice(old_colours)), shape)
    elif kind == "replace":
        olds = [(c, s) for c, s in allowed if s != shape]
        old_look = olds[rng.integers(len(olds))]
    else:
        old_look = (colour, shape)

    n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    focus = _random_object(rng, old_look, [], config)
    scene = [focus]
    for _ in range(n_objects - 1):
        look = old_look if rng.random() < config.duplicate_prob else allowed[rng.integers(len(allowed))]
        obj = _random_object(rng, look, scene, config)
        if obj is None:
            return None
        scene.append(obj)

    if kind == "add":
        # The focus object is the one to add: re-place it inside a random grid cell.
        others = scene[1:]
        row, col = int(rng.integers(3)), int(rng.integers(3))
        centre = _place(rng, focus.radius, others, config, cell=(row, col))
        if centre is None:
            return None
        new = _Object(colour, shape, focus.size, centre[0], centre[1], focus.radius)
        where = _position_words(new.x, new.y, config.size)
        return others, [*others, new], None, new, "", where

    reference = _reference(focus, scene, config.size)
    if reference is None:
        return None
    others = scene[1:]
    if kind == "remove":
        return scene, others, focus, None, reference, ""
    new = _Object(colour, shape, focus.size, focus.x, focus.y, focus.radius)
    return scene, [new, *others], focus, new, reference, ""


def _sample(index: int, split: str, seed: int, config: ShapesEditConfig) -> EditSample:
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    kind = config.kinds[index % len(config.kinds)]
    for _ in range(MAX_LAYOUT_ATTEMPTS):
        drawn = _draw_edit(rng, kind, split, config)
        if drawn is not None:
            break
    else:
        raise ValueError(
            f"could not lay out a {kind!r} scene in {MAX_LAYOUT_ATTEMPTS} attempts: too many or too large "
            f"objects for size {config.size} (max_objects={config.max_objects}, large_radius={config.large_radius})"
        )
    source_objects, target_objects, old, new, reference, where = drawn

    size = config.size
    background = render_background(rng, size, config)
    source = _composite(background, source_objects, size)
    target = _composite(background, target_objects, size)
    footprint = np.zeros((size, size), dtype=bool)
    for obj in (old, new):
        if obj is not None:
            footprint |= shape_footprint(obj.shape, obj.x, obj.y, obj.radius, size)
    mask = _dilate(footprint, config.mask_dilation)

    caption = "background" if new is None else f"{_article(new.colour)} {new.colour} {new.shape}"
    instruction = _instruction(rng, kind, reference, new, where)
    return EditSample(
        id=f"shapes-{split}-{seed}-{index:06d}",
        source=torch.from_numpy(source).permute(2, 0, 1).contiguous(),
        mask=torch.from_numpy(mask.astype(np.float32)),
        instruction=instruction,
        caption=caption,
        target=torch.from_numpy(target).permute(2, 0, 1).contiguous(),
        kind=kind,
        meta={
            "dataset": "shapes",
            "split": split,
            "seed": seed,
            "index": index,
            "edited_before": None if old is None else old.as_dict(),
            "edited_after": None if new is None else new.as_dict(),
            "source_objects": [o.as_dict() for o in source_objects],
            "target_objects": [o.as_dict() for o in target_objects],
        },
    )


def generate_shapes_edit(
    n: int, split: str = "train", seed: int = 0, config: ShapesEditConfig | None = None
) -> list[EditSample]:
    """n ShapesEdit samples of one split; kinds cycle through config.kinds so every kind is balanced."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    config = config or ShapesEditConfig()
    return [_sample(i, split, seed, config) for i in range(n)]
