"""The toy world's renderer: scenes -> pixels at any resolution, analytically (no rasteriser).

Each shape is a signed distance function (SDF, after Inigo Quilez's 2D SDFs) and a pixel's coverage is
`clamp(0.5 - sdf / pixel, 0, 1)`, so edges are anti-aliased at every size. Detail finer than ~2 pixels is
faded to its mean (the hatch), so a base render is band-limited and close to the area-average of a x16
render: the upsamplers' targets are the same scene rendered larger. Words are drawn with a 3x5 bitmap font,
one font cell per base pixel (legible at the base resolution), by exact area coverage. Only a window around each object is computed, so the cost follows the objects'
area, not the frame's.

`render(cfg, scenes, resolution, crop)` is what `data.ToyWorld.render` calls (`cfg` is a `data.DataConfig`:
its base resolution and the outline / hatch / shading switches). `PALETTE` and `SHAPES` are the names a
world's vocabulary may use.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

PALETTE = {  # name -> RGB, chosen to stay distinct under shading and at 16 px
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 205, 30), "green": (40, 165, 60),
    "cyan": (30, 190, 210), "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (245, 130, 190),
    "brown": (135, 80, 35), "gray": (125, 125, 125),
}
BACKGROUND = (236, 234, 228)  # a light warm grey
INK = (25, 25, 25)            # the colour of written text
LABEL = (250, 249, 244)       # the paper label a word is printed on (one base pixel of margin)
OUTLINE_WIDTH = 0.012         # frame units: 0.4 px at 32 px, 6 px at 512 px
HATCH_PERIOD = 0.025          # frame units: 0.8 px at 32 px (faded to its mean), 3.2 px at x4, 12.8 at x16
MAX_WORD = 12                 # longest word a scene may carry
RENDER_THREADS = 1            # torch threads while rendering (None: leave torch's setting)


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
SHAPES = tuple(_SDF)  # every shape name the renderer can draw

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
# a 3x5 bitmap font for a-z: words written on objects, legible at the base resolution
# ---------------------------------------------------------------------------------------------

_GLYPHS = """
a .#. #.# ### #.# #.#
b ##. #.# ##. #.# ##.
c .## #.. #.. #.. .##
d ##. #.# #.# #.# ##.
e ### #.. ##. #.. ###
f ### #.. ##. #.. #..
g .## #.. #.# #.# .##
h #.# #.# ### #.# #.#
i ### .#. .#. .#. ###
j ..# ..# ..# #.# .#.
k #.# #.# ##. #.# #.#
l #.. #.. #.. #.. ###
m #.# ### ### #.# #.#
n ##. #.# #.# #.# #.#
o .#. #.# #.# #.# .#.
p ##. #.# ##. #.. #..
q .#. #.# #.# ##. .##
r ##. #.# ##. #.# #.#
s .## #.. .#. ..# ##.
t ### .#. .#. .#. .#.
u #.# #.# #.# #.# ###
v #.# #.# #.# #.# .#.
w #.# #.# ### ### #.#
x #.# #.# .#. #.# #.#
y #.# #.# .#. .#. .#.
z ### ..# .#. #.. ###
"""
FONT = {line.split()[0]: torch.tensor([[c == "#" for c in row] for row in line.split()[1:]])
        for line in _GLYPHS.strip().splitlines()}  # letter -> bool [5, 3] (capital forms: legible in 3x5)
assert sorted(FONT) == [chr(c) for c in range(97, 123)] and all(g.shape == (5, 3) for g in FONT.values())
FONT_ROWS = 5


def _word_bitmap(word: str) -> torch.Tensor:
    """The word's pixels in font cells: float [5, 4 * len - 1] (one empty column between letters)."""
    cols = []
    for i, ch in enumerate(word):
        if i:
            cols.append(torch.zeros(FONT_ROWS, 1, dtype=torch.bool))
        cols.append(FONT[ch])
    return torch.cat(cols, dim=1).float()


def check_word(word) -> str:
    if not isinstance(word, str) or not re.fullmatch(f"[a-z]{{1,{MAX_WORD}}}", word):
        raise DataError(f"cannot write {word!r} on an object: the font has lowercase a-z only and a word "
                        f"holds 1 to {MAX_WORD} letters; pass e.g. 'star'")
    return word


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------


