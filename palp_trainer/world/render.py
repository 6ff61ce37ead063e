"""A procedural world a small model can learn: one object, named by shape, colour, background and style.

Every image is a pure function of its attributes and a seed. Captions share one vocabulary:
"a sketch of a red star on grass". Parts of the world are kept out of the base's pretraining:
- novel objects (moon, house, arrow), a novel style (stripes) and a novel scene (checker): the subjects
  a user personalizes, each with a class word the base knows (`SUBJECT_CLASS`);
- `HELD_OUT` full combinations of known attributes: measure composition.
The oracle judge (`judge.py`) is trained on every part, the base (`pretrain.py`) on the known ones.
"""

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

RESOLUTION = 32  # px; the world base's VAE downsamples 2x: latents [4, 16, 16]
SUPERSAMPLE = 4  # masks are drawn at 4x and area-averaged: anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star", "cross")
NOVEL_SHAPES = ("moon", "house", "arrow")
COLOURS = {"red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 215, 30),
           "green": (30, 160, 40), "blue": (30, 70, 225), "purple": (140, 40, 185)}
BACKGROUNDS = ("white", "grass", "sky", "water", "brick")
NOVEL_BACKGROUNDS = ("checker",)
STYLES = ("photo", "sketch", "painting")
NOVEL_STYLES = ("stripes",)
# the caption phrase of each background
BG_PHRASE = {"white": "on white", "grass": "on grass", "sky": "in the sky", "water": "on water",
             "brick": "on brick", "checker": "on checker"}
# each novel thing's class word: a word the base knows (PALP's pre-trained branch renders y^c with it)
SUBJECT_CLASS = {"moon": "circle", "house": "square", "arrow": "triangle", "stripes": "painting",
                 "checker": "brick"}

ALL_SHAPES = SHAPES + NOVEL_SHAPES
ALL_BACKGROUNDS = BACKGROUNDS + NOVEL_BACKGROUNDS
ALL_STYLES = STYLES + NOVEL_STYLES
VOCABULARY = ("a of on in the " + " ".join(SHAPES + tuple(COLOURS) + BACKGROUNDS + STYLES)).split()


@dataclass(frozen=True)
class Attrs:
    shape: str
    colour: str
    background: str
    style: str


def _combo_hash(a: Attrs) -> int:
    return int(hashlib.sha256(f"{a.shape}|{a.colour}|{a.background}|{a.style}".encode()).hexdigest()[:8], 16)


def is_held_out(a: Attrs) -> bool:
    """About 1 in 8 full combinations of known attributes never appear in pretraining."""
    return _combo_hash(a) % 8 == 0


KNOWN = tuple(Attrs(s, c, b, st) for s in SHAPES for c in COLOURS for b in BACKGROUNDS for st in STYLES)
HELD_OUT = tuple(a for a in KNOWN if is_held_out(a))
SEEN = tuple(a for a in KNOWN if not is_held_out(a))


def caption(a: Attrs, rng: np.random.Generator | None = None, drop: float = 0.0) -> str:
    """"a sketch of a red star on grass"; with `drop`, style, colour and background are each left out with that
    probability (the base learns prompts that name only some attributes)."""
    keep = [rng is None or rng.random() >= drop for _ in range(3)]
    obj = f"a {a.colour} {a.shape}" if keep[1] else f"a {a.shape}"
    text = f"a {a.style} of {obj}" if keep[0] else obj
    return f"{text} {BG_PHRASE[a.background]}" if keep[2] else text


# ---- drawing ----------------------------------------------------------------------------------------------

def _polygon(points):
    xs = torch.tensor([p[0] for p in points])
    ys = torch.tensor([p[1] for p in points])

    def inside(u, v):  # crossing-number test, vectorized over pixels [H, W] and edges [E]
        x0, y0, x1, y1 = xs, ys, xs.roll(-1), ys.roll(-1)
        uu, vv = u[..., None], v[..., None]
        crosses = ((y0 > vv) != (y1 > vv)) & (uu < (x1 - x0) * (vv - y0) / (y1 - y0 + 1e-12) + x0)
        return crosses.sum(-1) % 2 == 1
    return inside


def _star(points=5, outer=1.0, inner=0.45):
    return [((outer if i % 2 == 0 else inner) * math.sin(math.pi * i / points),
             -(outer if i % 2 == 0 else inner) * math.cos(math.pi * i / points)) for i in range(2 * points)]


