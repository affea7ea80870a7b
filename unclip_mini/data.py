"""The data: a procedurally generated image-caption toy world (and, for the GPU presets, real data).

unCLIP (Ramesh et al. 2022) trains its stages on ~650M image-text pairs. A course on two CPU cores
cannot, so its stages train on a generated world where every image comes with its ground truth:

    "a large red circle in the top left"            one object: colour, shape, size, one of 4 cells
    "a red circle left of a blue triangle"          two objects in one row or column, with a relation

What the caption leaves out is what unCLIP's latents can vary: the rotation (up to `max_rotation_deg`),
the exact position (`jitter`), and fine detail that only shows at high resolution: a thin outline, a
diagonal hatch finer than a base pixel, soft shading. The same scene renders at any resolution (base,
x4, x16 for the two upsamplers; `render.py` draws it), so the upsamplers can be trained and checked
against the truth.

The splits test compositional generalisation: (colour, shape) pairs in `heldout_pairs` never occur in
'train' or 'val', and every 'heldout' scene contains one. A scene is a pure function of
(seed, split, index), identical on every machine. With probability `p_text` a single-object train/val scene
has its shape's name written across it, in a 3x5 font with one base pixel per font cell, so the word is
legible at the base resolution: the toy CLIP can learn to read it, which the typographic attack of unCLIP §4
(Figure 6: an apple labelled "iPod") needs.

This module also holds the world's semantics: what a caption states about a scene (`caption_facts`) and
so which images a caption describes (`describes`, `caption_match_matrix`), used wherever a generated
image or embedding is scored against its caption, and the captions that differ from a true one in a
single binding (`hard_negative_caption`, the CLIP's hard negatives). `open_dataset` returns a split of the
configured source: the toy world, or a real image-caption folder / COCO captions file (`real_data.py`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import numpy as np
import torch

from . import render as _render
from .config import PresetConfig, check, check_choice, check_positive, check_range
from .errors import DataError
from .progress import tqdm
from .render import PALETTE, SHAPES

# ---------------------------------------------------------------------------------------------
# the world's vocabulary
# ---------------------------------------------------------------------------------------------

SIZES = {"small": (0.18, 0.13), "medium": (0.22, 0.155), "large": (0.26, 0.18)}  # radius: (alone, in a pair)
CELLS = ("top left", "top right", "bottom left", "bottom right")  # cell (row, col) -> CELLS[2 * row + col]
CENTRES = {1: (0.30, 0.70), 2: (0.26, 0.74)}  # cell centre coordinates (frame units) for 1 / 2 objects
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPLITS = ("train", "val", "heldout")

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
    p_text: float = 0.3                                 # fraction of single-object train/val scenes with their shape's name written on
    text_in_caption: bool = False                       # also say the written word in the caption
    heldout_pairs: tuple[tuple[str, str], ...] = TOY_HELDOUT  # (colour, shape) pairs never in train/val
    train_size: int = 20000                             # scenes in the train split (paper: ~650M real pairs)
    val_size: int = 2000                                # scenes in the val split (same distribution as train)
    heldout_size: int = 2000                            # scenes in the heldout split (each has a held-out pair)
    outline: bool = True                                # thin dark outline (~0.4 px at base, 6 px at x16)
    hatch: bool = True                                  # fine diagonal hatch (below a base pixel, crisp at x16)
    shading: bool = True                                # soft light from the top left (visible at every size)
    source: str = "toy"                                 # 'toy' (generated) | 'folder' | 'coco' (real_data.py; paper: real)
    root: str | None = None                             # real data: the image folder
    captions: str | None = None                         # real data: captions.jsonl/.csv (folder) or COCO's JSON

    def __post_init__(self):
        check_choice(self, "source", ("toy", "folder", "coco"))
        if self.source != "toy":
            check(isinstance(self.root, str) and bool(self.root), self, "root",
                  f"source={self.source!r} reads images from a folder: set root='/path/to/images'")
            check(self.source == "folder" or isinstance(self.captions, str), self, "captions",
                  "source='coco' needs the annotations file: captions='/path/to/captions_train2017.json'")
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


def hard_negative_caption(scene, allowed_pairs, choice: float) -> str | None:
    """A caption that is false of a two-object `scene` in one binding only, or None (one object, real data).

    What a bag-of-words text model cannot tell apart: the same words with the two colours swapped between
    the objects, the two shapes swapped, or the relation reversed ("left of" -> "right of"). `choice` in
    [0, 1) picks which; a swap that would make a (colour, shape) pair outside `allowed_pairs` (a held-out
    pair, say) falls back to reversing the relation, and a template that states no relation gives None then.
    CLIP training uses these as extra negatives of the image (NegCLIP, Yuksekgonul et al. 2023).
    """
    if scene is None or len(scene.objects) != 2:
        return None
    a, b = scene.objects
    kind = int(choice * 3)
    swapped = None
    if kind == 0 and a.colour != b.colour:
        swapped = (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
    elif kind == 1 and a.shape != b.shape:
        swapped = (dataclasses.replace(a, shape=b.shape), dataclasses.replace(b, shape=a.shape))
    if swapped is not None and all((o.colour, o.shape) in allowed_pairs for o in swapped):
        return make_caption(swapped, scene.relation, scene.template)
    tpl = PAIR_TEMPLATES[scene.template]
    if "{rel}" not in tpl and "{inv}" not in tpl:
        return None
    return make_caption(scene.objects, RELATIONS[scene.relation], scene.template)


# ---------------------------------------------------------------------------------------------
# semantics: what a caption states, and which images it describes
# ---------------------------------------------------------------------------------------------

def scene_key(scene) -> tuple:
    """What a toy scene shows apart from rotation and jitter: its objects' cell, colour, shape, size."""
    return tuple(sorted((tuple(o.cell), o.colour, o.shape, o.size) for o in scene.objects))