def render(cfg, scenes, resolution: int | None = None, crop=None, max_pixels: int = 1 << 20) -> torch.Tensor:
    """Render scenes: uint8 `[N, 3, S, S]` (S = resolution, or the crop's size).

    resolution: px of the full frame (None: the config's base resolution; x4 / x16 for upsamplers).
    crop: (top, left, size) in px of that resolution, one for all scenes or a list with one per scene;
        the result equals slicing the full render, without rendering the rest.
    max_pixels: work in chunks of about this many object-pixels (memory bound at high resolution).
    """
    if not isinstance(scenes, (list, tuple)):  # one Scene
        scenes = [scenes]
    scenes = list(scenes)
    res = cfg.resolution if resolution is None else resolution
    if isinstance(res, np.integer):
        res = int(res)
    if isinstance(res, bool) or not isinstance(res, int) or res < 1:
        raise DataError(f"resolution {res!r} must be a positive int (e.g. {cfg.resolution} or "
                        f"{4 * cfg.resolution})")
    crops = _crops(crop, len(scenes), res)
    size = crops[0][2] if crops else res
    out = torch.empty(len(scenes), 3, size, size, dtype=torch.uint8)
    step = max(1, max_pixels // (2 * size * size))
    threads = torch.get_num_threads()
    # many small tensor ops: two threads gain little, and lose many-fold when another process holds a core
    torch.set_num_threads(RENDER_THREADS or threads)
    try:
        for a in range(0, len(scenes), step):
            out[a:a + step] = _render_chunk(cfg, scenes[a:a + step], res, crops[a:a + step], size)
    finally:
        torch.set_num_threads(threads)
    return out


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


def _render_chunk(cfg, scenes, res, crops, size):
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
        alpha, interior, fill, ink = _object_layers(cfg, objs, xs, ys, px)
        w = xs.shape[1]
        for j, (i, (r0, c0)) in enumerate(zip(idx, offsets)):
            # "over" compositing, linear in the coverages (so area-averaging commutes with rendering);
            # the outline is the band between the silhouette and the interior
            view = img[i, :, r0:r0 + w, c0:c0 + w]
            view.mul_(1 - alpha[j]).add_(ink[j] * (alpha[j] - interior[j])).add_(fill[j] * interior[j])
    texts = [i for i, s in enumerate(scenes) if s.text]
    if texts:
        xs, ys, offsets, cover, label = _text_cover(cfg, [scenes[i] for i in texts], [crops[i] for i in texts], res)
        w = xs.shape[1]
        ink = torch.tensor(INK, dtype=torch.float32).div(255).view(3, 1, 1)
        paper = torch.tensor(LABEL, dtype=torch.float32).div(255).view(3, 1, 1)
        for j, (i, (r0, c0)) in enumerate(zip(texts, offsets)):
            view = img[i, :, r0:r0 + w, c0:c0 + w]
            view.mul_(1 - label[j]).add_(paper * label[j])                    # the label hides what is under it
            view.mul_(1 - cover[j]).add_(ink * cover[j])
    return img.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def _local(objs, xs, ys):
    """Object-frame coordinates: rotated offsets (u, v) and unrotated (dx, dy), [m, S, S] each."""
    t = torch.tensor([[o.centre[0], o.centre[1], math.radians(o.rotation)] for o in objs])
    dx = xs[:, None, :] - t[:, 0, None, None]   # [m, 1, S]
    dy = ys[:, :, None] - t[:, 1, None, None]   # [m, S, 1]
    c, s = torch.cos(t[:, 2]).view(-1, 1, 1), torch.sin(t[:, 2]).view(-1, 1, 1)
    u = c * dx + s * dy                         # rotating the frame by -angle turns the shape clockwise
    v = -s * dx + c * dy
    return u, v, dx, dy


def _object_layers(cfg, objs, xs, ys, px):
    """Per object: coverage and interior coverage [m, 1, S, S], fill colour [m, 3, S, S], outline
    colour [m, 3, 1, 1] (the object's colour, darkened)."""
    u, v, dx, dy = _local(objs, xs, ys)
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
        fill = fill * (1 - 0.3 * _hatch(u, v, px)).unsqueeze(1)
    if cfg.shading:  # light from the top left: up to 25% towards white there, towards black opposite
        light = (-(dx + dy) / (math.sqrt(2) * r)).clamp(-1, 1).mul(0.25).unsqueeze(1)  # [m, 1, S, S]
        fill = torch.where(light > 0, fill + (1 - fill) * light, fill * (1 + light))
    return alpha, interior, fill, base * 0.3


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


def word_box(cfg, scene) -> tuple[int, int, int]:
    """Where the scene's word goes, in base pixels: (left, top, width). One font cell is one base pixel and
    the box sits on whole pixels, centred on the first object, moved inside the frame when it would stick
    out (a word wider than the frame is centred and cut at the edges)."""
    o, res = scene.objects[0], cfg.resolution
    width = 4 * len(scene.text) - 1
    left = round(o.centre[0] * res - width / 2)
    top = round(o.centre[1] * res - FONT_ROWS / 2)
    left = (res - width) // 2 if width > res else min(max(left, 0), res - width)
    return left, min(max(top, 0), res - FONT_ROWS), width


def _text_cover(cfg, scenes, crops, res):
    """Ink coverage of each scene's word: (xs, ys, offsets) of its window (see `_windows`) and the
    coverage there, [t, 1, W, W].

    The word is a grid of font cells, one base pixel each, axis-aligned and on whole base pixels (`word_box`),
    so at the base resolution every letter is 3x5 crisp pixels and a x4 / x16 render shows the same letters
    larger; it is printed on a paper label one cell wider on every side (like the paper's apple labelled
    "iPod"), which hides the object under it. A pixel's coverage is the exact area of the on-cells under its
    footprint: per row, the difference of the row's cumulative sum at the footprint's two edges. Returns the
    ink's coverage and the label's, both `[t, 1, W, W]`.
    """
    maps = [_word_bitmap(check_word(s.text)) for s in scenes]
    width, px, cell = max(m.shape[1] for m in maps), 1.0 / res, 1.0 / cfg.resolution
    bits = torch.zeros(len(maps), FONT_ROWS, width)
    for i, m in enumerate(maps):
        bits[i, :, :m.shape[1]] = m
    cum = F.pad(bits.cumsum(2), (1, 0))                   # [t, 5, W + 1]: cum[..., j] = sum of cells < j
    boxes = [word_box(cfg, s) for s in scenes]
    origin = torch.tensor([[left * cell, top * cell] for left, top, _ in boxes])          # top-left, frame units
    centres = [(x + w * cell / 2, y + FONT_ROWS * cell / 2) for (x, y), (_, _, w) in zip(origin.tolist(), boxes)]
    extents = [cell * math.hypot(w / 2 + 1, FONT_ROWS / 2 + 1) for _, _, w in boxes]    # the label's corners
    xs, ys, offsets = _windows(centres, extents, crops, res)
    tx = (xs[:, None, :] - origin[:, 0, None, None]) / cell                  # text coordinates in cells [t, 1, S]
    ty = (ys[:, :, None] - origin[:, 1, None, None]) / cell                  # [t, S, 1]
    tx, ty = tx.expand(-1, ys.shape[1], -1), ty.expand(-1, -1, xs.shape[1])
    half = px / cell / 2                                                     # footprint half-side in cells

    def integral(row, t):  # integral of row `row` of the bitmap from 0 to t, [t, S, S]
        t = t.clamp(0, width)
        j = t.floor().clamp(max=width - 1)
        flat = j.long().flatten(1)
        c = cum[:, row].gather(1, flat).view(t.shape)
        b = bits[:, row].gather(1, flat).view(t.shape)
        return c + b * (t - j)

    cover = torch.zeros(tx.shape)
    lo_x, hi_x = tx - half, tx + half
    for row in range(FONT_ROWS):
        wy = ((ty + half).clamp(max=row + 1) - (ty - half).clamp(min=row)).clamp(min=0)
        if bool((wy > 0).any()):
            cover += wy * (integral(row, hi_x) - integral(row, lo_x))
    # the paper label: the word's box grown by one cell on every side, covered by area as well
    ncols = torch.tensor([m.shape[1] for m in maps], dtype=torch.float32).view(-1, 1, 1)
    lx = (torch.minimum(tx + half, ncols + 1) - torch.maximum(tx - half, torch.full_like(tx, -1.0))).clamp(min=0)
    ly = ((ty + half).clamp(max=FONT_ROWS + 1) - (ty - half).clamp(min=-1)).clamp(min=0)
    label = (lx * ly / (2 * half) ** 2).clamp(0, 1).unsqueeze(1)
    return xs, ys, offsets, (cover / (2 * half) ** 2).clamp(0, 1).unsqueeze(1), label