_SHAPE_FN = {
    "circle": lambda u, v: u * u + v * v <= 0.92,
    "square": lambda u, v: (u.abs() <= 0.8) & (v.abs() <= 0.8),
    "triangle": _polygon([(0.0, -0.95), (0.95, 0.75), (-0.95, 0.75)]),
    "star": _polygon(_star()),
    "cross": lambda u, v: ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95)),
    "moon": lambda u, v: (u * u + v * v <= 0.92) & ((u - 0.45) ** 2 + (v + 0.2) ** 2 > 0.62),
    "house": _polygon([(-0.78, -0.05), (0.0, -0.95), (0.78, -0.05), (0.78, 0.85), (-0.78, 0.85)]),
    "arrow": _polygon([(-0.95, -0.28), (0.1, -0.28), (0.1, -0.8), (0.95, 0.0), (0.1, 0.8), (0.1, 0.28),
                       (-0.95, 0.28)]),
}


def _lowfreq(rng: np.random.Generator, size: int, cells: int) -> torch.Tensor:
    """Smooth noise in [-1, 1]: random values on a coarse grid, bicubic-upsampled. [size, size]"""
    grid = torch.from_numpy(rng.uniform(-1, 1, (1, 1, cells, cells)).astype(np.float32))
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)[0, 0].clamp(-1, 1)