def caption_facts(scene, template: int | None = None) -> tuple:
    """What a toy caption of `scene` states, canonically (the scene's own template, or `template`).

    The single-object templates may leave out the size and the cell; the two-object ones may leave out
    the sizes and the relation ("A right of B" is stated as "B left of A"). A written word is not a fact
    the caption states about the objects.
    """
    template = scene.template if template is None else template
    objs = scene.objects
    if len(objs) == 1:
        tpl, o = SINGLE_TEMPLATES[template], objs[0]
        return (1, o.colour, o.shape, o.size if "{size}" in tpl else None,
                tuple(o.cell) if "{cell}" in tpl else None)
    tpl = PAIR_TEMPLATES[template]
    a, b = ((o.colour, o.shape, o.size if "{size_a}" in tpl else None) for o in objs)
    if "{rel}" not in tpl and "{inv}" not in tpl:
        return (2, *sorted([a, b]), None)
    rel = scene.relation
    if rel in ("right of", "below"):
        a, b, rel = b, a, RELATIONS[rel]
    return (2, a, b, rel)


def describes(caption_scene: "Scene", scenes) -> torch.Tensor:
    """Which `scenes` the caption of `caption_scene` is also true of `[N]` bool: every fact it states holds.

    In this world a caption like "a red circle" fits many images: scene j fits when its own ground truth,
    read through the caption's template, gives the same facts.
    """
    want, k, t = caption_facts(caption_scene), len(caption_scene.objects), caption_scene.template
    return torch.tensor([len(s.objects) == k and caption_facts(s, t) == want for s in scenes], dtype=torch.bool)


def caption_match_matrix(scenes) -> torch.Tensor:
    """`[N, N]` bool: [i, j] True where image j fits caption i (`describes`, for every pair at once)."""
    n = len(scenes)
    out = torch.zeros(n, n, dtype=torch.bool)
    counts = torch.tensor([len(s.objects) for s in scenes])
    for (k, tpl) in {(len(s.objects), s.template) for s in scenes}:
        rows = [i for i, s in enumerate(scenes) if len(s.objects) == k and s.template == tpl]
        cols = (counts == k).nonzero().flatten().tolist()
        facts = {j: caption_facts(scenes[j], tpl) for j in cols}  # every k-object scene read through this template
        for i in rows:
            out[i, cols] = torch.tensor([facts[j] == facts[i] for j in cols])
    return out


def same_scene_matrix(scenes) -> torch.Tensor:
    """`[N, N]` bool: True where two scenes differ only in what captions never say (rotation, jitter)."""
    keys = [scene_key(s) for s in scenes]
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    v = torch.tensor([ids[k] for k in keys])
    return v[:, None] == v[None, :]


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
        text = objects[0].shape if split != "heldout" and not two and u[14] < cfg.p_text else None
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
            _render.check_word(word)
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
        """Render scenes: uint8 `[N, 3, S, S]` (S = resolution, or the crop's size; see `render.render`).

        resolution: px of the full frame (None: the config's base resolution; x4 / x16 for upsamplers).
        crop: (top, left, size) in px of that resolution, one for all scenes or a list with one per scene;
            the result equals slicing the full render, without rendering the rest.
        """
        return _render.render(self.cfg, scenes, resolution, crop, max_pixels)


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


def open_dataset(cfg: DataConfig, split: str, world: "ToyWorld | None" = None):
    """Split `split` of the configured source: a `ToyDataset`, or a real loader (`real_data.py`).

    A real source has 'train' and 'val' (every 20th item, by position in its captions file) and no
    'heldout' split: held-out compositions exist only in the toy world.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if cfg.source == "toy":
        return (world or ToyWorld(cfg)).dataset(split)
    from .real_data import CocoCaptions, ImageCaptionFolder
    if split == "heldout":
        raise DataError(f"a real data source ({cfg.source}) has no 'heldout' split (held-out colour-shape pairs "
                        f"exist only in the toy world): evaluate on 'val'")
    full = (ImageCaptionFolder(cfg.root, cfg.captions, cfg.resolution) if cfg.source == "folder"
            else CocoCaptions(cfg.root, cfg.captions, cfg.resolution))
    keep = [i for i in range(len(full)) if (i % 20 == 0) == (split == "val")]
    return full.subset(keep)
