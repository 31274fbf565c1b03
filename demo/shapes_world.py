"""A seeded generator of small RGB scenes of coloured shapes, with captions and attribute labels, and short videos.

Everything is drawn with numpy at 4x supersampling and box-filtered down, so edges are anti-aliased and a scene is
a pure function of its spec. Images are float32 in [0, 1], channels first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (0.88, 0.16, 0.16),
    "green": (0.16, 0.72, 0.24),
    "blue": (0.20, 0.32, 0.92),
    "yellow": (0.93, 0.83, 0.16),
}
SIZES = {"small": 0.13, "large": 0.24}  # half-extent as a fraction of the image width
POSITIONS = {"left": 0.27, "center": 0.5, "right": 0.73}  # x of the shape's centre
MOTIONS = ("moves left", "moves right", "moves up", "moves down", "grows", "shrinks", "turns")
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS)}
IMAGE_SIZE = 32
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    x: float  # centre, fractions of the width/height
    y: float
    scale: float = 1.0  # multiplies the size's half-extent (videos grow and shrink)
    rgb: tuple[float, float, float] | None = None  # overrides the colour's rgb (colour changes mid-video)

    @property
    def position(self) -> str:
        return min(POSITIONS, key=lambda name: abs(POSITIONS[name] - self.x))


@dataclass(frozen=True)
class Background:
    rgb: tuple[float, float, float]
    texture: str = "plain"  # "plain", "stripes" or "noise"
    seed: int = 0


def _mask(shape: Shape, size: int) -> np.ndarray:
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    dx = coords[None, :] - shape.x
    dy = coords[:, None] - shape.y
    r = SIZES[shape.size] * shape.scale
    if shape.shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape.shape == "square":
        inside = np.maximum(np.abs(dx), np.abs(dy)) <= 0.86 * r  # equal area-ish to the circle
    elif shape.shape == "triangle":  # apex up; base 2.2r wide
        height = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        inside = (height >= 0) & (height <= 1) & (np.abs(dx) <= 1.1 * r * height)
    else:
        raise ValueError(f"shape: unknown {shape.shape!r}; expected one of {SHAPES}")
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def _background(bg: Background, size: int) -> np.ndarray:
    image = np.broadcast_to(np.asarray(bg.rgb, np.float32)[:, None, None], (3, size, size)).copy()
    if bg.texture == "stripes":
        phase = np.random.default_rng(bg.seed).uniform(0, 2 * np.pi)
        stripes = 0.06 * np.sin(2 * np.pi * np.arange(size) / 6.0 + phase)
        image += stripes[None, None, :] if bg.seed % 2 else stripes[None, :, None]
    elif bg.texture == "noise":
        image += 0.05 * np.random.default_rng(bg.seed).standard_normal((1, size, size))
    return image


def render(shapes: tuple[Shape, ...] | list[Shape], background: Background, size: int = IMAGE_SIZE) -> np.ndarray:
    """[3, size, size] float32 in [0, 1]: the background with the shapes painted in order."""
    image = _background(background, size)
    for shape in shapes:
        alpha = _mask(shape, size)[None]
        rgb = np.asarray(shape.rgb if shape.rgb is not None else COLOURS[shape.colour], np.float32)[:, None, None]
        image = image * (1 - alpha) + rgb * alpha
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def random_background(rng: np.random.Generator) -> Background:
    grey = rng.uniform(0.08, 0.45)
    tint = rng.uniform(-0.04, 0.04, size=3)
    texture = str(rng.choice(["plain", "plain", "stripes", "noise"]))
    return Background(tuple(float(v) for v in np.clip(grey + tint, 0, 1)), texture, int(rng.integers(1 << 30)))


def random_shape(rng: np.random.Generator, **fixed: str) -> Shape:
    """A shape with random attributes (any given as keywords are kept), jittered around its named position."""
    for key, value in fixed.items():
        if key not in ATTRIBUTES or value not in ATTRIBUTES[key]:
            raise ValueError(
                f"{key}: {value!r} is not a demo-world attribute; valid: {ATTRIBUTES.get(key, ATTRIBUTES)}"
            )
    pick = {key: fixed.get(key) or str(rng.choice(values)) for key, values in ATTRIBUTES.items()}
    x = POSITIONS[pick["position"]] + rng.uniform(-0.04, 0.04)
    y = 0.5 + rng.uniform(-0.12, 0.12)
    return Shape(pick["shape"], pick["colour"], pick["size"], float(x), float(y))


def caption(shape: Shape, rng: np.random.Generator | None = None, drop: float = 0.0) -> str:
    """'large red circle left'; with rng and drop > 0 each attribute word is left out with probability drop,
    so the models also learn partial prompts ('red circle', 'square')."""
    words = [shape.size, shape.colour, shape.shape, shape.position]
    if rng is not None and drop > 0:
        words = [w for w in words if rng.uniform() >= drop]
    return " ".join(words)


@dataclass
class ImageBatch:
    images: np.ndarray  # [n, 3, H, W] in [0, 1]
    captions: list[str]
    labels: dict[str, np.ndarray]  # attribute -> [n] index into ATTRIBUTES[attribute]


def sample_images(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE, drop: float = 0.0) -> ImageBatch:
    """n one-shape scenes, their (possibly partial) captions and full attribute labels."""
    shapes = [random_shape(rng) for _ in range(n)]
    images = np.stack([render([s], random_background(rng), size) for s in shapes])
    labels = {
        key: np.asarray([values.index(getattr(s, key)) for s in shapes], np.int64) for key, values in ATTRIBUTES.items()
    }
    return ImageBatch(images, [caption(s, rng, drop) for s in shapes], labels)


# ------------------------------------------------------------------------------------------------------------
# Videos: one shape that moves, grows, shrinks or changes colour over the frames.
# ------------------------------------------------------------------------------------------------------------

_STEP = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1)}


def video_frames(start: Shape, motion: str, frames: int, to_colour: str | None = None, travel: float = 0.4) -> list:
    """The shape at each frame: position, scale or colour interpolated linearly from frame 0 to the last."""
    if motion not in MOTIONS:
        raise ValueError(f"motion: unknown {motion!r}; expected one of {MOTIONS}")
    out = []
    for i in range(frames):
        t = i / max(frames - 1, 1)
        if motion in _STEP:
            dx, dy = _STEP[motion]
            out.append(replace(start, x=start.x + dx * travel * (t - 0.5), y=start.y + dy * travel * (t - 0.5)))
        elif motion in ("grows", "shrinks"):
            scale = 0.6 + 0.8 * t if motion == "grows" else 1.4 - 0.8 * t
            out.append(replace(start, scale=scale))
        else:
            a, b = np.asarray(COLOURS[start.colour]), np.asarray(COLOURS[to_colour or start.colour])
            out.append(replace(start, rgb=tuple(float(v) for v in (1 - t) * a + t * b)))
    return out


def video_caption(start: Shape, motion: str, to_colour: str | None = None) -> str:
    """'red circle moves right', 'blue square turns green'."""
    tail = f"turns {to_colour}" if motion == "turns" else motion
    return f"{start.colour} {start.shape} {tail}"


@dataclass
class VideoBatch:
    videos: np.ndarray  # [n, 3, T, H, W] in [0, 1]
    captions: list[str]
    motions: list[str]


def sample_videos(rng: np.random.Generator, n: int, frames: int = 8, size: int = 16) -> VideoBatch:
    videos, captions, motions = [], [], []
    for _ in range(n):
        motion = str(rng.choice(MOTIONS))
        start = replace(random_shape(rng, position="center"), size="large")
        to_colour = str(rng.choice([c for c in COLOURS if c != start.colour])) if motion == "turns" else None
        bg = random_background(rng)
        clip = [render([s], bg, size) for s in video_frames(start, motion, frames, to_colour)]
        videos.append(np.stack(clip, axis=1))
        captions.append(video_caption(start, motion, to_colour))
        motions.append(motion)
    return VideoBatch(np.stack(videos), captions, motions)


def centroid(image: np.ndarray, background: np.ndarray | None = None) -> tuple[float, float]:
    """(x, y) in width fractions of the pixels that differ most from the background (the median colour if not
    given): a shape's position without a classifier, for motion checks."""
    bg = np.median(image.reshape(3, -1), axis=1)[:, None, None] if background is None else background
    weight = np.abs(image - bg).sum(axis=0)
    weight = np.where(weight > 0.5 * weight.max(), weight, 0.0)
    h, w = weight.shape
    total = weight.sum() + 1e-12
    ys, xs = np.mgrid[0:h, 0:w]
    return float(((xs + 0.5) * weight).sum() / total / w), float(((ys + 0.5) * weight).sum() / total / h)
