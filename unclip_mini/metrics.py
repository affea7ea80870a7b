"""Image metrics: an attribute checker for the toy world, Frechet distance and CLIP score in CLIP space,
PSNR and SSIM.

unCLIP (Ramesh et al. 2022, §5) scores samples with FID on MS-COCO, CLIP score and human evaluations.
The toy world has something better than a human rater: the ground truth of every scene. The
*attribute checker* is a small CNN trained on rendered scenes to read, for each of the 4 grid cells,
whether it is empty and otherwise the object's colour, shape and size. It turns "does this sample match
its caption / its z_i?" into accuracies: colour, shape, position, and the whole scene (which also tests
binding: the red one must be the circle).

The other metrics:
- `frechet_distance`: FID's formula (Heusel et al. 2017) on CLIP image embeddings instead of Inception
  features (the paper's FID uses Inception-v3; a toy world has no Inception, but it has a CLIP).
- `clip_score`: mean cosine similarity between each caption's z_t and its sample's z_i (GLIDE §4, x100).
- `psnr`, `ssim` (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5): for the upsamplers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import PresetConfig, check_positive, check_range
from .errors import DataError
from .train import TrainConfig

N_CELLS = 4  # the toy world's 2x2 grid: cell index = 2 * row + col (data.CELLS)


@dataclass(frozen=True)
class CheckerConfig(PresetConfig):
    """The attribute checker: a small CNN reading (empty | colour, shape, size) in each grid cell."""
    width: int = 16                  # channels of the first conv (doubled after each of 3 downsamplings)
    hidden: int = 256                # width of the MLP head
    fresh_scenes: int = 8000         # freshly rendered scenes (half 'train'-like, half held-out pairs) added
    noise_aug: float = 0.05          # std of Gaussian noise added to training images ([-1, 1] units)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=400, batch_size=64, lr=2e-3, warmup_steps=40, lr_schedule="cosine", weight_decay=0.0,
        ema_decay=0.99, ckpt_every=200, log_every=10))

    def __post_init__(self):
        check_positive(self, "width", "hidden")
        check_range(self, "fresh_scenes", 0, integer=True)
        check_range(self, "noise_aug", 0.0, 1.0)

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
        out = {k: torch.zeros(len(scenes), N_CELLS, dtype=torch.long) for k in ("colour", "shape", "size")}
        for i, s in enumerate(scenes):
            for o in s.objects:
                c = 2 * int(o.cell[0]) + int(o.cell[1])
                for key, names, value in (("colour", self.colours, o.colour), ("shape", self.shapes, o.shape),
                                          ("size", self.sizes, o.size)):
                    if value not in names:
                        raise DataError(f"the checker knows the {key}s {', '.join(names)}, not {value!r}: "
                                        f"train a checker on this world (stage 'checker')")
                    out[key][i, c] = names.index(value) + 1
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


# ---------------------------------------------------------------------------------------------
# the checker's stage
# ---------------------------------------------------------------------------------------------

FRESH_OFFSET = 1_000_000  # fresh scenes use indices from here: never among a split's own scenes


def _checker_config(run, steps=None) -> dict:
    return {"checker": run.cfg.with_steps("checker", steps).checker.to_dict(),
            "data": run.cfg.data.to_dict(), "seed": run.seed}


def _evaluate(checker, run) -> dict:
    """The checker's own accuracy on the real renders of 'val' and 'heldout' (never trained on)."""
    out = {}
    for split in ("val", "heldout"):
        ds = run.dataset(split)
        if len(ds) == 0:
            continue
        acc = attribute_accuracy(checker, ds.images(), ds.scenes())
        out[split] = {k: acc[k] for k in ("colour", "shape", "size", "position", "count", "all")}
    return out


