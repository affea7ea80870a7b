"""The data: a procedurally generated image-caption toy world, and loaders for real image-caption folders.

unCLIP (Ramesh et al. 2022) trains its stages on ~650M image-text pairs. A course on two CPU cores
cannot, so its stages train on a generated world where every image comes with its ground truth:

    "a large red circle in the top left"            one object: colour, shape, size, one of 4 cells
    "a red circle left of a blue triangle"          two objects in one row or column, with a relation

What the caption leaves out is what unCLIP's latents can vary: the rotation (up to `max_rotation_deg`),
the exact position (`jitter`), and fine detail that only shows at high resolution: a thin outline, a
diagonal hatch finer than a base pixel, soft shading. The same scene renders at any resolution (base,
x4, x16 for the two upsamplers), so the upsamplers can be trained and checked against the truth.
Rendering is analytic: each shape is a signed distance function (SDF) and a pixel's coverage is
`clamp(0.5 - sdf / pixel, 0, 1)`; detail finer than ~2 pixels is faded to its mean, so the base image is
band-limited (the area-average of the x16 render is close to the base render).

The splits test compositional generalisation: (colour, shape) pairs in `heldout_pairs` never occur in
'train' or 'val', and every 'heldout' scene contains one. A scene is a pure function of
(seed, split, index), identical on every machine. With probability `p_text` a train/val scene has its
shape's name written on it in a 5x7 bitmap font (for the typographic-attack experiment of unCLIP §4,
Figure 6: CLIP reads text in images).

For the GPU presets, `ImageCaptionFolder` and `CocoCaptions` read real image-caption data and return the
same items as `ToyDataset`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import PresetConfig, check, check_positive, check_range
from .errors import DataError
from .progress import tqdm

# ---------------------------------------------------------------------------------------------
# the world's vocabulary
# ---------------------------------------------------------------------------------------------

PALETTE = {  # name -> RGB, chosen to stay distinct under shading and at 16 px
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 205, 30), "green": (40, 165, 60),
    "cyan": (30, 190, 210), "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (245, 130, 190),
    "brown": (135, 80, 35), "gray": (125, 125, 125),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon", "moon", "ring")
SIZES = {"small": (0.18, 0.13), "medium": (0.22, 0.155), "large": (0.26, 0.18)}  # radius: (alone, in a pair)
CELLS = ("top left", "top right", "bottom left", "bottom right")  # cell (row, col) -> CELLS[2 * row + col]
CENTRES = {1: (0.30, 0.70), 2: (0.26, 0.74)}  # cell centre coordinates (frame units) for 1 / 2 objects
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPLITS = ("train", "val", "heldout")
BACKGROUND = (236, 234, 228)  # a light warm grey
INK = (25, 25, 25)            # the colour of written text
OUTLINE_WIDTH = 0.012         # frame units: 0.4 px at 32 px, 6 px at 512 px
HATCH_PERIOD = 0.025          # frame units: 0.8 px at 32 px (faded to its mean), 3.2 px at x4, 12.8 at x16
MAX_WORD = 12                 # longest word `with_text` accepts
RENDER_THREADS = 1            # torch threads while rendering (None: leave torch's setting)

SINGLE_TEMPLATES = (
    "a {size} {colour} {shape} in the {cell}",
    "a {colour} {shape}",
    "there is a {size} {colour} {shape} at the {cell}",
    "a {colour} {shape} in the {cell}",
    "a {size} {colour} {shape}",
    "a picture of a {colour} {shape} in the {cell}",
)
PAIR_TEMPLATES = (  # A = objects[0], B = objects[1], A {rel} B
    "a {colour_a} {shape_a} {rel} a {colour_b} {shape_b}",
    "a {colour_b} {shape_b} {inv} a {colour_a} {shape_a}",
    "a {size_a} {colour_a} {shape_a} {rel} a {size_b} {colour_b} {shape_b}",
    "there is a {colour_a} {shape_a} {rel} a {colour_b} {shape_b}",
    "a {colour_a} {shape_a} and a {colour_b} {shape_b}",
)


def _articles(text: str) -> str:
    """'a orange' -> 'an orange'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

TOY_COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
TOY_SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")  # clearly distinct at 32 px
TOY_HELDOUT = (("red", "triangle"), ("orange", "cross"), ("yellow", "circle"), ("green", "star"),
               ("cyan", "square"), ("blue", "heart"), ("purple", "circle"), ("pink", "triangle"))
ALL_HELDOUT = (("red", "triangle"), ("orange", "cross"), ("yellow", "circle"), ("green", "star"),
               ("cyan", "square"), ("blue", "heart"), ("purple", "diamond"), ("pink", "hexagon"),
               ("brown", "circle"), ("gray", "triangle"))


