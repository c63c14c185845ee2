"""Procedural scenes for the simulated study: sampling and rendering.

A scene is one to three coloured shapes on a background, with structure a caption can name and an
image can show: shape, colour, size, position (a 3 x 3 grid of named places), count (groups of
identical objects) and a spatial relation (pairs of different objects). Scenes are plain data
(`Scene.to_dict` / `Scene.from_dict` round-trip through JSON), rendered deterministically from that
data alone, so the ground-truth file fully describes every stimulus.

Coordinates are image coordinates in [0, 1]: x to the right, y downwards (row order), so "top"
means small y.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS = {  # name -> RGB; eight hues a small model can tell apart at 32-64 px
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "pink": (245, 120, 190),
    "white": (245, 245, 245),
}
BACKGROUNDS = ("gray", "black", "striped", "grass")
SIZES = ("small", "large")
LAYOUTS = ("single", "group", "pair")
RELATIONS = ("left of", "right of", "above", "below")

# Object radius as a fraction of the image width, per size class.
RADIUS_RANGE = {"small": (0.07, 0.10), "large": (0.15, 0.20)}
# Centres of the 3 x 3 grid of named places; positions are jittered around them but stay inside
# the cell's inner part, so the name of the place is never ambiguous.
CELL_CENTRES = (1 / 6, 1 / 2, 5 / 6)
CELL_JITTER = 0.08
ROW_NAMES = ("top", "middle", "bottom")
COLUMN_NAMES = ("left", "center", "right")
LAYOUT_PROBABILITIES = {"single": 0.4, "group": 0.25, "pair": 0.35}


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str  # "small" | "large"
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height (downwards)
    radius: float  # fraction of width

    @property
    def place(self) -> str:
        return place_name(self.x, self.y)


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    layout: str  # "single" | "group" | "pair"
    objects: tuple[SceneObject, ...]
    relation: str | None = None  # pairs only: where objects[0] is relative to objects[1]

    @property
    def count(self) -> int:
        return len(self.objects)

    def to_dict(self) -> dict:
        return {
            "background": self.background,
            "layout": self.layout,
            "relation": self.relation,
            "objects": [dataclasses.asdict(o) for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(
            background=d["background"],
            layout=d["layout"],
            relation=d.get("relation"),
            objects=tuple(SceneObject(**o) for o in d["objects"]),
        )

    def shape_colour_pairs(self) -> set[tuple[str, str]]:
        return {(o.shape, o.colour) for o in self.objects}


def place_name(x: float, y: float) -> str:
    """The named place of a point: 'top left', 'center', 'bottom', 'right' (middle row) ..."""
    row = ROW_NAMES[min(int(y * 3), 2)]
    col = COLUMN_NAMES[min(int(x * 3), 2)]
    if row == "middle" and col == "center":
        return "center"
    if row == "middle":
        return col
    if col == "center":
        return row
    return f"{row} {col}"


def choose_held_out_pairs(rng: np.random.Generator) -> frozenset[tuple[str, str]]:
    """Shape x colour combinations that never occur in training: one colour per shape, each
    colour used at most once, so every shape and every colour is still seen in training."""
    colours = list(COLOURS)
    order = rng.permutation(len(colours))
    return frozenset((shape, colours[order[i]]) for i, shape in enumerate(SHAPES))


# ----------------------------------------------------------------------------------------------
# Sampling


def _radius(rng: np.random.Generator, size: str) -> float:
    lo, hi = RADIUS_RANGE[size]
    return float(rng.uniform(lo, hi))


def _overlaps(a: SceneObject, b: SceneObject, margin: float = 0.02) -> bool:
    return math.hypot(a.x - b.x, a.y - b.y) < a.radius + b.radius + margin


def _in_cell(rng: np.random.Generator, row: int, col: int, radius: float) -> tuple[float, float]:
    x = CELL_CENTRES[col] + rng.uniform(-CELL_JITTER, CELL_JITTER)
    y = CELL_CENTRES[row] + rng.uniform(-CELL_JITTER, CELL_JITTER)
    # keep the object on the canvas; with radius <= 0.2 the clamp never leaves the cell
    lo, hi = radius + 0.01, 1 - radius - 0.01
    return float(np.clip(x, lo, hi)), float(np.clip(y, lo, hi))


def _pick_shape_colour(
    rng: np.random.Generator,
    held_out: frozenset[tuple[str, str]],
    use_held_out: bool,
    exclude_shape: str | None = None,
) -> tuple[str, str]:
    if use_held_out:
        options = sorted(p for p in held_out if p[0] != exclude_shape)
        return options[rng.integers(len(options))]
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        if shape != exclude_shape and (shape, colour) not in held_out:
            return shape, colour


def sample_scene(
    rng: np.random.Generator,
    held_out: frozenset[tuple[str, str]] = frozenset(),
    novel: bool = False,
) -> Scene:
    """Draw one scene. Without `novel`, no object has a held-out shape x colour pair; with it, at
    least one object has one (a combination no training scene contains)."""
    layout = rng.choice(list(LAYOUT_PROBABILITIES), p=list(LAYOUT_PROBABILITIES.values()))
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if layout == "single":
        shape, colour = _pick_shape_colour(rng, held_out, novel)
        size = SIZES[rng.integers(2)]
        radius = _radius(rng, size)
        x, y = _in_cell(rng, rng.integers(3), rng.integers(3), radius)
        return Scene(background, "single", (SceneObject(shape, colour, size, x, y, radius),))

    if layout == "group":
        count = int(rng.integers(2, 4))
        shape, colour = _pick_shape_colour(rng, held_out, novel)
        size = "small" if count == 3 or rng.random() < 0.5 else "large"
        while True:  # rejection sampling of non-overlapping positions
            objects = []
            for _ in range(count):
                radius = _radius(rng, size)
                x = float(rng.uniform(radius + 0.02, 1 - radius - 0.02))
                y = float(rng.uniform(radius + 0.02, 1 - radius - 0.02))
                objects.append(SceneObject(shape, colour, size, x, y, radius))
            if not any(_overlaps(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]):
                return Scene(background, "group", tuple(objects))

    # pair: two objects of different shapes in a named relation, objects[0] relative to objects[1]
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    novel_slot = int(rng.integers(2)) if novel else -1
    shape_a, colour_a = _pick_shape_colour(rng, held_out, novel_slot == 0)
    shape_b, colour_b = _pick_shape_colour(rng, held_out, novel_slot == 1, exclude_shape=shape_a)
    size_a, size_b = SIZES[rng.integers(2)], SIZES[rng.integers(2)]
    while True:
        ra, rb = _radius(rng, size_a), _radius(rng, size_b)
        # along the relation's axis the two centres are well apart; across it they roughly align
        near, far = rng.uniform(0.22, 0.34), rng.uniform(0.66, 0.78)
        across_a, across_b = rng.uniform(0.3, 0.7, size=2)
        if relation in ("left of", "above"):
            along_a, along_b = near, far
        else:
            along_a, along_b = far, near
        if relation in ("left of", "right of"):
            (xa, ya), (xb, yb) = (along_a, across_a), (along_b, across_b)
        else:
            (xa, ya), (xb, yb) = (across_a, along_a), (across_b, along_b)
        a = SceneObject(shape_a, colour_a, size_a, float(xa), float(ya), ra)
        b = SceneObject(shape_b, colour_b, size_b, float(xb), float(yb), rb)
        inside = all(o.radius <= min(o.x, o.y, 1 - o.x, 1 - o.y) for o in (a, b))
        if inside and not _overlaps(a, b):
            return Scene(background, "pair", (a, b), relation)


# ----------------------------------------------------------------------------------------------
# Rendering


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a shape centred at (cx, cy) with 'radius' r, in pixels (y down)."""
    if shape == "square":
        h = 0.85 * r  # a slightly smaller half-side keeps the area close to the circle's
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        cy += 0.15 * r  # optical centring of an upward triangle
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.radians([-90, 30, 150])]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else 0.45 * r
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.33 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
                (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
                (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        hx = 16 * np.sin(t) ** 3
        hy = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        s = r / 16.5
        return list(zip(cx + s * hx, cy - s * (hy + 2.5)))
    raise ValueError(f"unknown shape {shape!r}")


def _draw_background(draw: ImageDraw.ImageDraw, background: str, n: int) -> None:
    if background == "gray":
        draw.rectangle([0, 0, n, n], fill=(128, 128, 128))
    elif background == "black":
        draw.rectangle([0, 0, n, n], fill=(18, 18, 18))
    elif background == "striped":
        draw.rectangle([0, 0, n, n], fill=(205, 200, 185))
        period = n / 6
        for k in range(-6, 13):  # diagonal bands of a darker tone
            x0 = k * period
            draw.polygon([(x0, 0), (x0 + period / 2, 0), (x0 + period / 2 - n, n), (x0 - n, n)],
                         fill=(150, 145, 135))
    elif background == "grass":
        horizon = int(0.6 * n)
        for row in range(n):  # vertical gradients: sky brightens to the horizon, grass darkens
            if row < horizon:
                f = row / horizon
                colour = (int(110 + 80 * f), int(170 + 50 * f), int(230 + 15 * f))
            else:
                f = (row - horizon) / (n - horizon)
                colour = (int(80 - 30 * f), int(160 - 40 * f), int(60 - 20 * f))
            draw.line([(0, row), (n, row)], fill=colour)
    else:
        raise ValueError(f"unknown background {background!r}")


def render_scene(scene: Scene, size: int = 64, supersample: int = 4) -> np.ndarray:
    """The stimulus image, (size, size, 3) uint8. Drawn at `supersample` x the size and
    area-averaged down, so edges are anti-aliased the same way at every size."""
    n = size * supersample
    image = Image.new("RGB", (n, n))
    draw = ImageDraw.Draw(image)
    _draw_background(draw, scene.background, n)
    for obj in scene.objects:
        cx, cy, r = obj.x * n, obj.y * n, obj.radius * n
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=fill)
    image = image.resize((size, size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8).copy()


def render_scenes(scenes: Iterable[Scene], size: int = 64) -> np.ndarray:
    """(N, size, size, 3) uint8."""
    return np.stack([render_scene(s, size) for s in scenes])
