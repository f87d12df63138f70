"""The toy world's data (docs/design.md 9): identities, sprites, clips with visible masks,
references, prompts.

An identity is a shape x two-colour palette x texture (x texture orientation). A clip shows 1-3
identities moving with constant velocity over a light, low-saturation background, drawn in depth
order; its masks are the pixels where each identity is VISIBLE. References are augmented renders
on white (scale, rotation, colour jitter, translation), never a crop of the clip. Prompts describe
layout and motion with ordinals ("the first", "the second") in manifest order and never name a
colour or a shape, so identity can only come from the references.

Everything is a pure function of its arguments and an explicit `numpy.random.Generator`;
`write_dataset` derives one PCG64 stream per sample from (seed, pool, index), so sample i does not
depend on how many samples are written.

Pool split: whole (shape, primary, secondary) groups are held out, stratified by shape (20% of the
ordered colour pairs of every shape by default). A held-out identity therefore differs from every
training identity in its shape or one of its colours, never only in texture or orientation, while
every shape, colour and texture value is still seen in training: held-out identities test
compositional generalisation from references, not attributes never seen.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from itertools import permutations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import distance_transform_edt

from idcrafter.utils.io import atomic_write

__all__ = [
    "CATEGORY",
    "CATEGORY_STYLES",
    "FPS",
    "IDENTITY_WORDS",
    "MAX_SUBJECTS",
    "MOTIONS",
    "PALETTE",
    "POOLS",
    "SHAPES",
    "TEXTURES",
    "TEXTURE_ORIENTATIONS",
    "CategoryStyle",
    "Clip",
    "Identity",
    "Motion",
    "ToySample",
    "check_num_frames",
    "describe_clip",
    "describe_motion",
    "identity_space",
    "make_background",
    "make_clip",
    "make_reference",
    "make_sample",
    "prompt_words",
    "render_identity",
    "sample_motion",
    "sample_rng",
    "split_pools",
    "write_dataset",
    "write_image_dataset",
]

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon", "ring")
# Saturated (black: dark) and far apart in hue or lightness, so a colour survives H.264, jitter and
# a 16 px sprite; the backgrounds are light and nearly grey, so every colour stands out on them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 135, 0),
    "yellow": (235, 205, 0),
    "green": (20, 155, 45),
    "cyan": (0, 190, 220),
    "blue": (30, 55, 215),
    "purple": (125, 40, 195),
    "magenta": (230, 30, 165),
    "brown": (120, 65, 20),
    "black": (25, 25, 25),
}
TEXTURES = ("solid", "stripes", "dots", "checker", "half", "border")
# Only orientations that give a distinct picture: a checker turned 90 degrees is the same checker,
# and solid / dots / border have no direction.
TEXTURE_ORIENTATIONS: dict[str, tuple[int, ...]] = {
    "solid": (0,),
    "stripes": (0, 45, 90, 135),
    "dots": (0,),
    "checker": (0, 45),
    "half": (0, 45, 90, 135),
    "border": (0,),
}
MOTIONS = (
    "left_to_right", "right_to_left", "up", "down",
    "down_right", "down_left", "up_right", "up_left", "still",
)
_DIAGONALS = ("down_right", "down_left", "up_right", "up_left")
POOLS = ("train", "held_out")
CATEGORY = "toy"
FPS = 8
MAX_SUBJECTS = 3

# Words a prompt must never contain: they would leak identity into the text (tests check this).
IDENTITY_WORDS = frozenset(
    {*SHAPES, *PALETTE, *TEXTURES}
    | {"white", "grey", "gray", "pink", "violet", "colour", "color", "coloured", "colored", "striped",
       "dotted", "checkered", "round", "circular", "triangular", "square", "rectangle", "hexagonal"}
)

@dataclass(frozen=True)
class CategoryStyle:
    """What a category looks like in the toy image world: the shapes its identities have, its
    sprite side as a fraction of the frame, and the band of the frame (top to bottom, fractions)
    its centre sits in. One-for-All binds each category to a position block (Sec. 3.2); that only
    teaches something when a category's subjects share an appearance, as faces, garments and bags do."""

    shapes: tuple[str, ...]
    size: tuple[float, float]
    band: tuple[float, float]


# Faces round and high, upper garments broad in the middle, lower garments pointed and low, bags small.
CATEGORY_STYLES: dict[str, CategoryStyle] = {
    "face": CategoryStyle(("circle", "ring", "hexagon"), (0.35, 0.42), (0.2, 0.35)),
    "upper": CategoryStyle(("square", "cross"), (0.42, 0.5), (0.45, 0.6)),
    "lower": CategoryStyle(("triangle", "diamond"), (0.35, 0.42), (0.7, 0.82)),
    "bag": CategoryStyle(("star",), (0.2, 0.26), (0.3, 0.8)),
}

_SUPERSAMPLE = 4  # sprites are drawn at 4x and box-filtered down: smooth edges at 16-24 px
_SPRITE_FRACTION = (0.35, 0.45)  # sprite side / frame side
_MAX_TILT = 20.0  # degrees; 45-degree orientation siblings stay apart (they would meet at 22.5)
_MIN_VISIBLE = 0.5  # sampled layouts keep >= half of every identity visible in every frame
_LAYOUT_TRIES = 20