@dataclass(frozen=True)
class DataConfig(PresetConfig):
    """The toy world: vocabulary, layout, detail, splits (the paper trains on real data instead)."""
    seed: int = 0                                       # the world's seed: scenes depend on (seed, split, index)
    resolution: int = 32                                # base image size in px (paper: 64, the decoder's base)
    colours: tuple[str, ...] = TOY_COLOURS              # palette names used (all valid: PALETTE)
    shapes: tuple[str, ...] = TOY_SHAPES                # shape names used (all valid: SHAPES)
    sizes: tuple[str, ...] = ("small", "large")         # size words used (valid: small, medium, large)
    p_two_objects: float = 0.35                         # fraction of scenes with two objects and a relation
    max_rotation_deg: float = 30.0                      # rotation range +-; not in the caption
    jitter: float = 0.03                                # +- offset from the cell centre (frame units); not in the caption
    p_text: float = 0.15                                # fraction of train/val scenes with the shape's name written on it
    text_in_caption: bool = False                       # also say the written word in the caption
    heldout_pairs: tuple[tuple[str, str], ...] = TOY_HELDOUT  # (colour, shape) pairs never in train/val
    train_size: int = 20000                             # scenes in the train split (paper: ~650M real pairs)
    val_size: int = 2000                                # scenes in the val split (same distribution as train)
    heldout_size: int = 2000                            # scenes in the heldout split (each has a held-out pair)
    outline: bool = True                                # thin dark outline (~0.4 px at base, 6 px at x16)
    hatch: bool = True                                  # fine diagonal hatch (below a base pixel, crisp at x16)
    shading: bool = True                                # soft light from the top left (visible at every size)

    def __post_init__(self):
        check_range(self, "seed", 0, integer=True)
        check_range(self, "resolution", 16, integer=True)
        check(self.resolution % 8 == 0, self, "resolution", "must be a multiple of 8 (e.g. 16, 32, 64)")
        for field, valid in (("colours", tuple(PALETTE)), ("shapes", SHAPES), ("sizes", tuple(SIZES))):
            value = getattr(self, field)
            check(isinstance(value, tuple) and len(value) > 0, self, field, "must be a non-empty tuple")
            for name in value:
                check(name in valid, self, field, f"unknown name {name!r}; valid names: {', '.join(valid)}")
            check(len(set(value)) == len(value), self, field, "has a repeated name")
        for field in ("p_two_objects", "p_text"):
            check_range(self, field, 0.0, 1.0)
        check_range(self, "max_rotation_deg", 0.0, 180.0)
        check_range(self, "jitter", 0.0, 0.05)  # larger would push large objects out of the frame
        check_positive(self, "train_size")
        check_range(self, "val_size", 0, integer=True)
        check_range(self, "heldout_size", 0, integer=True)
        for field in ("text_in_caption", "outline", "hatch", "shading"):
            check(isinstance(getattr(self, field), bool), self, field, "must be True or False")
        self._check_heldout()

    def _check_heldout(self):
        pairs = self.heldout_pairs
        check(isinstance(pairs, tuple), self, "heldout_pairs", "must be a tuple of (colour, shape) tuples")
        for p in pairs:
            check(isinstance(p, tuple) and len(p) == 2, self, "heldout_pairs",
                  f"{p!r} is not a (colour, shape) tuple")
            check(p[0] in self.colours, self, "heldout_pairs",
                  f"colour {p[0]!r} of {p!r} is not in colours; valid: {', '.join(self.colours)}")
            check(p[1] in self.shapes, self, "heldout_pairs",
                  f"shape {p[1]!r} of {p!r} is not in shapes; valid: {', '.join(self.shapes)}")
        check(len(set(pairs)) == len(pairs), self, "heldout_pairs", "has a repeated pair")
        train = [(c, s) for c in self.colours for s in self.shapes if (c, s) not in pairs]
        for c in self.colours:  # compositional generalisation needs every word seen in training
            check(any(t[0] == c for t in train), self, "heldout_pairs",
                  f"holds out every shape of colour {c!r}: keep at least one {c} shape in training")
        for s in self.shapes:
            check(any(t[1] == s for t in train), self, "heldout_pairs",
                  f"holds out every colour of shape {s!r}: keep at least one colour of {s} in training")
        check(len(train) >= 2 or self.p_two_objects == 0, self, "p_two_objects",
              "two-object scenes need at least 2 training (colour, shape) pairs")
        check(len(pairs) > 0 or self.heldout_size == 0, self, "heldout_size",
              "there are no heldout_pairs: set heldout_size=0 or give heldout_pairs")

    @classmethod
    def smoke(cls):
        return cls(resolution=16, train_size=256, val_size=64, heldout_size=64)

    @classmethod
    def toy(cls):
        return cls()

    @classmethod
    def small(cls):
        return cls(resolution=64, colours=tuple(PALETTE), shapes=SHAPES[:8],
                   heldout_pairs=ALL_HELDOUT, train_size=100_000, val_size=5000, heldout_size=5000)

    @classmethod
    def paper(cls):
        # 1M scenes at 64 px are 12 GB as uint8: render batches on the fly rather than `.images()`
        return cls(resolution=64, colours=tuple(PALETTE), shapes=SHAPES, sizes=tuple(SIZES),
                   heldout_pairs=ALL_HELDOUT, train_size=1_000_000, val_size=10000, heldout_size=10000)


# ---------------------------------------------------------------------------------------------
# scenes: the ground truth of every image
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SceneObject:
    """One object: what the caption may say (colour, shape, size, cell) and what it does not."""
    colour: str                   # a PALETTE name
    shape: str                    # a SHAPES name
    size: str                     # a SIZES word
    cell: tuple[int, int]         # (row, col) in the 2x2 grid; CELLS[2 * row + col] names it
    centre: tuple[float, float]   # (x, y) in frame units [0, 1], y pointing down
    radius: float                 # frame units; the shape fills roughly a disc of this radius
    rotation: float               # degrees, clockwise on screen


@dataclass(frozen=True)
class Scene:
    """A scene: its objects, how they relate, the written word, and the caption."""
    objects: tuple[SceneObject, ...]
    relation: str | None          # objects[0] <relation> objects[1] ('left of', ...); None for one object
    text: str | None              # the word written on objects[0], or None
    caption: str
    template: int                 # index into SINGLE_TEMPLATES or PAIR_TEMPLATES
    split: str = "custom"         # where it came from (provenance only)
    index: int = -1

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objects = tuple(SceneObject(**{**o, "cell": tuple(o["cell"]), "centre": tuple(o["centre"])})
                        for o in d["objects"])
        return cls(**{**d, "objects": objects})


def make_caption(objects, relation, template: int, text=None, text_in_caption=False) -> str:
    """The caption of a scene from its objects, relation and template index."""
    if len(objects) == 1:
        o = objects[0]
        caption = SINGLE_TEMPLATES[template].format(size=o.size, colour=o.colour, shape=o.shape,
                                                    cell=CELLS[2 * o.cell[0] + o.cell[1]])
    else:
        a, b = objects
        caption = PAIR_TEMPLATES[template].format(
            colour_a=a.colour, shape_a=a.shape, size_a=a.size, colour_b=b.colour, shape_b=b.shape,
            size_b=b.size, rel=relation, inv=RELATIONS[relation])
    if text is not None and text_in_caption:
        caption += f" with the word {text} written on the {objects[0].shape}"
    return _articles(caption)


