"""A synthetic image classification set with ground truth: shapes on cluttered backgrounds, plus faces with parts.

Every sample is a pure function of ``(seed, index)``: the label is ``index % NUM_CLASSES`` (balanced), and a
numpy Generator seeded with ``[seed, index]`` draws everything else (background, distractors, the object's
colour, texture, size, position, rotation, aspect, blur and noise). Images are 256x256 RGB uint8, the size the
paper's preprocessing produces before its 224 crops.

The object is drawn through its mask: the geometry is rasterized once into a hard (not antialiased) mask and
the object's texture is composited through that mask, so the mask is exactly the set of pixels the object
covers. Blur and noise are applied to the whole image afterwards; they are identical with and without the
object (``render(..., draw_object=False)`` consumes the same random draws), so only pixels within a few blur
radii of the mask can change when the object is removed.

Face parts (``left_eye``, ``right_eye``, ``nose``, ``mouth``) are boxes ``[x0, y0, x1, y1]`` in the 256 frame;
"left" is the viewer's left (smaller x before rotation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 256
# Bumped whenever the drawing changes, so caches of rendered sets are not reused across versions.
GENERATOR_VERSION = 2
CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "bar", "hexagon", "arrow", "crescent",
           "face")
NUM_CLASSES = len(CLASSES)
PART_NAMES = ("left_eye", "right_eye", "nose", "mouth")
# The third seed word of :func:`render_novel`'s generator: its scenes are not ``render``'s.
NOVEL_STREAM = 0x0D0D


@dataclass
class Sample:
    image: np.ndarray                 # uint8 (256, 256, 3)
    label: int
    mask: np.ndarray                  # bool (256, 256): the object's pixels
    parts: dict = field(default_factory=dict)   # face parts: name -> [x0, y0, x1, y1]

    @property
    def class_name(self) -> str:
        return CLASSES[self.label]


def label_of(index: int) -> int:
    return index % NUM_CLASSES


# ---------------------------------------------------------------------------------------------- geometry
def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _ellipse(rx: float, ry: float, cx: float = 0.0, cy: float = 0.0, n: int = 72) -> np.ndarray:
    t = 2 * np.pi * np.arange(n) / n
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _shape(name: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons in a unit frame (object within radius ~1), each with 1 (add) or 0 (cut out)."""
    if name == "circle":
        return [(_ellipse(1, 1), 1)]
    if name == "square":
        a = rng.uniform(0.85, 1.0)
        return [(np.array([[-a, -a], [a, -a], [a, a], [-a, a]]) * 0.75, 1)]
    if name == "triangle":
        return [(_regular(3, 1.0, -np.pi / 2) + rng.normal(0, 0.04, (3, 2)), 1)]
    if name == "star":
        inner = rng.uniform(0.38, 0.5)
        pts = _regular(10, 1.0, -np.pi / 2)
        pts[1::2] *= inner
        return [(pts, 1)]
    if name == "cross":
        w = rng.uniform(0.28, 0.4)
        return [(np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w],
                           [-1, w], [-1, -w], [-w, -w]]), 1)]
    if name == "ring":
        inner = rng.uniform(0.5, 0.7)
        return [(_ellipse(1, 1), 1), (_ellipse(inner, inner), 0)]
    if name == "bar":
        aspect = rng.uniform(3.0, 5.0)
        return [(_ellipse(1, 1 / aspect), 1)]
    if name == "hexagon":
        return [(_regular(6, 1.0, rng.uniform(0, np.pi / 3)), 1)]
    if name == "arrow":
        s, h = rng.uniform(0.14, 0.24), rng.uniform(0.4, 0.55)
        return [(np.array([[-1, -s], [0.2, -s], [0.2, -h], [1, 0], [0.2, h], [0.2, s], [-1, s]]), 1)]
    if name == "crescent":
        r, dx = rng.uniform(0.75, 0.9), rng.uniform(0.35, 0.55)
        return [(_ellipse(1, 1), 1), (_ellipse(r, r, cx=dx), 0)]
    raise ValueError(f"unknown shape {name!r}")


