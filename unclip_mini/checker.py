"""The attribute checker: a small CNN that reads a toy image's ground truth back out of its pixels.

unCLIP (Ramesh et al. 2022, §5) scores samples with FID on MS-COCO, CLIP score and human evaluations.
The toy world has something better than a human rater: the ground truth of every scene. The checker is
trained on rendered scenes to read, for each of the 4 grid cells, whether it is empty and otherwise the
object's colour, shape and size. It turns "does this sample match its caption / its z_i?" into
accuracies: colour, shape, position, and the whole scene (which also tests binding: the red one must be
the circle). It is a stage ("checker") like the paper's components, trained on the train split's renders
plus fresh scenes with the held-out colour-shape pairs (it must read every pair a decoder may draw).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, metrics
from .config import PresetConfig, check_positive, check_range
from .data import CENTRES, PAIR_TEMPLATES, Scene, SceneObject, caption_facts
from .errors import DataError
from .train import StageSpec, TrainConfig

N_CELLS = 4  # the toy world's 2x2 grid: cell index = 2 * row + col (data.CELLS)


@dataclass(frozen=True)
class CheckerConfig(PresetConfig):
    """The attribute checker: a small CNN reading (empty | colour, shape, size) in each grid cell."""
    width: int = 16                  # channels of the first conv (doubled after each of 3 downsamplings)
    hidden: int = 256                # width of the MLP head
    fresh_scenes: int = 8000         # freshly rendered scenes (half 'train'-like, half held-out pairs) added
    noise_aug: float = 0.05          # std of Gaussian noise added to training images ([-1, 1] units)
    p_random_word: float = 0.3       # fresh one-object scenes labelled with a random shape's name (not read as shape)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=400, batch_size=64, lr=2e-3, warmup_steps=40, lr_schedule="cosine", weight_decay=0.0,
        ema_decay=0.99, ckpt_every=200, log_every=10))

    def __post_init__(self):
        check_positive(self, "width", "hidden")
        check_range(self, "fresh_scenes", 0, integer=True)
        check_range(self, "noise_aug", 0.0, 1.0)
        check_range(self, "p_random_word", 0.0, 1.0)

    @classmethod
    def smoke(cls):
        return cls(width=8, hidden=32, fresh_scenes=64,
                   train=TrainConfig(steps=10, batch_size=32, lr=2e-3, warmup_steps=2, ckpt_every=5,
                                     log_every=2, ema_decay=0.9))

    @classmethod
    def toy(cls):
        return cls()

    @classmethod
    def small(cls):
        return cls(width=32, fresh_scenes=20000,
                   train=TrainConfig(steps=3000, batch_size=256, lr=2e-3, warmup_steps=100,
                                     lr_schedule="cosine", ema_decay=0.999, ckpt_every=1000, log_every=50))

    @classmethod
    def paper(cls):
        return cls.small()  # a scorer, not a paper component: the small one reads 64 px scenes


# ---------------------------------------------------------------------------------------------
# the checker
# ---------------------------------------------------------------------------------------------

def _block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class Checker(nn.Module):
    """images [B, 3, H, W] (float in [-1, 1] or uint8) -> per-cell logits for colour, shape, size.

    Each head has one class more than the world's vocabulary: class 0 = empty cell, k = name k-1.
    """

    def __init__(self, cfg: CheckerConfig, colours, shapes, sizes):
        super().__init__()
        self.cfg = cfg
        self.colours, self.shapes, self.sizes = tuple(colours), tuple(shapes), tuple(sizes)
        w = cfg.width
        self.features = nn.Sequential(
            _block(3, w), nn.MaxPool2d(2),                          # [B, w, H/2, W/2]
            _block(w, 2 * w), nn.MaxPool2d(2),                      # H/4
            _block(2 * w, 4 * w), nn.MaxPool2d(2),                  # H/8
            _block(4 * w, 8 * w), nn.AdaptiveAvgPool2d(4))          # [B, 8w, 4, 4] at any resolution
        self.n_classes = (len(self.colours) + 1, len(self.shapes) + 1, len(self.sizes) + 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * w * 16, cfg.hidden), nn.SiLU(),
                                  nn.Linear(cfg.hidden, N_CELLS * sum(self.n_classes)))

    def forward(self, images) -> dict:
        """dict(colour [B, 4, C+1], shape [B, 4, S+1], size [B, 4, Z+1]) logits."""
        x = _as_float(images)
        out = self.head(self.features(x)).reshape(x.shape[0], N_CELLS, -1)
        colour, shape, size = out.split(self.n_classes, dim=-1)
        return {"colour": colour, "shape": shape, "size": size}

    @torch.no_grad()
    def predict(self, images, batch_size: int = 512) -> dict:
        """dict(colour, shape, size) LongTensors [B, 4] (0 = empty cell, k = the k-1-th name)."""
        dev = next(self.parameters()).device
        outs = [self(chunk.to(dev)) for chunk in images.split(batch_size)]
        return {k: torch.cat([o[k] for o in outs]).argmax(-1).cpu() for k in ("colour", "shape", "size")}

    def targets(self, scenes) -> dict:
        """Ground truth per cell from scenes: dict(colour, shape, size) LongTensors [N, 4] (0 = empty)."""
        return scene_targets(scenes, self.colours, self.shapes, self.sizes)


def scene_targets(scenes, colours, shapes, sizes) -> dict:
    """Ground truth per cell: dict(colour, shape, size) LongTensors [N, 4] (0 = empty, k = name k-1)."""
    out = {k: torch.zeros(len(scenes), N_CELLS, dtype=torch.long) for k in ("colour", "shape", "size")}
    for i, s in enumerate(scenes):
        for o in s.objects:
            c = 2 * int(o.cell[0]) + int(o.cell[1])
            for key, names, value in (("colour", colours, o.colour), ("shape", shapes, o.shape),
                                      ("size", sizes, o.size)):
                if value not in names:
                    raise DataError(f"the checker knows the {key}s {', '.join(names)}, not {value!r}: "
                                    f"train a checker on this world (stage 'checker')")
                out[key][i, c] = list(names).index(value) + 1
    return out


def _as_float(images) -> torch.Tensor:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise DataError(f"images must be [B, 3, H, W] (uint8, or float in [-1, 1]), got {shape}")
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()


def attribute_accuracy(checker: Checker, images, scenes) -> dict:
    """How well images match their scenes, read by the checker: fractions in [0, 1].

    colour / shape / size: per object, counting each image's predicted names against its true names as
    multisets (a red circle drawn in the wrong cell still has the right colour); position: per object,
    its cell holds a predicted object; count: per image, the number of objects is right; all: per
    image, every cell's (empty | colour, shape) is right, so position, count and binding are right too.
    images: [N, 3, H, W]; scenes: N data.Scene.
    """
    if len(images) != len(scenes):
        raise DataError(f"{len(images)} images but {len(scenes)} scenes: pass one scene per image")
    if len(scenes) == 0:
        raise DataError("attribute_accuracy needs at least one image")
    pred, true = checker.predict(images), checker.targets(scenes)
    occupied_pred, occupied_true = pred["colour"] > 0, true["colour"] > 0
    n_objects = int(occupied_true.sum())
    out = {}
    for key in ("colour", "shape", "size"):
        matched = 0
        for i in range(len(scenes)):
            p = torch.bincount(pred[key][i][occupied_pred[i]], minlength=len(getattr(checker, key + "s")) + 1)
            t = torch.bincount(true[key][i][occupied_true[i]], minlength=p.numel())
            matched += int(torch.minimum(p, t).sum())
        out[key] = matched / n_objects
    out["position"] = float((occupied_pred & occupied_true).sum()) / n_objects
    out["count"] = float((occupied_pred.sum(1) == occupied_true.sum(1)).float().mean())
    exact = (pred["colour"] == true["colour"]) & (pred["shape"] == true["shape"])
    out["all"] = float(exact.all(dim=1).float().mean())
    out["n_images"], out["n_objects"] = len(scenes), n_objects
    return out


def read_scenes(checker: Checker, images, templates=None) -> list:
    """What the checker sees in each image, as a `data.Scene`: an object per occupied cell (colour, shape, size,
    cell); for two objects in one row or column, their relation. `templates` (one per image) set the scene's
    caption template, so that `data.caption_facts` can read it the way a caption would."""
    pred = checker.predict(images)
    out = []
    for i in range(len(pred["colour"])):
        cells = [c for c in range(N_CELLS) if int(pred["colour"][i, c]) > 0]
        centres = CENTRES.get(len(cells), CENTRES[2])
        objs = []
        for c in cells:
            cell = divmod(c, 2)                                            # (row, col)
            objs.append(SceneObject(checker.colours[int(pred["colour"][i, c]) - 1],
                                    checker.shapes[max(int(pred["shape"][i, c]), 1) - 1],
                                    checker.sizes[max(int(pred["size"][i, c]), 1) - 1], cell,
                                    (centres[cell[1]], centres[cell[0]]), 0.0, 0.0))
        relation = None
        if len(objs) == 2:
            (ra, ca), (rb, cb) = objs[0].cell, objs[1].cell
            relation = ("left of" if ca < cb else "right of") if ra == rb else \
                (("above" if ra < rb else "below") if ca == cb else None)
        template = 0 if templates is None else templates[i]
        out.append(Scene(tuple(objs), relation, None, "", template))
    return out


def caption_accuracy(checker: Checker, images, scenes) -> dict:
    """How often generated images show what their captions state, read by the checker: fractions in [0, 1].

    A caption such as "a red circle" fixes the colour and the shape and leaves the cell and the size free, so an
    image is scored on what its caption states (`data.caption_facts`), not on its scene's other details.
    all: every stated fact right (the object count, colours and shapes bound to the right objects, and the
    stated relation, size or cell); count: the number of objects; colour / shape: per object, as multisets
    (a red circle drawn as a red square has the right colour); relation: among captions that state one, the
    objects in that relation (with the right colours and shapes); colour_leak / shape_leak: among two-object
    captions whose objects differ in colour (shape) and images read with two objects, how often both objects
    were drawn in one colour (shape), an attribute leaking from one object to the other (the binding failure
    unCLIP §7 reports), with colour_leak_n / shape_leak_n the number of such images. NaN where no image
    qualifies. right: per image, whether every stated fact is right (for `metrics.compare_paired`).
    scenes: the caption's scenes (ground truth).
    """
    if len(images) != len(scenes):
        raise DataError(f"{len(images)} images but {len(scenes)} scenes: pass one scene per image")
    if len(scenes) == 0:
        raise DataError("caption_accuracy needs at least one image")
    seen = read_scenes(checker, images, [s.template for s in scenes])
    counts = {"count": 0, "relation": 0, "relation_n": 0}
    right = []   # per image: every stated fact right ("all" is their mean)
    matched = {"colour": 0, "shape": 0}
    leak = {"colour": [0, 0], "shape": [0, 0]}  # [two-object captions whose objects differ in it, drawn alike]
    n_objects = 0
    for p, s in zip(seen, scenes):
        same_count = len(p.objects) == len(s.objects)
        ok = same_count and caption_facts(p, s.template) == caption_facts(s)
        right.append(bool(ok))
        counts["count"] += same_count
        for key in matched:
            want = [getattr(o, key) for o in s.objects]
            have = [getattr(o, key) for o in p.objects]
            matched[key] += sum(min(want.count(v), have.count(v)) for v in set(want))
        n_objects += len(s.objects)
        if len(s.objects) == 2 and len(p.objects) == 2:
            for key, tally in leak.items():
                if getattr(s.objects[0], key) != getattr(s.objects[1], key):
                    tally[0] += 1
                    tally[1] += getattr(p.objects[0], key) == getattr(p.objects[1], key)
        if len(s.objects) == 2 and ("{rel}" in PAIR_TEMPLATES[s.template] or "{inv}" in PAIR_TEMPLATES[s.template]):
            counts["relation_n"] += 1
            counts["relation"] += ok
    n = len(scenes)
    return {"all": sum(right) / n, "count": counts["count"] / n, "colour": matched["colour"] / n_objects,
            "shape": matched["shape"] / n_objects,
            "relation": counts["relation"] / counts["relation_n"] if counts["relation_n"] else float("nan"),
            **{f"{key}_leak": alike / differ if differ else float("nan") for key, (differ, alike) in leak.items()},
            **{f"{key}_leak_n": differ for key, (differ, _) in leak.items()},
            "n_images": n, "right": right}


def compare_binding(a: dict, b: dict, z: float = 2.0) -> dict:
    """Does model a bind attributes worse than model b? a, b: `caption_accuracy` results on the same two-object
    captions. For each attribute ("colour", "shape"): +1 if a draws both objects alike (the attribute leaking
    from one to the other) more often than b beyond `z` standard errors (`metrics.compare_rates`), -1 if less
    often, 0 within the noise, None where either has no image to leak in."""
    out = {}
    for key in ("colour", "shape"):
        rate_a, n_a, rate_b, n_b = a[f"{key}_leak"], a[f"{key}_leak_n"], b[f"{key}_leak"], b[f"{key}_leak_n"]
        out[key] = None if not (n_a and n_b) else metrics.compare_rates(rate_a, n_a, rate_b, n_b, z)
    return out


def binding_verdict(worse: dict, a: str = "the first model", b: str = "the second") -> tuple[str, str]:
    """The claim "model a binds attributes worse than model b" (unCLIP §7) judged from `compare_binding(a, b)`,
    as (verdict, why): 'yes' where a leaks an attribute more often beyond the noise and none less often,
    'partly' where it leaks one more and the other less, 'no' otherwise; `why` is empty for 'yes'."""
    signs = set(worse.values()) - {None}
    if 1 in signs and -1 not in signs:
        return "yes", ""
    if 1 in signs:
        return "partly", f"{a} leaks one attribute more often than {b}, the other less often"
    if -1 in signs:
        return "no", f"{a} leaks attributes less often than {b}, beyond the sampling noise"
    return "no", f"{a} and {b} leak within the sampling noise of these captions (2 standard errors)"


# ---------------------------------------------------------------------------------------------
# the checker's stage
# ---------------------------------------------------------------------------------------------

FRESH_OFFSET = 1_000_000  # fresh scenes use indices from here: never among a split's own scenes


def _batches(cfg: CheckerConfig, dims, ctx):
    world, train = ctx.world, ctx.dataset("train")
    n = cfg.fresh_scenes
    fresh = world.scenes(range(FRESH_OFFSET, FRESH_OFFSET + n - n // 2), "train")
    if world.heldout_pairs:  # the decoder is scored on held-out pairs too, so the checker must know them
        fresh += world.scenes(range(FRESH_OFFSET, FRESH_OFFSET + n // 2), "heldout")
    # a written word must not be what the checker reads: on a share of the fresh one-object scenes the word is
    # another shape's name (in the train split it always names the object), so the checker learns to look past it
    g = torch.Generator().manual_seed(FRESH_OFFSET)
    pick = torch.rand(len(fresh), generator=g).tolist()
    words = torch.randint(0, len(world.cfg.shapes), (len(fresh),), generator=g).tolist()
    fresh = [world.with_text(s, world.cfg.shapes[w]) if len(s.objects) == 1 and u < cfg.p_random_word else s
             for s, u, w in zip(fresh, pick, words)]
    scenes = list(train.scenes()) + fresh
    images = torch.cat([train.images(), world.render(fresh)]) if fresh else train.images()
    targets = scene_targets(scenes, dims["colours"], dims["shapes"], dims["sizes"])
    device = ctx.device

    def get_batch(idx):
        return images[idx].to(device), {k: v[idx].to(device) for k, v in targets.items()}
    return get_batch, len(images)


def _loss(cfg: CheckerConfig, dims, ctx):
    def loss_fn(model, batch, generator):
        x, y = batch
        x = _as_float(x)
        if cfg.noise_aug > 0:  # generated images are never as clean as renders
            x = x + cfg.noise_aug * distributed.randn(x.shape, generator, x.device)
        logits = model(x)
        losses = {k: F.cross_entropy(logits[k].flatten(0, 1), y[k].flatten()) for k in logits}
        return sum(losses.values()), {k: v.item() for k, v in losses.items()}
    return loss_fn


def _finish(checker: Checker, cfg: CheckerConfig, dims, ctx) -> dict:
    """The checker's own accuracy on the real renders of 'val' and 'heldout' (never trained on)."""
    out = {}
    for split in ("val", "heldout"):
        ds = ctx.dataset(split)
        if len(ds) == 0:
            continue
        acc = attribute_accuracy(checker, ds.images(), ds.scenes())
        out[split] = {k: acc[k] for k in ("colour", "shape", "size", "position", "count", "all")}
    return {"accuracy": out}


SPEC = StageSpec(
    name="checker", needs=(), notebook="06_decoder", about="attribute classifier that scores generated toy images",
    prepare=lambda cfg, ctx: {"colours": list(ctx.cfg.data.colours), "shapes": list(ctx.cfg.data.shapes),
                              "sizes": list(ctx.cfg.data.sizes)},
    batches=_batches, loss=_loss, finish=_finish,
    build=lambda cfg, dims: Checker(cfg, dims["colours"], dims["shapes"], dims["sizes"]),
    wrap=lambda network, cfg, dims, ctx: network.to(ctx.device).eval().requires_grad_(False))