def describes(caption_scene: "Scene", scenes) -> torch.Tensor:
    """Which `scenes` the caption of `caption_scene` is also true of `[N]` bool.

    In this world a caption like "a red circle" fits many images. Scene j fits the caption when its own
    ground truth, said with the caption's template, gives the same words (for pairs, in either order).
    """
    t = caption_scene.template
    out = []
    for s in scenes:
        if len(s.objects) != len(caption_scene.objects):
            out.append(False)
            continue
        said = {make_caption(s.objects, s.relation, t)}
        if len(s.objects) == 2:
            said.add(make_caption(s.objects[::-1], RELATIONS[s.relation], t))
        out.append(_strip_text(caption_scene.caption) in said)
    return torch.tensor(out)


def _strip_text(caption: str) -> str:
    return caption.split(" with the word ")[0]


# ---------------------------------------------------------------------------------------------
# shapes as signed distance functions (after Inigo Quilez's 2D SDFs); unit size, y pointing UP,
# negative inside. Each fills roughly the unit disc; the renderer scales by the object's radius.
# ---------------------------------------------------------------------------------------------

def _length(x, y):
    return torch.sqrt(x * x + y * y)


def _sd_box(x, y, bx, by):
    qx, qy = x.abs() - bx, y.abs() - by
    return _length(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def _sd_triangle(x, y, r=0.95):  # equilateral, centroid at 0, half side r, apex up
    k = math.sqrt(3.0)
    x, y = x.abs() - r, y + r / k
    fold = x + k * y > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - x.clamp(-2 * r, 0)
    return -_length(x, y) * torch.sign(y)


def _sd_star(x, y, r=1.08, rf=0.48):  # five points, outer radius r, inner radius rf * r
    k1x, k1y = 0.809016994375, -0.587785252292
    x = x.abs()
    for kx, ky in ((k1x, k1y), (-k1x, k1y)):  # fold into one point's wedge
        d = (kx * x + ky * y).clamp(min=0)
        x, y = x - 2 * d * kx, y - 2 * d * ky
    x, y = x.abs(), y - r
    bax, bay = -rf * k1y, rf * k1x - 1
    h = ((x * bax + y * bay) / (bax * bax + bay * bay)).clamp(0, r)
    return _length(x - bax * h, y - bay * h) * torch.sign(y * bax - x * bay)


def _sd_heart(x, y, s=0.62):
    x, y = x.abs() * s, y * s + 0.5  # the classic heart spans y in [0, 1.1]: centre and scale it
    lobe = _length(x - 0.25, y - 0.75) - math.sqrt(2) / 4
    m = (x + y).clamp(min=0) * 0.5
    body = torch.sqrt(torch.minimum(x * x + (y - 1) ** 2, (x - m) ** 2 + (y - m) ** 2)) * torch.sign(x - y)
    return torch.where(x + y > 1, lobe, body) / s


def _sd_cross(x, y, bx=0.95, by=0.34):  # a plus sign: arms of half length bx, half width by
    x, y = x.abs(), y.abs()
    x, y = torch.maximum(x, y), torch.minimum(x, y)
    qx, qy = x - bx, y - by
    k = torch.maximum(qx, qy)
    wx, wy = torch.where(k > 0, qx, by - x), torch.where(k > 0, qy, -k)
    return torch.sign(k) * _length(wx.clamp(min=0), wy.clamp(min=0))


def _sd_diamond(x, y, bx=0.8, by=1.08):
    x, y = x.abs(), y.abs()
    h = (((bx - 2 * x) * bx - (by - 2 * y) * by) / (bx * bx + by * by)).clamp(-1, 1)
    d = _length(x - 0.5 * bx * (1 - h), y - 0.5 * by * (1 + h))
    return d * torch.sign(x * by + y * bx - bx * by)


def _sd_hexagon(x, y, r=0.88):  # flat top and bottom, inradius r
    kx, ky, kz = -0.866025404, 0.5, 0.577350269
    x, y = x.abs(), y.abs()
    d = (kx * x + ky * y).clamp(max=0)
    x, y = x - 2 * d * kx, y - 2 * d * ky
    x, y = x - x.clamp(-kz * r, kz * r), y - r
    return _length(x, y) * torch.sign(y)


_SDF = {
    "circle": lambda x, y: _length(x, y) - 0.92,
    "square": lambda x, y: _sd_box(x, y, 0.8, 0.8),
    "triangle": _sd_triangle,
    "star": _sd_star,
    "heart": _sd_heart,
    "cross": _sd_cross,
    "diamond": _sd_diamond,
    "hexagon": _sd_hexagon,
    "moon": lambda x, y: torch.maximum(_length(x, y) - 0.95, 0.8 - _length(x - 0.45, y - 0.3)),
    "ring": lambda x, y: (_length(x, y) - 0.7).abs() - 0.25,
}
assert set(_SDF) == set(SHAPES)

EXTENT = {"circle": 0.92, "square": 1.13, "triangle": 1.10, "star": 1.08, "heart": 1.14, "cross": 1.01,
          "diamond": 1.08, "hexagon": 1.02, "moon": 0.95, "ring": 0.95}  # max |p| inside each unit shape


def _windows(centres, extents, crops, res):
    """Pixel windows that cover discs (centre, extent) inside each crop, one common size W.

    Rendering only these windows (not whole frames) makes the cost follow the objects' area.
    Returns xs, ys `[m, W]` (pixel-centre coordinates in frame units, the same values a full render
    uses) and per disc the window's (row, col) offset inside its crop.
    """
    spans = []
    for (cx, cy), e, (top, left, size) in zip(centres, extents, crops):
        r0, c0 = math.floor((cy - e) * res) - 1, math.floor((cx - e) * res) - 1   # 1 px margin for AA
        r1, c1 = math.ceil((cy + e) * res) + 1, math.ceil((cx + e) * res) + 1
        spans.append((r0, c0, max(r1 - r0, c1 - c0)))
    w = min(max(s[2] for s in spans), crops[0][2])
    ar = torch.arange(w, dtype=torch.float32) + 0.5
    starts, offsets = [], []
    for (r0, c0, _), (top, left, size) in zip(spans, crops):
        r0, c0 = min(max(r0, top), top + size - w), min(max(c0, left), left + size - w)
        starts.append((r0, c0))
        offsets.append((r0 - top, c0 - left))
    starts = torch.tensor(starts, dtype=torch.float32)
    return (starts[:, 1:] + ar) / res, (starts[:, :1] + ar) / res, offsets


# ---------------------------------------------------------------------------------------------
# a 5x7 bitmap font for a-z: text written on objects
# ---------------------------------------------------------------------------------------------

_GLYPHS = """
a ..... ..... .###. ....# .#### #...# .####
b #.... #.... ####. #...# #...# #...# ####.
c ..... ..... .###. #.... #.... #...# .###.
d ....# ....# .#### #...# #...# #...# .####
e ..... ..... .###. #...# ##### #.... .###.
f ..##. .#..# .#... ###.. .#... .#... .#...
g ..... .#### #...# #...# .#### ....# .###.
h #.... #.... #.##. ##..# #...# #...# #...#
i ..#.. ..... .##.. ..#.. ..#.. ..#.. .###.
j ...#. ..... ..##. ...#. ...#. #..#. .##..
k #.... #.... #..#. #.#.. ##... #.#.. #..#.
l .##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.
m ..... ..... ##.#. #.#.# #.#.# #...# #...#
n ..... ..... #.##. ##..# #...# #...# #...#
o ..... ..... .###. #...# #...# #...# .###.
p ..... ####. #...# #...# ####. #.... #....
q ..... .#### #...# #...# .#### ....# ....#
r ..... ..... #.##. ##..# #.... #.... #....
s ..... ..... .###. #.... .###. ....# ####.
t .#... .#... ###.. .#... .#... .#..# ..##.
u ..... ..... #...# #...# #...# #..## .##.#
v ..... ..... #...# #...# #...# .#.#. ..#..
w ..... ..... #...# #...# #.#.# #.#.# .#.#.
x ..... ..... #...# .#.#. ..#.. .#.#. #...#
y ..... #...# #...# #...# .#### ....# .###.
z ..... ..... ##### ...#. ..#.. .#... #####
"""
FONT = {line.split()[0]: torch.tensor([[c == "#" for c in row] for row in line.split()[1:]])
        for line in _GLYPHS.strip().splitlines()}  # letter -> bool [7, 5]
assert sorted(FONT) == [chr(c) for c in range(97, 123)] and all(g.shape == (7, 5) for g in FONT.values())


def _word_bitmap(word: str) -> torch.Tensor:
    """The word's pixels in font cells: float [7, 6 * len - 1] (one empty column between letters)."""
    cols = []
    for i, ch in enumerate(word):
        if i:
            cols.append(torch.zeros(7, 1, dtype=torch.bool))
        cols.append(FONT[ch])
    return torch.cat(cols, dim=1).float()


def _check_word(word) -> str:
    if not isinstance(word, str) or not re.fullmatch(f"[a-z]{{1,{MAX_WORD}}}", word):
        raise DataError(f"cannot write {word!r} on an object: the font has lowercase a-z only and a word "
                        f"holds 1 to {MAX_WORD} letters; pass e.g. 'star'")
    return word


# ---------------------------------------------------------------------------------------------
# the world
# ---------------------------------------------------------------------------------------------

class ToyWorld:
    """Scenes as pure functions of (seed, split, index), and their renders at any resolution."""

    def __init__(self, cfg: DataConfig | None = None):
        self.cfg = cfg or DataConfig.toy()
        held = set(self.cfg.heldout_pairs)
        self.train_pairs = [(c, s) for c in self.cfg.colours for s in self.cfg.shapes if (c, s) not in held]
        self.heldout_pairs = list(self.cfg.heldout_pairs)

    # -- scenes --------------------------------------------------------------------------------

    def scene(self, index: int, split: str = "train") -> Scene:
        """Scene `index` of `split`: drawn from `default_rng([seed, split_id, index])` alone."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise DataError(f"scene index {index!r} must be an int >= 0")
        if split == "heldout" and not self.heldout_pairs:
            raise DataError("this world has no heldout_pairs, so no 'heldout' split: set "
                            "DataConfig.heldout_pairs")
        cfg = self.cfg
        u = np.random.default_rng([cfg.seed, SPLITS.index(split), int(index)]).random(16).tolist()
        two = u[0] < cfg.p_two_objects
        train, held = self.train_pairs, self.heldout_pairs
        if split == "heldout":  # one held-out object; the other (if any) from the training pairs
            pairs = [held[int(u[1] * len(held))]]
            if two:
                other = train[int(u[2] * len(train))]
                pairs = pairs + [other] if u[3] < 0.5 else [other] + pairs
        else:
            ia = int(u[1] * len(train))
            pairs = [train[ia]]
            if two:  # a different pair, so "a red circle left of a red circle" never happens
                ib = int(u[2] * (len(train) - 1))
                pairs.append(train[ib + (ib >= ia)])
        sizes = [cfg.sizes[int(v * len(cfg.sizes))] for v in u[4:6]]
        if two:
            axis, order = int(u[6] * 4), u[7] < 0.5
            a, b = (0, 1) if order else (1, 0)
            cells = [(axis, a), (axis, b)] if axis < 2 else [(a, axis - 2), (b, axis - 2)]
            relation = ("left of" if a < b else "right of") if axis < 2 else ("above" if a < b else "below")
        else:
            cells, relation = [divmod(int(u[6] * 4), 2)], None
        centres = CENTRES[len(pairs)]
        objects = tuple(SceneObject(
            colour=c, shape=s, size=size, cell=cell,
            centre=(centres[cell[1]] + cfg.jitter * (2 * jx - 1), centres[cell[0]] + cfg.jitter * (2 * jy - 1)),
            radius=SIZES[size][len(pairs) - 1], rotation=cfg.max_rotation_deg * (2 * rot - 1))
            for (c, s), size, cell, jx, jy, rot in zip(pairs, sizes, cells, u[8:10], u[10:12], u[12:14]))
        text = objects[0].shape if split != "heldout" and u[14] < cfg.p_text else None
        templates = PAIR_TEMPLATES if two else SINGLE_TEMPLATES
        template = int(u[15] * len(templates))
        caption = make_caption(objects, relation, template, text, cfg.text_in_caption)
        return Scene(objects, relation, text, caption, template, split, int(index))

    def scenes(self, indices, split: str = "train") -> list[Scene]:
        """`[self.scene(i, split) for i in indices]`."""
        return [self.scene(int(i), split) for i in indices]

    def with_text(self, scene: Scene, word: str | None) -> Scene:
        """A copy of `scene` with `word` written on its first object (None removes the text)."""
        if word is not None:
            _check_word(word)
        caption = make_caption(scene.objects, scene.relation, scene.template, word, self.cfg.text_in_caption)
        return dataclasses.replace(scene, text=word, caption=caption)

    def dataset(self, split: str = "train", size: int | None = None) -> "ToyDataset":
        """The first `size` scenes of `split` (default: the config's size of that split)."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return ToyDataset(self, split, getattr(self.cfg, f"{split}_size") if size is None else size)

    # -- labels for zero-shot and attribute classifiers ----------------------------------------

    def class_pairs(self) -> list[tuple[str, str]]:
        """Every (colour, shape) of the config, colour-major: the classes of `class_prompts`."""
        return [(c, s) for c in self.cfg.colours for s in self.cfg.shapes]

    def class_prompts(self, template: str = "a {colour} {shape}") -> list[str]:
        """One prompt per (colour, shape) class, in `class_pairs` order: "a red circle", "an orange star"."""
        return [_articles(template.format(colour=c, shape=s)) for c, s in self.class_pairs()]

    def colour_index(self, name: str) -> int:
        return self._index(name, self.cfg.colours, "colour")

    def shape_index(self, name: str) -> int:
        return self._index(name, self.cfg.shapes, "shape")

    def size_index(self, name: str) -> int:
        return self._index(name, self.cfg.sizes, "size")

    @staticmethod
    def cell_index(cell) -> int:
        """(row, col) -> 0..3, the index into CELLS."""
        return 2 * int(cell[0]) + int(cell[1])

    def class_index(self, colour: str, shape: str) -> int:
        """Index of (colour, shape) in `class_pairs()`."""
        return self.colour_index(colour) * len(self.cfg.shapes) + self.shape_index(shape)

    def labels(self, scenes) -> dict:
        """Labels of each scene's first object, LongTensor `[N]` each: colour, shape, size, cell, pair (the
        `class_pairs` index), n_objects, heldout (1 if the object's pair is held out)."""
        held = set(self.heldout_pairs)
        rows = [(self.colour_index(o.colour), self.shape_index(o.shape), self.size_index(o.size),
                 self.cell_index(o.cell), self.class_index(o.colour, o.shape), len(s.objects),
                 int((o.colour, o.shape) in held)) for s in scenes for o in s.objects[:1]]
        t = torch.tensor(rows, dtype=torch.long).reshape(-1, 7)
        keys = ("colour", "shape", "size", "cell", "pair", "n_objects", "heldout")
        return {k: t[:, i] for i, k in enumerate(keys)}

    @staticmethod
    def _index(name, names, what):
        if name not in names:
            raise DataError(f"unknown {what} {name!r}; this world's {what}s: {', '.join(names)}")
        return names.index(name)

    # -- rendering -----------------------------------------------------------------------------

    def render(self, scenes, resolution: int | None = None, crop=None, max_pixels: int = 1 << 20) -> torch.Tensor:
        """Render scenes: uint8 `[N, 3, S, S]` (S = resolution, or the crop's size).

        resolution: px of the full frame (None: the config's base resolution; x4 / x16 for upsamplers).
        crop: (top, left, size) in px of that resolution, one for all scenes or a list with one per scene;
            the result equals slicing the full render, without rendering the rest.
        max_pixels: work in chunks of about this many object-pixels (memory bound at high resolution).
        """
        if isinstance(scenes, Scene):
            scenes = [scenes]
        scenes = list(scenes)
        res = self.cfg.resolution if resolution is None else resolution
        if isinstance(res, np.integer):
            res = int(res)
        if isinstance(res, bool) or not isinstance(res, int) or res < 1:
            raise DataError(f"resolution {res!r} must be a positive int (e.g. {self.cfg.resolution} or "
                            f"{4 * self.cfg.resolution})")
        crops = self._crops(crop, len(scenes), res)
        size = crops[0][2] if crops else res
        out = torch.empty(len(scenes), 3, size, size, dtype=torch.uint8)
        step = max(1, max_pixels // (2 * size * size))
        threads = torch.get_num_threads()
        # Many small tensor ops: one thread loses ~25% on an idle 2-core machine, but two threads
        # slow down 10-20x when another process holds a core (measured: 0.17 s vs 2-7 s per 2000 scenes).
        torch.set_num_threads(RENDER_THREADS or threads)
        try:
            for a in range(0, len(scenes), step):
                out[a:a + step] = self._render_chunk(scenes[a:a + step], res, crops[a:a + step], size)
        finally:
            torch.set_num_threads(threads)
        return out

    @staticmethod
    def _crops(crop, n, res):
        if crop is None:
            return [(0, 0, res)] * n
        crops = [crop] * n if len(crop) == 3 and all(isinstance(v, (int, np.integer)) for v in crop) \
            else list(crop)
        if len(crops) != n:
            raise DataError(f"got {len(crops)} crops for {n} scenes: pass one (top, left, size) for all "
                            f"or one per scene")
        crops = [tuple(int(v) for v in c) for c in crops]
        for top, left, size in crops:
            if size < 1 or top < 0 or left < 0 or top + size > res or left + size > res:
                raise DataError(f"crop (top={top}, left={left}, size={size}) is outside the {res}x{res} "
                                f"frame: keep 0 <= top, left and top + size, left + size <= {res}")
        if len({c[2] for c in crops}) > 1:
            raise DataError("crops of different sizes cannot be stacked: give every crop the same size")
        return crops

    def _render_chunk(self, scenes, res, crops, size):
        """Render a few scenes: uint8 [n, 3, size, size]."""
        n, px = len(scenes), 1.0 / res
        img = torch.tensor(BACKGROUND, dtype=torch.float32).div(255).view(1, 3, 1, 1).repeat(n, 1, size, size)
        for slot in range(max((len(s.objects) for s in scenes), default=0)):
            idx = [i for i, s in enumerate(scenes) if len(s.objects) > slot]
            objs = [scenes[i].objects[slot] for i in idx]
            for o in objs:
                if o.colour not in PALETTE or o.shape not in SHAPES:
                    raise DataError(f"cannot render {o.colour!r} {o.shape!r}: valid colours: "
                                    f"{', '.join(PALETTE)}; valid shapes: {', '.join(SHAPES)}")
            xs, ys, offsets = _windows([o.centre for o in objs], [EXTENT[o.shape] * o.radius for o in objs],
                                       [crops[i] for i in idx], res)
            alpha, interior, fill, ink = self._object_layers(objs, xs, ys, px)
            w = xs.shape[1]
            for j, (i, (r0, c0)) in enumerate(zip(idx, offsets)):
                # "over" compositing, linear in the coverages (so area-averaging commutes with rendering);
                # the outline is the band between the silhouette and the interior
                view = img[i, :, r0:r0 + w, c0:c0 + w]
                view.mul_(1 - alpha[j]).add_(ink[j] * (alpha[j] - interior[j])).add_(fill[j] * interior[j])
        texts = [i for i, s in enumerate(scenes) if s.text]
        if texts:
            xs, ys, offsets, cover = self._text_cover([scenes[i] for i in texts], [crops[i] for i in texts], res)
            w = xs.shape[1]
            ink = torch.tensor(INK, dtype=torch.float32).div(255).view(3, 1, 1)
            for j, (i, (r0, c0)) in enumerate(zip(texts, offsets)):
                view = img[i, :, r0:r0 + w, c0:c0 + w]
                view.mul_(1 - 0.9 * cover[j]).add_(ink * 0.9 * cover[j])
        return img.mul_(255).round_().clamp_(0, 255).to(torch.uint8)

    def _local(self, objs, xs, ys):
        """Object-frame coordinates: rotated offsets (u, v) and unrotated (dx, dy), [m, S, S] each."""
        t = torch.tensor([[o.centre[0], o.centre[1], math.radians(o.rotation)] for o in objs])
        dx = xs[:, None, :] - t[:, 0, None, None]   # [m, 1, S]
        dy = ys[:, :, None] - t[:, 1, None, None]   # [m, S, 1]
        c, s = torch.cos(t[:, 2]).view(-1, 1, 1), torch.sin(t[:, 2]).view(-1, 1, 1)
        u = c * dx + s * dy                         # rotating the frame by -angle turns the shape clockwise
        v = -s * dx + c * dy
        return u, v, dx, dy

    def _object_layers(self, objs, xs, ys, px):
        """Per object: coverage and interior coverage [m, 1, S, S], fill colour [m, 3, S, S], outline
        colour [m, 3, 1, 1] (the object's colour, darkened)."""
        cfg = self.cfg
        u, v, dx, dy = self._local(objs, xs, ys)
        r = torch.tensor([o.radius for o in objs]).view(-1, 1, 1)
        sdf = torch.empty(u.shape)
        shape_names = [o.shape for o in objs]
        for name in set(shape_names):
            m = torch.tensor([s == name for s in shape_names])
            sdf[m] = _SDF[name](u[m] / r[m], -v[m] / r[m]) * r[m]   # SDFs take y up
        alpha = (0.5 - sdf / px).clamp_(0, 1).unsqueeze(1)   # [m, 1, S, S] pixel coverage
        interior = alpha                                     # coverage of the shape shrunk by the outline
        if cfg.outline:
            interior = (0.5 - (sdf + OUTLINE_WIDTH) / px).clamp_(0, 1).unsqueeze(1)
        base = torch.tensor([PALETTE[o.colour] for o in objs], dtype=torch.float32).div(255).view(-1, 3, 1, 1)
        fill = base.expand(-1, -1, *sdf.shape[1:])
        if cfg.hatch:  # diagonal lines across the object (in its rotated frame), 40% duty, darken 30%
            fill = fill * (1 - 0.3 * self._hatch(u, v, px)).unsqueeze(1)
        if cfg.shading:  # light from the top left: up to 25% towards white there, towards black opposite
            light = (-(dx + dy) / (math.sqrt(2) * r)).clamp(-1, 1).mul(0.25).unsqueeze(1)  # [m, 1, S, S]
            fill = torch.where(light > 0, fill + (1 - fill) * light, fill * (1 + light))
        return alpha, interior, fill, base * 0.3

    @staticmethod
    def _hatch(u, v, px):
        """Hatch line coverage in [0, 1], [m, S, S]: box-filtered lines, faded to their mean (0.4) where
        the period is under 3 px, so a base render shows the average tone instead of aliasing."""
        period, half = HATCH_PERIOD, 0.2 * HATCH_PERIOD
        s = (u + v) * (1 / math.sqrt(2))
        d = ((s / period) % 1.0 - 0.5).abs() * period        # distance to the nearest line centre
        w = px * math.sqrt(2) / 2                            # half the pixel's extent across the lines
        cover = (((d + w).clamp(max=half) - (d - w).clamp(min=-half)) / (2 * w)).clamp(0, 1)
        fade = min(max(period / px - 2.0, 0.0), 1.0)         # 0 below 2 px per period (Nyquist), 1 above 3
        mean = 2 * half / period
        return mean + fade * (cover - mean)

    def _text_cover(self, scenes, crops, res):
        """Ink coverage of each scene's word on its first object: (xs, ys, offsets) of its window (see
        `_windows`) and the coverage there, [t, 1, W, W].

        The word is a grid of font cells (7 rows, 6 columns per letter) centred on the object, rotated
        with it, 1.3 radii wide. A pixel's coverage is the exact area of the on-cells under its footprint
        (a square of side px, axis-aligned in the text frame): per row, the difference of the row's
        cumulative sum at the footprint's two edges. Sharp at x16, a soft grey smear at base.
        """
        objs = [s.objects[0] for s in scenes]
        maps = [_word_bitmap(_check_word(s.text)) for s in scenes]
        width, px = max(m.shape[1] for m in maps), 1.0 / res
        bits = torch.zeros(len(maps), 7, width)
        for i, m in enumerate(maps):
            bits[i, :, :m.shape[1]] = m
        cum = F.pad(bits.cumsum(2), (1, 0))                   # [t, 7, W + 1]: cum[..., j] = sum of cells < j
        ncols = torch.tensor([m.shape[1] for m in maps], dtype=torch.float32)
        r = torch.tensor([o.radius for o in objs])
        cell = torch.minimum(1.3 * r / ncols, 0.09 * r)                  # frame units per font cell
        extent = cell * torch.sqrt((ncols / 2) ** 2 + 3.5 ** 2)          # half-diagonal of the text box
        xs, ys, offsets = _windows([o.centre for o in objs], extent.tolist(), crops, res)
        u, v, _, _ = self._local(objs, xs, ys)
        cell = cell.view(-1, 1, 1)
        tx = u / cell + ncols.view(-1, 1, 1) / 2                     # text coordinates in cells
        ty = v / cell + 3.5
        half = px / cell / 2                                         # footprint half-side in cells

        def integral(row, t):  # integral of row `row` of the bitmap from 0 to t, [t, S, S]
            t = t.clamp(0, width)
            j = t.floor().clamp(max=width - 1)
            flat = j.long().flatten(1)
            c = cum[:, row].gather(1, flat).view(t.shape)
            b = bits[:, row].gather(1, flat).view(t.shape)
            return c + b * (t - j)

        cover = torch.zeros(u.shape)
        lo_x, hi_x = tx - half, tx + half
        for row in range(7):
            wy = ((ty + half).clamp(max=row + 1) - (ty - half).clamp(min=row)).clamp(min=0)
            if bool((wy > 0).any()):
                cover += wy * (integral(row, hi_x) - integral(row, lo_x))
        return xs, ys, offsets, (cover / (2 * half) ** 2).clamp(0, 1).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------

class ToyDataset:
    """The first `size` scenes of one split: items are dict(image=uint8 [3, R, R], caption, scene)."""

    def __init__(self, world: ToyWorld, split: str, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise DataError(f"dataset size {size!r} must be an int >= 0")
        self.world, self.split, self.size = world, split, size
        self._scenes = None
        self._images = None   # the base-resolution render, kept once made (20000 x 3 x 32 x 32 = 61 MB)

    def __len__(self):
        return self.size

    def __repr__(self):
        return f"ToyDataset(split={self.split!r}, size={self.size}, resolution={self.world.cfg.resolution})"

    def scenes(self) -> list[Scene]:
        if self._scenes is None:
            self._scenes = self.world.scenes(range(self.size), self.split)
        return self._scenes

    def captions(self) -> list[str]:
        return [s.caption for s in self.scenes()]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for a {self.split} dataset of {self.size} scenes")
        i %= self.size
        scene = self.scenes()[i]
        image = self._images[i] if self._images is not None else self.world.render([scene])[0]
        return {"image": image, "caption": scene.caption, "scene": scene}

    def images(self, resolution: int | None = None, batch_size: int = 1024, progress: bool = False) -> torch.Tensor:
        """Every scene rendered: uint8 `[N, 3, R, R]` (the base render is cached; do not modify it in place)."""
        res = resolution or self.world.cfg.resolution
        base = res == self.world.cfg.resolution
        if base and self._images is not None:
            return self._images
        scenes = self.scenes()
        out = torch.empty(len(scenes), 3, res, res, dtype=torch.uint8)
        for a in tqdm(range(0, len(scenes), batch_size), disable=not progress, desc=f"render {self.split}"):
            out[a:a + batch_size] = self.world.render(scenes[a:a + batch_size], res)
        if base:
            self._images = out
        return out


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] in [0, 255] -> float32 in [-1, 1] (the models' convention)."""
    if images.dtype != torch.uint8:
        raise DataError(f"to_float expects uint8 images, got {images.dtype}: a float image is probably "
                        f"already in [-1, 1]")
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [..., 3, H, W] in [-1, 1] -> uint8 in [0, 255] (clipped, rounded)."""
    if not images.is_floating_point():
        raise DataError(f"to_uint8 expects float images in [-1, 1], got {images.dtype}")
    return images.detach().float().add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def benchmark(cfg: DataConfig | None = None, n: int = 2000, resolution: int | None = None) -> dict:
    """Scenes per second: generating `n` train scenes and rendering them (one batch), this machine."""
    world = ToyWorld(cfg or DataConfig.toy())
    t0 = time.perf_counter()
    scenes = world.scenes(range(n))
    t1 = time.perf_counter()
    world.render(scenes, resolution)
    t2 = time.perf_counter()
    return {"scenes_per_s": n / (t2 - t0), "generate_s": t1 - t0, "render_s": t2 - t1, "n": n,
            "resolution": resolution or world.cfg.resolution, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# real image-caption data (GPU presets)
# ---------------------------------------------------------------------------------------------

def load_image(path, resolution: int) -> torch.Tensor:
    """An image file -> RGB, centre-cropped to a square, resized: uint8 [3, R, R]."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist: fix the file name in the captions file or add "
                        f"the image")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}): replace it with a valid "
                        f"PNG/JPEG or remove its line from the captions file") from e
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class _ImageCaptions:
    """Shared by the real-data loaders: a list of (image path, caption) read lazily."""

    def __init__(self, items, resolution: int):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise DataError(f"resolution {resolution!r} must be a positive int (e.g. 64)")
        self.items, self.resolution = items, resolution

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, caption = self.items[i]
        return {"image": load_image(path, self.resolution), "caption": caption, "scene": None}

    def captions(self) -> list[str]:
        return [c for _, c in self.items]

    def scenes(self) -> list:
        return [None] * len(self.items)

    def images(self, resolution: int | None = None, batch_size: int = 1024, progress: bool = False) -> torch.Tensor:
        """Every image loaded: uint8 `[N, 3, R, R]` (`batch_size` is accepted for ToyDataset's signature)."""
        res = resolution or self.resolution
        out = torch.empty(len(self.items), 3, res, res, dtype=torch.uint8)
        for i, (path, _) in enumerate(tqdm(self.items, disable=not progress, desc="load images")):
            out[i] = load_image(path, res)
        return out