def train_checker(run, steps: int | None = None) -> Checker:
    """Train the attribute checker on the train split's renders plus fresh scenes (held-out pairs too)."""
    from .stages import write_record
    from .train import Trainer
    cfg = run.cfg.with_steps("checker", steps).checker
    world = run.world
    train = run.dataset("train")
    n = cfg.fresh_scenes
    fresh = world.scenes(range(FRESH_OFFSET, FRESH_OFFSET + n - n // 2), "train")
    if world.heldout_pairs:  # the decoder is scored on held-out pairs too, so the checker must know them
        fresh += world.scenes(range(FRESH_OFFSET, FRESH_OFFSET + n // 2), "heldout")
    scenes = list(train.scenes()) + fresh
    images = torch.cat([train.images(), world.render(fresh)]) if fresh else train.images()
    run.seed_everything()
    model = Checker(cfg, world.cfg.colours, world.cfg.shapes, world.cfg.sizes)
    targets = model.targets(scenes)
    device = run.device

    def get_batch(idx):
        return images[idx].to(device), {k: v[idx].to(device) for k, v in targets.items()}

    def loss_fn(model, batch, generator):
        x, y = batch
        x = _as_float(x)
        if cfg.noise_aug > 0:  # generated images are never as clean as renders
            x = x + cfg.noise_aug * torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
        logits = model(x)
        losses = {k: F.cross_entropy(logits[k].flatten(0, 1), y[k].flatten()) for k in logits}
        return sum(losses.values()), {k: v.item() for k, v in losses.items()}

    config = _checker_config(run, steps)
    trainer = Trainer(model, loss_fn, get_batch, len(images), cfg.train, run.folder.checkpoint_path("checker"),
                      stage="checker", config=config, seed=run.seed, device=device)
    history = trainer.fit()
    checker = trainer.ema.model.eval()
    accuracy = _evaluate(checker, run)
    record = write_record(run, "checker", config, history=history, accuracy=accuracy,
                          parameters=sum(p.numel() for p in checker.parameters()),
                          train_seconds=history["seconds"][-1] if history["seconds"] else 0.0)
    checker.record = record
    return checker


def load_checker(run) -> Checker:
    """The trained attribute checker of this run (EMA weights, eval mode)."""
    from .data import DataConfig
    from .stages import trained_record
    from .train import load_checkpoint
    record = trained_record(run, "checker", "checker")
    cfg = CheckerConfig.from_dict(record["config"]["checker"])
    data = DataConfig.from_dict(record["config"]["data"])
    ckpt = load_checkpoint(run.folder.checkpoint_path("checker"), stage="checker", config=record["config"],
                           fix=f"delete {run.folder.root / 'checker'} and retrain the checker")
    model = Checker(cfg, data.colours, data.shapes, data.sizes)
    model.load_state_dict(ckpt["ema"])
    model = model.to(run.device).eval().requires_grad_(False)
    model.record = record
    return model


# ---------------------------------------------------------------------------------------------
# distribution and pair metrics
# ---------------------------------------------------------------------------------------------

def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix [D, D] by eigendecomposition."""
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D] (FID's formula).

    d^2 = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), all in float64. The trace term
    uses the symmetric form, so only square roots of symmetric PSD matrices are needed (eigh).
    """
    for name, f in (("feats_a", feats_a), ("feats_b", feats_b)):
        if not torch.is_tensor(f) or f.ndim != 2 or f.shape[0] < 2:
            shape = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
            raise DataError(f"{name} must be [N, D] with N >= 2 (a covariance needs two samples), got {shape}")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise DataError(f"feature dims differ ({feats_a.shape[1]} vs {feats_b.shape[1]}): embed both sets "
                        f"with the same CLIP")
    a, b = feats_a.detach().double().cpu(), feats_b.detach().double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    d2 = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross)
    return float(d2.clamp(min=0))


def clip_score(text_embed: torch.Tensor, image_embed: torch.Tensor, scale: float = 1.0) -> float:
    """Mean cosine similarity of each caption's z_t [N, D] with its image's z_i [N, D], times `scale`
    (GLIDE reports it x100)."""
    if text_embed.shape != image_embed.shape or text_embed.ndim != 2:
        raise DataError(f"text_embed {tuple(text_embed.shape)} and image_embed {tuple(image_embed.shape)} must "
                        f"both be [N, D]: one caption per image, from the same CLIP")
    cos = F.cosine_similarity(text_embed.float(), image_embed.float().to(text_embed.device), dim=-1)
    return float(cos.mean()) * scale


def _pair(a, b, data_range):
    if not torch.is_tensor(a) or not torch.is_tensor(b) or a.shape != b.shape or a.ndim != 4:
        sa = tuple(a.shape) if torch.is_tensor(a) else type(a).__name__
        sb = tuple(b.shape) if torch.is_tensor(b) else type(b).__name__
        raise DataError(f"a {sa} and b {sb} must be images of the same shape [B, C, H, W]")
    if data_range is None:  # uint8 images span 255; float images in [-1, 1] span 2
        data_range = 255.0 if a.dtype == torch.uint8 else 2.0
    return a.double(), b.double(), float(data_range)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio per image [B], in dB: 10 log10(range^2 / MSE). Identical images give inf."""
    a, b, r = _pair(a, b, data_range)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(r ** 2 / mse)).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian window [size, size] (SSIM's weighting, Wang et al. 2004)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image [B] (Wang et al. 2004): local means, variances and covariance under
    an 11x11 Gaussian window (valid positions only), averaged over positions and channels."""
    a, b, r = _pair(a, b, data_range)
    if min(a.shape[-2:]) < window:
        raise DataError(f"images are {a.shape[-2]}x{a.shape[-1]} but SSIM's window is {window}x{window}: use "
                        f"larger images or a smaller window")
    c = a.shape[1]
    w = gaussian_window(window, sigma).to(a.device)[None, None].expand(c, 1, window, window)

    def filt(x):
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()