# ----------------------------------------------------------------------------------------------
# Identities and pools


@dataclass(frozen=True, order=True)
class Identity:
    """One identity: shape, two palette colours (names in `PALETTE`), texture, texture orientation.

    The texture uses both colours everywhere (solid: a thin secondary outline; border: a wide one),
    so two different identities never render alike. `orientation` (degrees, anticlockwise) turns
    the texture pattern (stripe direction, the split of `half`, the checker grid); the shape itself
    stays upright.
    """

    shape: str
    primary: str
    secondary: str
    texture: str
    orientation: int = 0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {', '.join(SHAPES)}")
        for name in (self.primary, self.secondary):
            if name not in PALETTE:
                raise ValueError(f"unknown colour {name!r}; expected one of {', '.join(PALETTE)}")
        if self.primary == self.secondary:
            raise ValueError(f"primary and secondary colours must differ, both are {self.primary!r}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; expected one of {', '.join(TEXTURES)}")
        if self.orientation not in TEXTURE_ORIENTATIONS[self.texture]:
            raise ValueError(
                f"orientation {self.orientation} is not allowed for texture {self.texture!r} "
                f"(allowed: {TEXTURE_ORIENTATIONS[self.texture]})"
            )

    @property
    def key(self) -> str:
        """Stable text id, e.g. "star-red-blue-stripes-45"; `Identity.from_key` inverts it."""
        return f"{self.shape}-{self.primary}-{self.secondary}-{self.texture}-{self.orientation}"

    @classmethod
    def from_key(cls, key: str) -> Identity:
        parts = key.split("-")
        if len(parts) != 5 or not parts[4].isdigit():
            raise ValueError(f"{key!r} is not an identity key (shape-primary-secondary-texture-orientation)")
        return cls(parts[0], parts[1], parts[2], parts[3], int(parts[4]))

    @property
    def colours(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(primary RGB, secondary RGB)."""
        return PALETTE[self.primary], PALETTE[self.secondary]

    @property
    def group(self) -> tuple[str, str, str]:
        """(shape, primary, secondary): the unit the pool split holds out."""
        return self.shape, self.primary, self.secondary


@functools.cache
def identity_space() -> tuple[Identity, ...]:
    """Every identity, in a fixed order: 8 shapes x 90 ordered colour pairs x 13 textures = 9360."""
    return tuple(
        Identity(shape, primary, secondary, texture, orientation)
        for shape in SHAPES
        for primary, secondary in permutations(PALETTE, 2)
        for texture in TEXTURES
        for orientation in TEXTURE_ORIENTATIONS[texture]
    )


@functools.cache
def split_pools(seed: int = 0, held_out_fraction: float = 0.2) -> tuple[tuple[Identity, ...], tuple[Identity, ...]]:
    """-> (train, held_out): disjoint, together `identity_space()`, each in its order.

    For every shape, round(held_out_fraction * 90) of its ordered colour pairs are held out with
    all their textures (see the module docstring for why whole groups).
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    rng = np.random.Generator(np.random.PCG64(seed))
    pairs = list(permutations(PALETTE, 2))
    count = min(len(pairs) - 1, max(1, round(held_out_fraction * len(pairs))))
    held: set[tuple[str, str, str]] = set()
    for shape in SHAPES:  # stratified: every shape keeps most of its palettes in training
        for index in rng.permutation(len(pairs))[:count]:
            held.add((shape, *pairs[index]))
    space = identity_space()
    return (
        tuple(i for i in space if i.group not in held),
        tuple(i for i in space if i.group in held),
    )


# ----------------------------------------------------------------------------------------------
# Sprites


def _regular_polygon(count: int, radius: float, start_deg: float) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(count) / count)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


@functools.cache
def _shape_polygons(shape: str) -> tuple[tuple[np.ndarray, bool], ...]:
    """Shape outline in unit space (x right, y up, radius <= 0.92 so any rotation fits the box).

    -> ((vertices [V, 2], filled), ...): drawn in order, `filled` False cuts a hole (the ring's).
    """
    if shape == "circle":
        return ((_regular_polygon(96, 0.85, 0.0), True),)
    if shape == "square":
        return ((np.array([[-0.65, -0.65], [0.65, -0.65], [0.65, 0.65], [-0.65, 0.65]]), True),)
    if shape == "triangle":  # centroid at the origin, apex up
        return ((_regular_polygon(3, 0.92, 90.0) - [0.0, 0.1], True),)
    if shape == "diamond":  # taller than wide, so it is not a square turned by 45 degrees
        return ((np.array([[0.0, -0.92], [0.6, 0.0], [0.0, 0.92], [-0.6, 0.0]]), True),)
    if shape == "cross":
        a, b = 0.28, 0.85
        return ((np.array([[a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a],
                           [-a, -b], [a, -b], [a, -a], [b, -a], [b, a]]), True),)
    if shape == "star":
        outer = _regular_polygon(5, 0.92, 90.0)
        inner = _regular_polygon(5, 0.4, 90.0 + 36.0)
        return ((np.stack([outer, inner], axis=1).reshape(10, 2) - [0.0, 0.05], True),)
    if shape == "hexagon":
        return ((_regular_polygon(6, 0.88, 0.0), True),)
    if shape == "ring":
        return ((_regular_polygon(96, 0.88, 0.0), True), (_regular_polygon(96, 0.46, 0.0), False))
    raise ValueError(f"unknown shape {shape!r}")