def _check_caption(caption, where: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"empty caption at {where}: write a caption or remove the line")
    return caption.strip()


class ImageCaptionFolder(_ImageCaptions):
    """A folder of images with `captions.jsonl` ({"file": "a.png", "caption": "..."} per line) or
    `captions.csv` (header `file,caption`). Items: dict(image=uint8 [3, R, R], caption, scene=None)."""

    def __init__(self, root, captions_file: str | None = None, resolution: int = 64):
        root = Path(root)
        if captions_file is None:
            found = [root / n for n in ("captions.jsonl", "captions.csv") if (root / n).is_file()]
            if not found:
                raise DataError(f"no captions file in {root}: create captions.jsonl with lines like "
                                f'{{"file": "a.png", "caption": "a red circle"}} (or captions.csv with '
                                f"columns file,caption)")
            path = found[0]
        else:
            path = Path(captions_file) if Path(captions_file).is_absolute() else root / captions_file
            if not path.is_file():
                raise DataError(f"captions file {path} does not exist: check the path, or create it "
                                f"(captions.jsonl or captions.csv)")
        rows = self._read_csv(path) if path.suffix.lower() == ".csv" else self._read_jsonl(path)
        if not rows:
            raise DataError(f"{path} lists no images: add one line per (image, caption)")
        items = []
        for where, file, caption in rows:
            image = root / file
            if not image.is_file():
                raise DataError(f"{where} names {file!r}, but {image} does not exist: fix the name or add "
                                f"the image")
            items.append((image, _check_caption(caption, where)))
        super().__init__(items, resolution)

    @staticmethod
    def _read_jsonl(path):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e.msg}): write one object per line, "
                                f'{{"file": "a.png", "caption": "..."}}') from e
            if not isinstance(d, dict) or "file" not in d or "caption" not in d:
                raise DataError(f'{where} needs the keys "file" and "caption", e.g. '
                                f'{{"file": "a.png", "caption": "a red circle"}}')
            rows.append((where, str(d["file"]), d["caption"]))
        return rows

    @staticmethod
    def _read_csv(path):
        rows = []
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"file", "caption"} <= set(reader.fieldnames):
                raise DataError(f"{path} needs a header line with the columns file,caption (found "
                                f"{reader.fieldnames}): add 'file,caption' as the first line")
            for d in reader:
                where = f"{path} line {reader.line_num}"
                if None in d or d["file"] is None or d["caption"] is None:
                    raise DataError(f"{where} does not have exactly the columns file,caption: quote a "
                                    f'caption that holds commas ("a red, round circle")')
                rows.append((where, d["file"], d["caption"]))
        return rows