def _place(points: np.ndarray, scale: float, angle: float, cx: float, cy: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return points @ rot.T * scale + np.array([cx, cy])


def _poly(draw: ImageDraw.ImageDraw, pts: np.ndarray, fill: int) -> None:
    draw.polygon([(float(x), float(y)) for x, y in pts], fill=fill)


# ---------------------------------------------------------------------------------------------- textures
def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], (256, 256, 3), from a coarse grid upsampled bilinearly."""
    grid = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) / 255.0


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _stripes(rng: np.random.Generator, period: float) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    phase = (_XX * math.cos(angle) + _YY * math.sin(angle)) * (2 * np.pi / period)
    return (np.sin(phase + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)


def _background(rng: np.random.Generator) -> np.ndarray:
    """float32 (256, 256, 3) in 0..255: a base colour with gradient, blotches, and stripes or checks."""
    base, other = _colour(rng), _colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((_XX * math.cos(angle) + _YY * math.sin(angle)) / (SIZE * 1.5) + 0.5)[..., None]
    img = base * (1 - ramp) + other * ramp
    img += (_smooth_noise(rng, int(rng.integers(3, 12))) - 0.5) * rng.uniform(20, 70)
    kind = rng.integers(0, 3)
    if kind == 1:
        img += (_stripes(rng, rng.uniform(8, 40))[..., None] - 0.5) * rng.uniform(10, 30)
    elif kind == 2:
        cell = int(rng.integers(8, 40))
        checks = (((_XX // cell) + (_YY // cell)) % 2)[..., None]
        img += (checks - 0.5) * rng.uniform(10, 30)
    return img


def _distractors(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Small marks (lines, dots, short arcs) that must not be mistaken for the object."""
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(1, 6))):
        colour = tuple(int(v) for v in _colour(rng))
        x, y = rng.uniform(0, SIZE, 2)
        kind = rng.integers(0, 3)
        if kind == 0:
            dx, dy = rng.uniform(-40, 40, 2)
            draw.line([(x, y), (x + dx, y + dy)], fill=colour, width=int(rng.integers(1, 4)))
        elif kind == 1:
            r = rng.uniform(2, 7)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            r = rng.uniform(8, 20)
            start = rng.uniform(0, 360)
            draw.arc([x - r, y - r, x + r, y + r], start, start + rng.uniform(40, 120), fill=colour,
                     width=int(rng.integers(1, 3)))
    return np.asarray(pil, dtype=np.float32)