def _rotation(deg: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    return np.array([[c, -s], [s, c]])


def _shape_mask(shape: str, n: int, angle: float, scale: float) -> np.ndarray:
    """bool [n, n]: the shape turned by `angle` degrees and scaled, rasterised without anti-aliasing."""
    image = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(image)
    for vertices, filled in _shape_polygons(shape):
        xy = vertices @ _rotation(angle).T * scale
        # unit space -> pixel centres (PIL puts integer coordinates on pixel centres)
        px = (xy[:, 0] + 1.0) * n / 2.0 - 0.5
        py = (1.0 - xy[:, 1]) * n / 2.0 - 0.5
        draw.polygon(list(zip(px.tolist(), py.tolist())), fill=255 if filled else 0)
    return np.asarray(image) > 127


def _secondary_region(identity: Identity, u: np.ndarray, v: np.ndarray, edge: np.ndarray | None) -> np.ndarray:
    """bool [n, n]: where the texture shows the secondary colour.

    u, v: [n, n] coordinates in the sprite's own frame (unit space, so the pattern turns with the
    sprite); edge: [n, n] distance to the shape's edge in the same units (solid and border only).
    """
    theta = np.deg2rad(identity.orientation)
    # coordinate across the pattern direction; the central band / cell is always primary, so
    # swapping the two colours gives a different picture, not a shifted copy
    across = -u * np.sin(theta) + v * np.cos(theta)
    along = u * np.cos(theta) + v * np.sin(theta)
    texture = identity.texture
    if texture == "stripes":
        return np.floor(across / 0.33 + 0.5).astype(np.int64) % 2 == 1
    if texture == "checker":
        cells = np.floor(along / 0.5 + 0.5) + np.floor(across / 0.5 + 0.5)
        return cells.astype(np.int64) % 2 == 1
    if texture == "dots":
        period = 0.6
        du = u - period * np.round(u / period)
        dv = v - period * np.round(v / period)
        return du**2 + dv**2 < 0.17**2
    if texture == "half":
        return across < 0.0
    # widths relative to the thickest part, so thin shapes (ring, star) keep a primary core
    thickest = float(edge.max()) if edge.size else 0.0
    if texture == "border":
        return edge < min(0.3, 0.6 * thickest)
    if texture == "solid":
        return edge < min(0.14, 0.25 * thickest)
    raise ValueError(f"unknown texture {texture!r}")


def _downsample_rgba(rgb: np.ndarray, alpha: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter by `factor` with premultiplied alpha. rgb: float [n, n, 3]; alpha: float [n, n] -> uint8 [n/f, n/f, 4].

    Premultiplying keeps the transparent (black) surround from darkening the anti-aliased rim.
    """
    n = alpha.shape[0] // factor
    a = alpha.reshape(n, factor, n, factor).mean(axis=(1, 3))
    premultiplied = (rgb * alpha[..., None]).reshape(n, factor, n, factor, 3).mean(axis=(1, 3))
    colour = premultiplied / np.maximum(a, 1e-6)[..., None]
    out = np.concatenate([np.where(a[..., None] > 0, colour, 0.0), 255.0 * a[..., None]], axis=-1)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def render_identity(identity: Identity, size: int, angle: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """An anti-aliased sprite of `identity` -> uint8 [size, size, 4] (RGBA, alpha marks the shape).

    angle: degrees anticlockwise; scale in (0, 1]: the shape's size inside the square box (at 1
    it spans ~90% of the box, and any angle still fits).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    n = size * _SUPERSAMPLE
    mask = _shape_mask(identity.shape, n, angle, scale)
    centres = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    x, y = np.meshgrid(centres, -centres)  # y up: row 0 is the top
    # the sprite's own frame: undo the rotation and the scale
    back = _rotation(-angle)
    u = (back[0, 0] * x + back[0, 1] * y) / scale
    v = (back[1, 0] * x + back[1, 1] * y) / scale
    # only the outline textures need the distance to the edge (the costliest step)
    edge = distance_transform_edt(mask) * (2.0 / n) / scale if identity.texture in ("solid", "border") else None
    primary, secondary = (np.array(c, np.float64) for c in identity.colours)
    second = _secondary_region(identity, u, v, edge)
    rgb = np.where(second[..., None], secondary, primary)
    return _downsample_rgba(rgb, mask.astype(np.float64), _SUPERSAMPLE)


def _paste(canvas: np.ndarray, sprite: np.ndarray, x: int, y: int) -> np.ndarray:
    """Alpha-composite `sprite` (uint8 [s, s, 4]) onto `canvas` (float [H, W, 3]) with its top-left
    corner at (x, y), clipping at the borders -> float [H, W, 3]."""
    layer, alpha = _layer(sprite, x, y, canvas.shape[0], canvas.shape[1])
    return canvas * (1.0 - alpha[..., None]) + layer * alpha[..., None]


def _layer(sprite: np.ndarray, x: int, y: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A sprite placed on an empty frame -> (rgb float [H, W, 3], alpha float [H, W] in [0, 1])."""
    rgb = np.zeros((height, width, 3), np.float32)
    alpha = np.zeros((height, width), np.float32)
    s = sprite.shape[0]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + s, width), min(y + s, height)
    if x0 < x1 and y0 < y1:
        crop = sprite[y0 - y : y1 - y, x0 - x : x1 - x].astype(np.float32)
        rgb[y0:y1, x0:x1] = crop[..., :3]
        alpha[y0:y1, x0:x1] = crop[..., 3] / 255.0
    return rgb, alpha


# ----------------------------------------------------------------------------------------------
# References and backgrounds


def make_reference(identity: Identity, size: int, rng: np.random.Generator) -> np.ndarray:
    """An augmented reference on white -> uint8 [size, size, 3].

    Scale 0.7-1.0, rotation +-20 degrees, a colour offset of +-8 per channel on the object, and a
    translation that keeps it inside the image: never the pixels a clip shows.
    """
    if size < 8:
        raise ValueError(f"reference size must be >= 8, got {size}")
    scale = float(rng.uniform(0.7, 1.0))
    angle = float(rng.uniform(-_MAX_TILT, _MAX_TILT))
    jitter = rng.integers(-8, 9, size=3)
    room = max(0.0, (1.0 - 0.92 * scale) * size / 2.0)  # free margin around the shape, px
    dx, dy = (int(round(d)) for d in rng.uniform(-room, room, size=2))
    sprite = render_identity(identity, size, angle, scale)
    sprite[..., :3] = np.clip(sprite[..., :3].astype(np.int64) + jitter, 0, 255).astype(np.uint8)
    white = np.full((size, size, 3), 255.0, np.float32)
    return np.clip(np.round(_paste(white, sprite, dx, dy)), 0, 255).astype(np.uint8)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def make_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A light, low-saturation background -> uint8 [size, size, 3]: plain, a gentle gradient, or
    soft low-frequency noise (amplitude <= ~10 levels), so identities stand out on every kind."""
    base = 255.0 * _hsv_to_rgb(float(rng.uniform()), float(rng.uniform(0.0, 0.12)), float(rng.uniform(0.86, 0.96)))
    kind = int(rng.integers(3))
    if kind == 0:
        shade = np.zeros((size, size), np.float32)
    elif kind == 1:
        direction = float(rng.uniform(0.0, 2.0 * np.pi))
        t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        shade = 20.0 * (np.cos(direction) * t[None, :] + np.sin(direction) * t[:, None])
    else:
        coarse = rng.uniform(-8.0, 8.0, size=(4, 4)).astype(np.float32)
        shade = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    image = base[None, None, :] + shade[..., None]
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Motions, clips, prompts


@dataclass(frozen=True)
class Motion:
    """Constant-velocity motion of one sprite box over a clip.

    start / end: (x, y) top-left corner of the sprite box in the first / last frame, px;
    sprite_size: side of the box, px; angle_start / angle_end: degrees anticlockwise, interpolated
    linearly; depth: drawing order, higher is nearer the camera.
    """

    kind: str
    start: tuple[float, float]
    end: tuple[float, float]
    sprite_size: int
    angle_start: float = 0.0
    angle_end: float = 0.0
    depth: int = 0

    def __post_init__(self):
        if self.kind not in MOTIONS:
            raise ValueError(f"unknown motion {self.kind!r}; expected one of {', '.join(MOTIONS)}")
        if self.sprite_size < 1:
            raise ValueError(f"sprite_size must be >= 1, got {self.sprite_size}")

    def at(self, frame: int, num_frames: int) -> tuple[int, int, float]:
        """(x, y, angle) of frame `frame` of `num_frames`; positions rounded to whole pixels."""
        t = frame / (num_frames - 1) if num_frames > 1 else 0.0
        x = self.start[0] + t * (self.end[0] - self.start[0])
        y = self.start[1] + t * (self.end[1] - self.start[1])
        return int(round(x)), int(round(y)), self.angle_start + t * (self.angle_end - self.angle_start)

    @property
    def turns(self) -> bool:
        return abs(self.angle_end - self.angle_start) >= 5.0

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True, eq=False)
class Clip:
    """A generated clip. frames: uint8 [F, H, W, 3]; masks: bool [N, F, H, W], the pixels where
    identity k is visible (occluders removed); boxes: int32 [N, F, 4], (x0, y0, x1, y1) with
    exclusive ends, of the whole identity ignoring occlusion; motions: one per identity, in order;
    prompt: layout and motion only."""

    frames: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    motions: tuple[Motion, ...]
    prompt: str


def check_num_frames(num_frames: int) -> None:
    """Wan's VAE compresses time by 4 after the first frame: clips have 4n+1 frames."""
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1 or num_frames % 4 != 1:
        raise ValueError(f"num_frames {num_frames} must be 4n+1 (e.g. 1, 9, 17, 81) for the Wan VAE")


def sample_motion(size: int, rng: np.random.Generator, kind: str | None = None, depth: int = 0,
                  style: CategoryStyle | None = None) -> Motion:
    """A random constant-velocity motion of a sprite of 35-45% of the frame side, kept inside the
    frame; moving sprites cross at least half of the free range. kind None: uniform over
    left-to-right, right-to-left, up, down, diagonal (one of four), still. `style` (a still
    category's): its sprite size, and its centre inside the style's vertical band."""
    if kind is None:
        kind = str(rng.choice(["left_to_right", "right_to_left", "up", "down", "diagonal", "still"]))
        if kind == "diagonal":
            kind = str(rng.choice(_DIAGONALS))
    if style is not None and kind != "still":
        raise ValueError("category styles place still sprites only (the toy image world)")
    side = max(4, int(round(rng.uniform(*(style.size if style else _SPRITE_FRACTION)) * size)))
    free = float(size - side)
    if style is not None:
        x = float(rng.uniform(0.0, free))
        y = float(np.clip(rng.uniform(*style.band) * size - side / 2.0, 0.0, free))
        angle = float(rng.uniform(-_MAX_TILT / 2, _MAX_TILT / 2))
        return Motion(kind, (x, y), (x, y), side, angle, angle, depth)

    def travel(sign: int) -> tuple[float, float]:
        a, b = rng.uniform(0.0, 0.25 * free), rng.uniform(0.75 * free, free)
        return (float(a), float(b)) if sign > 0 else (float(b), float(a))

    dx = {"left_to_right": 1, "right_to_left": -1, "down_right": 1, "up_right": 1,
          "down_left": -1, "up_left": -1}.get(kind, 0)
    dy = {"down": 1, "up": -1, "down_right": 1, "down_left": 1, "up_right": -1, "up_left": -1}.get(kind, 0)
    x0, x1 = travel(dx) if dx else (float(rng.uniform(0.0, free)),) * 2
    y0, y1 = travel(dy) if dy else (float(rng.uniform(0.0, free)),) * 2
    angle_start = float(rng.uniform(-_MAX_TILT / 2, _MAX_TILT / 2))
    angle_end = angle_start
    if rng.uniform() < 0.3:  # a slow turn of 10-20 degrees, staying within +-_MAX_TILT
        turn = float(rng.choice([-1.0, 1.0]) * rng.uniform(10.0, 20.0))
        angle_end = float(np.clip(angle_start + turn, -_MAX_TILT, _MAX_TILT))
    return Motion(kind, (x0, y0), (x1, y1), side, angle_start, angle_end, depth)


def _render_layers(
    identities: Sequence[Identity], motions: Sequence[Motion], num_frames: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every identity alone on an empty frame -> (rgb float32 [N, F, H, W, 3], alpha float32 [N, F, H, W])."""
    n = len(identities)
    rgb = np.zeros((n, num_frames, size, size, 3), np.float32)
    alpha = np.zeros((n, num_frames, size, size), np.float32)
    for k, (identity, motion) in enumerate(zip(identities, motions)):
        sprites: dict[float, np.ndarray] = {}  # a sprite that does not turn is drawn once
        for f in range(num_frames):
            x, y, angle = motion.at(f, num_frames)
            key = round(angle, 6)
            if key not in sprites:
                sprites[key] = render_identity(identity, motion.sprite_size, angle)
            rgb[k, f], alpha[k, f] = _layer(sprites[key], x, y, size, size)
    return rgb, alpha


def _visible_weights(alpha: np.ndarray, depths: Sequence[int]) -> np.ndarray:
    """Each layer's share of every pixel after depth-ordered compositing.

    alpha: [N, F, H, W] -> [N, F, H, W]: a_k * prod over nearer layers j of (1 - a_j). The shares
    sum to <= 1, so thresholding them at > 0.5 gives disjoint visible masks.
    """
    weights = np.zeros_like(alpha)
    transmittance = np.ones_like(alpha[0])
    for k in sorted(range(len(depths)), key=lambda k: -depths[k]):  # nearest first
        weights[k] = alpha[k] * transmittance
        transmittance = transmittance * (1.0 - alpha[k])
    return weights


def _composite(background: np.ndarray, rgb: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """background uint8 [H, W, 3], rgb [N, F, H, W, 3], weights [N, F, H, W] -> uint8 [F, H, W, 3]."""
    rest = 1.0 - weights.sum(axis=0)
    frames = background[None].astype(np.float32) * rest[..., None] + (rgb * weights[..., None]).sum(axis=0)
    return np.clip(np.round(frames), 0, 255).astype(np.uint8)


def _boxes(solid: np.ndarray) -> np.ndarray:
    """bool [N, F, H, W] -> int32 [N, F, 4] tight (x0, y0, x1, y1), exclusive ends; zeros if empty."""
    n, f = solid.shape[:2]
    boxes = np.zeros((n, f, 4), np.int32)
    for k in range(n):
        for t in range(f):
            ys, xs = np.nonzero(solid[k, t])
            if len(xs):
                boxes[k, t] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


_ORDINALS = ("first", "second", "third")
_COUNTS = ("one", "two", "three")


def _band(centre: float) -> int:
    """A position along one axis, as a fraction of the frame -> 0, 1, 2 (start, middle, end)."""
    return 0 if centre < 0.4 else (2 if centre > 0.6 else 1)


def describe_motion(motion: Motion, size: int) -> str:
    """A motion as a phrase with no subject, e.g. "moves from left to right along the top"."""
    half = motion.sprite_size / 2.0
    column = _band((motion.start[0] + half) / size)
    row = _band((motion.start[1] + half) / size)
    kind = motion.kind
    if kind in ("left_to_right", "right_to_left"):
        where = ("along the top", "through the middle", "along the bottom")[row]
        phrase = f"moves from {'left to right' if kind == 'left_to_right' else 'right to left'} {where}"
    elif kind in ("up", "down"):
        where = ("along the left side", "through the centre", "along the right side")[column]
        phrase = f"moves {kind} {where}"
    elif kind in _DIAGONALS:
        vertical, horizontal = kind.split("_")
        start = f"{'bottom' if vertical == 'up' else 'top'} {'left' if horizontal == 'right' else 'right'}"
        end = f"{'top' if vertical == 'up' else 'bottom'} {horizontal}"
        phrase = f"moves diagonally from the {start} to the {end}"
    else:
        phrase = "stays " + (
            ("in the top left corner", "at the top", "in the top right corner"),
            ("on the left", "in the centre", "on the right"),
            ("in the bottom left corner", "at the bottom", "in the bottom right corner"),
        )[row][column]
    return phrase + (" while turning slowly" if motion.turns else "")


def describe_clip(motions: Sequence[Motion], size: int, overlaps: Sequence[tuple[int, int]] = ()) -> str:
    """The prompt: count, then each subject by ordinal in order; `overlaps` lists (front, back)
    index pairs that overlap on screen. Never names a colour or a shape."""
    if len(motions) == 1:
        text = f"one object: it {describe_motion(motions[0], size)}"
    else:
        parts = [f"the {_ORDINALS[k]} {describe_motion(m, size)}" for k, m in enumerate(motions)]
        text = f"{_COUNTS[len(motions) - 1]} objects: " + ", ".join(parts)
        if overlaps:
            text += "; " + ", ".join(f"the {_ORDINALS[a]} is in front of the {_ORDINALS[b]}" for a, b in overlaps)
    return text + "."


def _overlaps(solid: np.ndarray, depths: Sequence[int], min_fraction: float = 0.05) -> list[tuple[int, int]]:
    """(front, back) pairs whose whole shapes overlap by >= `min_fraction` of the smaller one in some frame."""
    pairs = []
    area = solid.sum(axis=(2, 3))  # [N, F]
    for a in range(len(depths)):
        for b in range(a + 1, len(depths)):
            common = (solid[a] & solid[b]).sum(axis=(1, 2))
            if np.any(common >= min_fraction * np.maximum(np.minimum(area[a], area[b]), 1)):
                pairs.append((a, b) if depths[a] > depths[b] else (b, a))
    return sorted(pairs, key=lambda p: (min(p), max(p)))


def make_clip(
    identities: Sequence[Identity],
    num_frames: int,
    size: int,
    rng: np.random.Generator,
    background: np.ndarray | tuple[int, int, int] | None = None,
    motions: Sequence[Motion] | None = None,
    motion_kind: str | None = None,
    styles: Sequence[CategoryStyle | None] | None = None,
) -> Clip:
    """A clip of 1-3 identities moving over a background -> `Clip` (frames uint8 [F, size, size, 3]).

    background: None samples one (`make_background`), an RGB triple is a plain colour, an array
    uint8 [size, size, 3] is used as is. motions None samples one per identity in a random depth
    order, redrawing (up to 20 times) layouts that hide more than half of an identity in some frame;
    motion_kind fixes the kind of the sampled motions ("still" for still images).
    """
    check_num_frames(num_frames)
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if not 1 <= len(identities) <= MAX_SUBJECTS:
        raise ValueError(f"a clip has 1-{MAX_SUBJECTS} identities, got {len(identities)}")
    if background is None:
        background = make_background(size, rng)
    elif len(np.shape(background)) == 1:
        background = np.broadcast_to(np.asarray(background, np.uint8), (size, size, 3))
    background = np.asarray(background, np.uint8)
    if background.shape != (size, size, 3):
        raise ValueError(f"background must be [{size}, {size}, 3], got {list(background.shape)}")

    if motions is not None:
        if len(motions) != len(identities):
            raise ValueError(f"{len(motions)} motions for {len(identities)} identities")
        rgb, alpha = _render_layers(identities, motions, num_frames, size)
        weights = _visible_weights(alpha, [m.depth for m in motions])
    else:
        best = None
        for _ in range(_LAYOUT_TRIES):
            order = rng.permutation(len(identities))
            candidate = [sample_motion(size, rng, motion_kind, depth=int(order[k]),
                                       style=None if styles is None else styles[k]) for k in range(len(identities))]
            rgb, alpha = _render_layers(identities, candidate, num_frames, size)
            weights = _visible_weights(alpha, [m.depth for m in candidate])
            whole = np.maximum((alpha > 0.5).sum(axis=(2, 3)), 1)
            visible = float(((weights > 0.5).sum(axis=(2, 3)) / whole).min())
            if best is None or visible > best[0]:
                best = (visible, candidate, rgb, alpha, weights)
            if visible >= _MIN_VISIBLE:
                break
        _, motions, rgb, alpha, weights = best
    motions = tuple(motions)
    if num_frames == 1:  # a still image shows no turn; the prompt must not describe one
        motions = tuple(replace(m, angle_end=m.angle_start) for m in motions)
    solid = alpha > 0.5
    depths = [m.depth for m in motions]
    return Clip(
        frames=_composite(background, rgb, weights),
        masks=weights > 0.5,
        boxes=_boxes(solid),
        motions=motions,
        prompt=describe_clip(motions, size, _overlaps(solid, depths)),
    )


# ----------------------------------------------------------------------------------------------
# Samples and datasets


@dataclass(frozen=True, eq=False)
class ToySample:
    """One dataset sample: its id, identities (manifest order), clip and references (uint8 [R, R, 3] each)."""

    id: str
    identities: tuple[Identity, ...]
    clip: Clip
    references: tuple[np.ndarray, ...]
    categories: tuple[str, ...] = ()


def sample_rng(seed: int, pool: str, index: int) -> np.random.Generator:
    """The PCG64 stream of one sample: independent of how many samples a dataset has."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, POOLS.index(pool), index])))


def _check_subjects(subjects: tuple[int, int]) -> tuple[int, int]:
    lo, hi = (int(s) for s in subjects)
    if not 1 <= lo <= hi <= MAX_SUBJECTS:
        raise ValueError(f"subjects must be (min, max) with 1 <= min <= max <= {MAX_SUBJECTS}, got {subjects}")
    return lo, hi


def make_sample(
    index: int,
    seed: int,
    pool: str = "train",
    num_frames: int = 9,
    size: int = 64,
    ref_size: int = 64,
    subjects: tuple[int, int] = (1, 3),
    split_seed: int = 0,
    held_out_fraction: float = 0.2,
    motion_kind: str | None = None,
    categories: Sequence[str] | None = None,
) -> ToySample:
    """Sample `index` of the dataset that `write_dataset` writes with the same arguments
    (`write_image_dataset`: num_frames 1, motion_kind "still").

    categories: draw each subject's category (distinct within a sample) from these names of
    `CATEGORY_STYLES`, its identity from the category's shapes and its layout from the category's
    style (still images only); `ToySample.categories` records them. None: one kind of subject."""
    lo, hi = _check_subjects(subjects)
    rng = sample_rng(seed, pool, index)
    candidates = split_pools(split_seed, held_out_fraction)[POOLS.index(pool)]
    count = int(rng.integers(lo, hi + 1))
    if categories is None:
        identities = tuple(candidates[int(i)] for i in rng.choice(len(candidates), size=count, replace=False))
        cats, styles = (CATEGORY,) * count, None
    else:
        if count > len(categories):
            raise ValueError(f"{count} subjects need {count} distinct categories, got {list(categories)}")
        cats = tuple(str(c) for c in rng.choice(list(categories), size=count, replace=False))
        styles = [CATEGORY_STYLES[c] for c in cats]
        identities = []
        for style in styles:
            pool_k = [i for i in candidates if i.shape in style.shapes and i not in identities]
            identities.append(pool_k[int(rng.integers(len(pool_k)))])
        identities = tuple(identities)
    clip = make_clip(identities, num_frames, size, rng, motion_kind=motion_kind, styles=styles)
    references = tuple(make_reference(identity, ref_size, rng) for identity in identities)
    return ToySample(f"{pool}-{index:05d}", identities, clip, references, cats)


def _write_png(image: np.ndarray, path: Path) -> None:
    with atomic_write(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _write_text(text: str, path: Path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_dataset(
    folder: str | Path,
    num_samples: int,
    seed: int,
    pool: str = "train",
    num_frames: int = 9,
    size: int = 64,
    ref_size: int = 64,
    subjects: tuple[int, int] = (1, 3),
    split_seed: int = 0,
    held_out_fraction: float = 0.2,
) -> Path:
    """Write a toy dataset -> the path of its `manifest.jsonl` (docs/design.md 8).

    folder/videos/<id>.mp4 (H.264, 8 fps), folder/refs/<id>_<k>.png, folder/masks/<id>_<k>.mp4
    (visible mask, white on black: the loader binarises luminance at 0.5, so H.264's ringing at the
    edges does not survive), folder/identities.json (identity keys, motions and boxes per sample,
    in subject order) and folder/manifest.jsonl, split = pool. Every file is written atomically;
    an old manifest is removed first and the new one written last, so a crashed run never leaves a
    manifest that points at missing or half-rewritten files.
    Same arguments -> identical frames and byte-identical manifest.
    """
    from idcrafter.utils.media import write_video  # imported here: idcrafter.video loads the pipeline

    check_num_frames(num_frames)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if seed < 0 or split_seed < 0:
        raise ValueError(f"seeds must be non-negative, got seed={seed}, split_seed={split_seed}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if size < 16 or size % 16:
        # the H.264 writer would silently rescale to a multiple of 16, misaligning masks and boxes
        raise ValueError(f"size must be a positive multiple of 16, got {size}")
    if ref_size < 8:
        raise ValueError(f"ref_size must be >= 8, got {ref_size}")
    _check_subjects(subjects)

    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    manifest.unlink(missing_ok=True)
    lines, records = [], []
    for index in range(num_samples):
        sample = make_sample(index, seed, pool, num_frames, size, ref_size, subjects, split_seed, held_out_fraction)
        write_video(sample.clip.frames, folder / "videos" / f"{sample.id}.mp4", fps=FPS)
        entries = []
        for k, reference in enumerate(sample.references):
            _write_png(reference, folder / "refs" / f"{sample.id}_{k}.png")
            mask = np.repeat(sample.clip.masks[k, ..., None].astype(np.uint8) * 255, 3, axis=-1)
            write_video(mask, folder / "masks" / f"{sample.id}_{k}.mp4", fps=FPS)
            entries.append({"image": f"refs/{sample.id}_{k}.png", "mask": f"masks/{sample.id}_{k}.mp4",
                            "category": CATEGORY})
        lines.append(json.dumps({"id": sample.id, "video": f"videos/{sample.id}.mp4", "prompt": sample.clip.prompt,
                                 "subjects": entries, "fps": FPS, "split": pool}))
        records.append({"id": sample.id, "identities": [i.key for i in sample.identities],
                        "motions": [m.to_dict() for m in sample.clip.motions],
                        "boxes": sample.clip.boxes.tolist()})
    meta = {"seed": seed, "pool": pool, "split_seed": split_seed, "held_out_fraction": held_out_fraction,
            "num_frames": num_frames, "size": size, "ref_size": ref_size, "fps": FPS, "samples": records}
    _write_text(json.dumps(meta, indent=1) + "\n", folder / "identities.json")
    _write_text("\n".join(lines) + "\n", manifest)
    return manifest


def write_image_dataset(
    folder: str | Path,
    num_samples: int,
    seed: int,
    pool: str = "train",
    size: int = 64,
    ref_size: int = 32,
    subjects: tuple[int, int] = (1, 3),
    split_seed: int = 0,
    held_out_fraction: float = 0.2,
    categories: Sequence[str] | None = None,
) -> Path:
    """The toy world's image variant: still frames of the same identities -> `manifest.jsonl`.

    categories: subjects of these `CATEGORY_STYLES` categories (each with its own shapes, size and
    band of the frame; the manifest names each subject's category), for One-for-All's category
    binding; None: one kind of subject (category "toy").

    Each sample is one frame of 1-3 still identities ("stays in the top left corner", ...):
    folder/images/<id>.png, folder/refs/<id>_<k>.png, folder/masks/<id>_<k>.png (visible mask,
    white on black), folder/identities.json and folder/manifest.jsonl (docs/design.md 8 with "image"),
    written as `write_dataset` writes (atomic files, manifest last, deterministic from the seed).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if size < 16 or size % 16:
        raise ValueError(f"size must be a positive multiple of 16, got {size}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    _check_subjects(subjects)
    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    manifest.unlink(missing_ok=True)
    lines, records = [], []
    for index in range(num_samples):
        sample = make_sample(index, seed, pool, 1, size, ref_size, subjects, split_seed, held_out_fraction,
                             motion_kind="still", categories=categories)
        _write_png(sample.clip.frames[0], folder / "images" / f"{sample.id}.png")
        entries = []
        for k, reference in enumerate(sample.references):
            _write_png(reference, folder / "refs" / f"{sample.id}_{k}.png")
            _write_png(sample.clip.masks[k, 0].astype(np.uint8) * 255, folder / "masks" / f"{sample.id}_{k}.png")
            entries.append({"image": f"refs/{sample.id}_{k}.png", "mask": f"masks/{sample.id}_{k}.png",
                            "category": sample.categories[k]})
        lines.append(json.dumps({"id": sample.id, "image": f"images/{sample.id}.png", "prompt": sample.clip.prompt,
                                 "subjects": entries, "split": pool}))
        records.append({"id": sample.id, "identities": [i.key for i in sample.identities],
                        "categories": list(sample.categories), "boxes": sample.clip.boxes[:, 0].tolist()})
    meta = {"seed": seed, "pool": pool, "split_seed": split_seed, "held_out_fraction": held_out_fraction,
            "size": size, "ref_size": ref_size, "samples": records}
    _write_text(json.dumps(meta, indent=1) + "\n", folder / "identities.json")
    _write_text("\n".join(lines) + "\n", manifest)
    return manifest


def prompt_words(prompt: str) -> list[str]:
    """Lower-case words of a prompt (for checking it against `IDENTITY_WORDS`)."""
    return re.findall(r"[a-z]+", prompt.lower())