class CocoCaptions(_ImageCaptions):
    """COCO-style captions: `images[{id, file_name}]`, `annotations[{image_id, caption}]`; one item per
    annotation. Items: dict(image=uint8 [3, R, R], caption, scene=None)."""

    def __init__(self, images_dir, annotations_json, resolution: int = 64):
        images_dir, path = Path(images_dir), Path(annotations_json)
        if not path.is_file():
            raise DataError(f"annotations file {path} does not exist: download or point to COCO's "
                            f"captions_train2017.json (or a file of the same layout)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}): re-download or fix it") from e
        if not isinstance(d, dict) or not isinstance(d.get("images"), list) \
                or not isinstance(d.get("annotations"), list):
            raise DataError(f'{path} needs the lists "images" [{{id, file_name}}] and "annotations" '
                            f"[{{image_id, caption}}] (the COCO captions layout)")
        try:
            files = {im["id"]: im["file_name"] for im in d["images"]}
        except (KeyError, TypeError) as e:
            raise DataError(f'{path}: every entry of "images" needs "id" and "file_name"') from e
        items, checked = [], {}
        for n, a in enumerate(d["annotations"]):
            where = f"{path} annotation {n}"
            if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
                raise DataError(f'{where} needs "image_id" and "caption"')
            if a["image_id"] not in files:
                raise DataError(f"{where} refers to image_id {a['image_id']!r}, which is not in \"images\": "
                                f"fix the id or add the image entry")
            image = images_dir / files[a["image_id"]]
            if image not in checked:
                checked[image] = image.is_file()
            if not checked[image]:
                raise DataError(f"{where}: image file {image} does not exist: check images_dir "
                                f"({images_dir}) or add the image")
            items.append((image, _check_caption(a["caption"], where)))
        if not items:
            raise DataError(f"{path} has no annotations: nothing to train on")
        super().__init__(items, resolution)