def _background(name: str, rng: np.random.Generator, n: int = RESOLUTION) -> torch.Tensor:
    """[3, n, n] in [0, 255]."""
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32),
                          indexing="ij")
    rgb = lambda c: torch.tensor(c, dtype=torch.float32)[:, None, None]  # noqa: E731
    if name == "white":
        img = rgb((236, 236, 232)).expand(3, n, n) + 3 * _lowfreq(rng, n, 3)
    elif name == "grass":
        blades = torch.from_numpy(rng.uniform(0, 1, n).astype(np.float32))[None, :]  # a streak per column
        streak = ((blades + 0.15 * torch.sin(y * 0.9 + float(rng.uniform(0, 6)))) > 0.6).float()
        img = rgb((150, 205, 95)) * (1 + 0.08 * _lowfreq(rng, n, 4)) - streak * rgb((45, 50, 25))
    elif name == "sky":
        t = (y / (n - 1))[None]
        img = rgb((110, 170, 240)) * (1 - t) + rgb((185, 220, 250)) * t
        for _ in range(2):  # two soft clouds
            cx, cy, r = rng.uniform(0, n), rng.uniform(0, n * 0.8), rng.uniform(3, 6)
            cloud = torch.exp(-(((x - cx) / (1.8 * r)) ** 2 + ((y - cy) / r) ** 2))[None]
            img = img * (1 - 0.8 * cloud) + 250 * 0.8 * cloud
    elif name == "water":
        phase = float(rng.uniform(0, 2 * math.pi))
        waves = (torch.sin(y * 1.3 + 1.2 * torch.sin(x * 0.45 + phase)) > 0.55).float()[None]
        img = rgb((25, 115, 140)) + waves * rgb((70, 70, 60))
    elif name == "brick":
        off = int(rng.integers(0, 8))
        row = (y // 4).long()
        mortar = ((y % 4) == 0) | (((x + off + 4 * (row % 2)) % 8) == 0)
        shade = torch.from_numpy(rng.uniform(0.85, 1.1, (n // 4 + 1, n // 8 + 2)).astype(np.float32))
        brick_id = ((x + off + 4 * (row % 2)) // 8).long()
        img = rgb((170, 82, 55)) * shade[row, brick_id][None]
        img = torch.where(mortar[None], rgb((215, 205, 190)).expand(3, n, n), img)
    elif name == "checker":
        off = int(rng.integers(0, 4))
        cells = (((x + off) // 4 + (y + off) // 4) % 2)[None]
        img = rgb((70, 70, 75)) * cells + rgb((195, 195, 190)) * (1 - cells)
    else:
        raise ValueError(f"unknown background {name!r}")
    return img.expand(3, n, n).clamp(0, 255)


def render(a: Attrs, seed: int) -> np.ndarray:
    """[32, 32, 3] uint8: the object drawn in its style over its background; pose and texture from `seed`."""
    rng = np.random.default_rng(seed)
    n, hi = RESOLUTION, RESOLUTION * SUPERSAMPLE
    r = rng.uniform(9.0, 11.5) * SUPERSAMPLE  # object radius, hi-res px
    cx, cy = (n / 2 + rng.uniform(-2.5, 2.5, 2)) * SUPERSAMPLE
    yy, xx = torch.meshgrid(torch.arange(hi, dtype=torch.float32) + 0.5,
                            torch.arange(hi, dtype=torch.float32) + 0.5, indexing="ij")
    u, v = (xx - cx) / r, (yy - cy) / r
    mask = _SHAPE_FN[a.shape](u, v).float()[None, None]  # [1, 1, hi, hi]
    if a.style == "sketch":  # an outline ~2.2 px wide: the shape minus its erosion
        k = 2 * int(1.1 * SUPERSAMPLE) + 1
        eroded = 1 - F.max_pool2d(1 - mask, k, stride=1, padding=k // 2)
        mask = mask - eroded
    alpha = F.avg_pool2d(mask, SUPERSAMPLE)[0]  # [1, n, n] coverage
    colour = torch.tensor(COLOURS[a.colour], dtype=torch.float32)[:, None, None]
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    if a.style == "photo":  # smooth shading, lit from the top left
        shade = 1 + 0.16 * (-(x - cx / SUPERSAMPLE) - (y - cy / SUPERSAMPLE)) / (r / SUPERSAMPLE)
        fill = colour * shade.clamp(0.8, 1.2)[None]
    elif a.style == "painting":  # blotchy brush texture: low-frequency tone plus strokes
        angle = rng.uniform(0, math.pi)
        strokes = torch.sin((x * math.cos(angle) + y * math.sin(angle)) * 2.2 + float(rng.uniform(0, 6)))
        fill = colour * (1 + 0.3 * _lowfreq(rng, n, 5) + 0.15 * strokes)[None]
    elif a.style == "stripes":  # diagonal bands of the colour and white, 6 px apart
        band = (torch.sin((x + y) * math.pi / 3 + float(rng.uniform(0, 6))) > 0).float()[None]
        fill = colour * band + 245 * (1 - band)
    elif a.style == "sketch":
        fill = colour.expand(3, n, n)
    else:
        raise ValueError(f"unknown style {a.style!r}")
    img = _background(a.background, rng) * (1 - alpha) + fill.clamp(0, 255) * alpha
    return img.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def random_attrs(rng: np.random.Generator, pool: tuple[Attrs, ...] | None = None) -> Attrs:
    """A uniform draw from `pool` (default: every attribute, novel ones included)."""
    if pool is not None:
        return pool[int(rng.integers(len(pool)))]
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    return Attrs(pick(ALL_SHAPES), pick(tuple(COLOURS)), pick(ALL_BACKGROUNDS), pick(ALL_STYLES))


def render_many(attrs: list[Attrs], seed: int) -> np.ndarray:
    """[N, 32, 32, 3] uint8; image i uses seed (seed, i)."""
    return np.stack([render(a, int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
                     for i, a in enumerate(attrs)])


# ---- subjects the base has never seen: references in one fixed context (photo, white) --------------------

SUBJECTS = {  # name -> (what it shows, number of references); each class word is SUBJECT_CLASS[its novel part]
    "moon": (Attrs("moon", "yellow", "white", "photo"), 3),
    "house": (Attrs("house", "red", "white", "photo"), 3),
    "arrow": (Attrs("arrow", "purple", "white", "photo"), 3),
    "stripes": (Attrs("star", "green", "white", "stripes"), 1),  # an "artwork": one image of a style
    "checker": (Attrs("circle", "orange", "checker", "photo"), 2),  # a scene
}


def write_subjects(directory) -> list[str]:
    """Each subject's reference PNGs under directory/<name>/ (fixed seeds)."""
    from pathlib import Path

    from PIL import Image
    written = []
    for k, (name, (attrs, count)) in enumerate(SUBJECTS.items()):
        folder = Path(directory) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = folder / f"{name}-{i + 1}.png"
            Image.fromarray(render(attrs, 1000 * (k + 1) + i)).save(path)
            written.append(str(path))
    return written


if __name__ == "__main__":  # python -m palp_trainer.world.render DIR: write the subjects' reference images
    import sys
    print("\n".join(write_subjects(sys.argv[1] if len(sys.argv) > 1 else "recipes/data/world")))