def _object_texture(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """float32 (256, 256, 3): the object's appearance, kept visibly apart from the background's mean colour."""
    for _ in range(20):
        main = _colour(rng)
        if np.abs(main - bg_mean).sum() > 150:
            break
    kind = rng.integers(0, 4)
    tex = np.broadcast_to(main, (SIZE, SIZE, 3)).astype(np.float32)
    if kind == 1:    # stripes of a second, nearby colour
        tex = tex + (_stripes(rng, rng.uniform(6, 20))[..., None] - 0.5) * rng.uniform(30, 70)
    elif kind == 2:  # mottled
        tex = tex + (_smooth_noise(rng, int(rng.integers(6, 20))) - 0.5) * rng.uniform(30, 70)
    elif kind == 3:  # shading gradient
        angle = rng.uniform(0, 2 * np.pi)
        ramp = ((_XX * math.cos(angle) + _YY * math.sin(angle)) / SIZE)[..., None]
        tex = tex + ramp * rng.uniform(30, 70)
    return tex


# ---------------------------------------------------------------------------------------------- objects
def _draw_shape(name: str, rng: np.random.Generator, polygons=None) -> tuple[np.ndarray, dict, list]:
    """The object's mask (uint8 0/1) and its colour layers: a list of (mask, colour or None = main texture).
    ``polygons`` (a function of the generator, as :func:`_shape`) draws another shape in the same way."""
    scale = rng.uniform(0.3, 0.6) * SIZE / 2          # object diameter 30-60% of the side
    cx, cy = rng.uniform(scale * 0.8, SIZE - scale * 0.8, 2)
    angle = rng.uniform(0, 2 * np.pi)
    outline = name not in ("ring", "crescent") and rng.random() < 0.1
    width = int(rng.integers(3, 8))
    canvas = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, value in (polygons(rng) if polygons is not None else _shape(name, rng)):
        placed = _place(pts, scale, angle, cx, cy)
        if outline:
            draw.line([(float(x), float(y)) for x, y in np.vstack([placed, placed[:1]])], fill=1, width=width,
                      joint="curve")
        else:
            _poly(draw, placed, value)
    return np.asarray(canvas, dtype=np.uint8), {}, []


def _draw_face(rng: np.random.Generator) -> tuple[np.ndarray, dict, list]:
    """A head (ellipse) with two eyes, a nose and a mouth; parts are coloured layers inside the head."""
    scale = rng.uniform(0.3, 0.6) * SIZE / 2
    cx, cy = rng.uniform(scale * 0.85, SIZE - scale * 0.85, 2)
    angle = rng.uniform(-0.35, 0.35)                 # faces stay roughly upright
    aspect = rng.uniform(0.75, 0.9)
    eye_dx, eye_y, eye_r = rng.uniform(0.3, 0.4), rng.uniform(-0.35, -0.15), rng.uniform(0.1, 0.16)
    mouth_y, mouth_w = rng.uniform(0.4, 0.55), rng.uniform(0.25, 0.45)
    part_polys = {
        "left_eye": _ellipse(eye_r, eye_r * 0.8, -eye_dx, eye_y),
        "right_eye": _ellipse(eye_r, eye_r * 0.8, eye_dx, eye_y),
        "nose": np.array([[0.0, eye_y + 0.12], [0.1, 0.2], [-0.1, 0.2]]),
        "mouth": _ellipse(mouth_w, rng.uniform(0.05, 0.1), 0.0, mouth_y),
    }
    head = _place(_ellipse(aspect, 1.0), scale, angle, cx, cy)
    canvas = Image.new("L", (SIZE, SIZE), 0)
    _poly(ImageDraw.Draw(canvas), head, 1)
    dark = rng.uniform(0, 70, 3)
    colours = {"left_eye": dark, "right_eye": dark, "nose": rng.uniform(60, 160, 3),
               "mouth": np.array([rng.uniform(120, 220), rng.uniform(0, 60), rng.uniform(0, 60)])}
    parts, layers = {}, []
    for part in PART_NAMES:
        placed = _place(part_polys[part], scale, angle, cx, cy)
        layer = Image.new("L", (SIZE, SIZE), 0)
        _poly(ImageDraw.Draw(layer), placed, 1)
        layers.append((np.asarray(layer, dtype=np.uint8), colours[part]))
        x0, y0 = np.floor(placed.min(axis=0))
        x1, y1 = np.ceil(placed.max(axis=0))
        parts[part] = [int(max(0, x0)), int(max(0, y0)), int(min(SIZE, x1)), int(min(SIZE, y1))]
    return np.asarray(canvas, dtype=np.uint8), parts, layers


# ---------------------------------------------------------------------------------------------- sample
def render(seed: int, index: int, *, draw_object: bool = True) -> Sample:
    """The sample ``index`` of the dataset ``seed``. ``draw_object=False`` renders the same scene without it."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return _render(np.random.default_rng([seed, index]), label_of(index), draw_object=draw_object)


def render_novel(seed: int, index: int, polygons) -> np.ndarray:
    """A scene of this data set (background, distractors, texture, size, pose, blur and noise drawn alike) whose
    object is another shape: ``polygons(rng)`` returns ``[(points, 1 add | 0 cut out), ...]`` in a unit frame
    (the object within radius ~1), as the classes' own shapes are drawn. For probes of shapes a model trained here
    never saw (near out-of-distribution data); the scene's draws come from a stream apart from ``render``'s, so
    the same ``(seed, index)`` is not the same scene. uint8 (256, 256, 3)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return _render(np.random.default_rng([seed, index, NOVEL_STREAM]), None, polygons=polygons).image


def _render(rng: np.random.Generator, label: int | None, *, draw_object: bool = True, polygons=None) -> Sample:
    img = _distractors(rng, _background(rng))
    tex = _object_texture(rng, img.reshape(-1, 3).mean(axis=0))
    if label is not None and CLASSES[label] == "face":
        mask, parts, layers = _draw_face(rng)
    else:
        mask, parts, layers = _draw_shape(CLASSES[label] if label is not None else "novel", rng, polygons)
    if draw_object:
        m = mask[..., None].astype(np.float32)
        img = img * (1 - m) + tex * m
        for layer, colour in layers:
            lm = layer[..., None].astype(np.float32)
            img = img * (1 - lm) + colour * lm
    # Camera effects, drawn whether or not the object is, so both renders stay aligned.
    blur = rng.uniform(0, 1.2)
    noise_std = rng.uniform(0, 8)
    noise = rng.normal(0, 1, img.shape).astype(np.float32) * noise_std
    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    if blur > 0.3:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    final = np.clip(np.rint(np.asarray(out, dtype=np.float32) + noise), 0, 255).astype(np.uint8)
    return Sample(final, -1 if label is None else label, mask.astype(bool), parts)


def render_images(seed: int, indices, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (len(indices), 256, 256, 3) for the given indices (``out`` may be a memmap to fill)."""
    indices = list(indices)
    if out is None:
        out = np.empty((len(indices), SIZE, SIZE, 3), dtype=np.uint8)
    for row, index in enumerate(indices):
        out[row] = render(seed, index).image
    return out
