"""The two diffusion upsamplers of unCLIP (Ramesh et al. 2022, §2.1 and Appendix C, Table 3).

    "We train two diffusion upsampler models: one to upsample images from 64x64 to 256x256
    resolution, and another to further upsample those to 1024x1024 resolution. To improve the
    robustness of our upsamplers, we slightly corrupt the conditioning images during training. For
    the first upsampling stage, we use gaussian blur, and for the second, we use a more diverse BSR
    degradation. To reduce training compute and improve numerical stability, we follow Rombach et al.
    and train on random crops of images that are one-fourth the target size. We use only spatial
    convolutions in the model (i.e., no attention layers) and at inference time directly apply the
    model at the target resolution." (unCLIP §2.1)

What is here:
    degradations   `gaussian_blur` (stage 1: kernel 3, sigma 0.6) and the BSR components of Zhang et al.
                   2021 ("BSRGAN"): `random_blur`, `random_resize`, `gaussian_noise`, `camera_noise`,
                   `jpeg`, mixed by `bsr_degrade`; all batched `[B, 3, h, w]` in [-1, 1] and seeded
    UpsamplerConfig  one stage's U-Net (unet.UNetConfig.upsampler), diffusion, corruption, crops, sampling
    training_pairs   (high-res crop, its low-res window, the corrupted conditioning) rendered on the fly
    Upsampler        the trained model (EMA weights): `upsample(low_res [B,3,h,w]) -> [B,3,4h,4w]`
    stage functions  train_upsampler1/2, load_upsampler1/2 (stages "upsampler1", "upsampler2"),
                     `train` / `load` for variants (e.g. stage 1 without corruption), `benchmark`

The conditioning image is resized to the output size (bilinear, as GLIDE's super-resolution model
does) and concatenated to x_t as 3 extra input channels (`cond=` of the U-Net). No caption, no guidance.
Below the `paper` preset two things differ from the paper, both for learning per CPU-second:
`cond_skip` (the U-Net predicts x_0 minus the bilinear upsample, instead of eps) and `crop_focus`
(half the crops are centred near an object; uniform quarter-size crops of a toy scene are half
background). Left out: BSRGAN's reverse-ISP camera model (we use Poisson shot + Gaussian read noise),
its sharpening of the target, and the paper's fp16 / distributed training details.
"""
from __future__ import annotations

import dataclasses
import io
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .config import PresetConfig, check, check_choice, check_range
from .errors import ConfigError, DataError
from .gaussian_diffusion import DiffusionConfig, create_diffusion, respace
from .train import TrainConfig
from .unet import UNetConfig, UNetModel

SCALE = 4                                 # each upsampler multiplies the side by 4 (paper: 64->256->1024)
DEGRADATIONS = ("blur", "bsr", "none")    # what corrupts the conditioning image during training
STAGE_NAMES = {1: "upsampler1", 2: "upsampler2"}

# BSR ranges (BSRGAN, Zhang et al. 2021), applied to the LOW-res image at its own size, so the blur
# and resize ranges are BSRGAN's x4 ranges divided by about 4; noise and JPEG ranges are BSRGAN's.
BSR_RANGES = {
    "blur_sigma": (0.2, 1.5),        # px of the low-res image; isotropic or anisotropic (BSRGAN: HR px)
    "resize_scale": (0.5, 1.0),      # down by this factor, then back up (BSRGAN: down 1/8..1, up 1..2)
    "noise_level": (2, 25),          # Gaussian noise std in 8-bit levels (BSRGAN: 2..25)
    "camera_log10_photons": (2.0, 4.0),  # shot noise: photons per unit intensity = 10^U (BSRGAN: 2..4)
    "jpeg_quality": (30, 95),        # JPEG quality factor (BSRGAN: 30..95)
}
# Per image, each step is applied with this probability ("slightly corrupt", unCLIP §2.1). BSRGAN applies
# nearly every step; measured here (toy, 500 steps), halving these from (0.5, 0.5, 0.5, 0.25, 0.75) kept
# the hatch that heavier mixtures taught upsampler 2 to erase (32.8 vs 32.3 dB PSNR).
BSR_PROBS = {"blur": 0.25, "resize": 0.25, "noise": 0.25, "camera": 0.1, "jpeg": 0.5}


# ---------------------------------------------------------------------------------------------
# randomness: every degradation runs on the CPU from a CPU generator seeded by the caller's one
# ---------------------------------------------------------------------------------------------

def _cpu_generator(generator: torch.Generator | None) -> torch.Generator:
    """A CPU generator seeded from `generator` (any device; None: torch's global RNG)."""
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


def _uniform(g, low, high, n=1) -> torch.Tensor:
    """`n` floats uniform in [low, high) `[n]` (CPU generator)."""
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


def _check_images(images, what="images") -> torch.Tensor:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise DataError(f"{what} must be a float tensor [B, 3, H, W] in [-1, 1], got {shape}")
    if not images.is_floating_point():
        raise DataError(f"{what} are {images.dtype}; the upsamplers take float images in [-1, 1]: "
                        f"convert with data.to_float(images)")
    return images


# ---------------------------------------------------------------------------------------------
# blur
# ---------------------------------------------------------------------------------------------

def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian `[size]` (odd size, centred): the separable factor of the 2-D blur."""
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ConfigError(f"blur kernel size {size!r} must be a positive odd int (paper: 3)")
    if not sigma > 0:
        raise ConfigError(f"blur sigma {sigma!r} must be > 0 (paper: 0.6)")
    x = torch.arange(size, dtype=torch.float64) - size // 2
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return (k / k.sum()).float()


def _filter(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image with its own 2-D kernel: images [B, C, H, W], kernels [B, k, k] -> [B, C, H, W].

    Edges are replicated (any image size works, even a 4-px low-res window).
    """
    b, c, h, w = images.shape
    k = kernels.shape[-1]
    x = F.pad(images.reshape(1, b * c, h, w), (k // 2,) * 4, mode="replicate")
    weight = kernels.to(images).repeat_interleave(c, dim=0)[:, None]   # [B*C, 1, k, k]
    return F.conv2d(x, weight, groups=b * c).reshape(b, c, h, w)


def gaussian_blur(images: torch.Tensor, kernel_size: int = 3, sigma: float = 0.6) -> torch.Tensor:
    """Stage 1's corruption (paper: kernel 3, sigma 0.6): `[B, 3, H, W]` -> `[B, 3, H, W]`."""
    _check_images(images)
    k = gaussian_kernel(kernel_size, sigma)
    k2 = torch.outer(k, k)                                           # [k, k], sums to 1
    return _filter(images, k2.expand(images.shape[0], -1, -1))


def _anisotropic_kernel(size, sigma_u, sigma_v, theta) -> torch.Tensor:
    """2-D Gaussian `[size, size]` with std sigma_u along angle theta and sigma_v across it."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y
    k = torch.exp(-0.5 * ((u / sigma_u) ** 2 + (v / sigma_v) ** 2))
    return (k / k.sum()).float()


def random_blur(images, generator=None, sigma_range=BSR_RANGES["blur_sigma"]) -> torch.Tensor:
    """BSR blur: per image an isotropic (p 0.5) or anisotropic, rotated Gaussian. `[B, 3, H, W]`."""
    images = _check_images(images)
    g = _cpu_generator(generator)
    size = 2 * math.ceil(3 * sigma_range[1]) + 1
    kernels = []
    for _ in range(images.shape[0]):
        iso, su, sv, theta = _uniform(g, 0, 1, 4).tolist()
        lo, hi = sigma_range
        su, sv = lo + (hi - lo) * su, lo + (hi - lo) * sv
        if iso < 0.5:
            sv = su
        kernels.append(_anisotropic_kernel(size, su, sv, theta * math.pi))
    return _filter(images.cpu(), torch.stack(kernels)).to(images.device)


# ---------------------------------------------------------------------------------------------
# resizing, noise, JPEG
# ---------------------------------------------------------------------------------------------

DOWN_MODES = ("bilinear", "bicubic", "area")
UP_MODES = ("bilinear", "bicubic")


def _resize(x, size, mode):
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=size, mode=mode, **kw)


def random_resize(images, generator=None, scale_range=BSR_RANGES["resize_scale"]) -> torch.Tensor:
    """BSR resizing: per image, down by a random factor with a random filter, then back up. `[B, 3, H, W]`."""
    images = _check_images(images)
    g = _cpu_generator(generator)
    h, w = images.shape[-2:]
    out = []
    for x in images.cpu().split(1):
        s, down, up = _uniform(g, 0, 1, 3).tolist()
        s = scale_range[0] + (scale_range[1] - scale_range[0]) * s
        small = _resize(x, (max(1, round(h * s)), max(1, round(w * s))), DOWN_MODES[int(down * 3)])
        out.append(_resize(small, (h, w), UP_MODES[int(up * 2)]))
    return torch.cat(out).clamp(-1, 1).to(images.device)


def gaussian_noise(images, generator=None, level_range=BSR_RANGES["noise_level"]) -> torch.Tensor:
    """BSR Gaussian noise of a random std (8-bit levels): colour (p 0.4), grey (p 0.4) or
    channel-correlated (p 0.2) with a random covariance, as BSRGAN draws it. `[B, 3, H, W]`."""
    images = _check_images(images)
    g = _cpu_generator(generator)
    b, _, h, w = images.shape
    out = images.detach().cpu().clone()
    for i in range(b):
        level = int(_uniform(g, level_range[0], level_range[1] + 1)) / 255 * 2   # in [-1, 1] units
        kind = float(_uniform(g, 0, 1))
        if kind < 0.4:    # grey: the same noise on every channel
            noise = torch.randn(1, h, w, generator=g).expand(3, h, w) * level
        elif kind < 0.8:  # colour: independent per channel
            noise = torch.randn(3, h, w, generator=g) * level
        else:             # correlated: covariance U^T D U with a random rotation U and scales D in [0, 1)
            q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
            cov = q.T @ torch.diag(torch.rand(3, generator=g, dtype=torch.float64)) @ q
            chol = torch.linalg.cholesky(cov + 1e-9 * torch.eye(3, dtype=torch.float64)).float()
            noise = (chol @ torch.randn(3, h * w, generator=g)).reshape(3, h, w) * (level_range[1] / 255 * 2)
        out[i] += noise
    return out.clamp(-1, 1).to(images.device)


def camera_noise(images, generator=None, log10_photons=BSR_RANGES["camera_log10_photons"]) -> torch.Tensor:
    """Camera-style noise: Poisson shot noise (signal-dependent: brighter pixels get more photons) on
    every channel (p 0.5) or on the luma only, plus a little Gaussian read noise. `[B, 3, H, W]`.

    BSRGAN's own camera model also runs a reverse/forward ISP (demosaicing, tone curve); left out here.
    """
    images = _check_images(images)
    g = _cpu_generator(generator)
    out = []
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    for x in images.detach().cpu().split(1):
        x = ((x[0] + 1) / 2).clamp(0, 1)                                 # [3, H, W] in [0, 1]
        photons, colour, read = _uniform(g, 0, 1, 3).tolist()
        photons = 10 ** (log10_photons[0] + (log10_photons[1] - log10_photons[0]) * photons)
        if colour < 0.5:
            x = torch.poisson(x * photons, generator=g) / photons
        else:
            y = (x * luma).sum(0, keepdim=True)
            x = x + torch.poisson(y * photons, generator=g) / photons - y
        x = x + torch.randn(x.shape, generator=g) * (0.01 * read)        # read noise, std up to 1%
        out.append(x * 2 - 1)
    return torch.stack(out).clamp(-1, 1).to(images.device)


def jpeg(images, generator=None, quality_range=BSR_RANGES["jpeg_quality"], quality: int | None = None) -> torch.Tensor:
    """JPEG compression (PIL) at a random quality per image (or a fixed `quality`). `[B, 3, H, W]`."""
    from PIL import Image
    images = _check_images(images)
    g = _cpu_generator(generator)
    u8 = images.detach().float().cpu().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    out = []
    for x in u8:
        q = quality if quality is not None else int(_uniform(g, quality_range[0], quality_range[1] + 1))
        buf = io.BytesIO()
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=q)
        buf.seek(0)
        with Image.open(buf) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return (torch.stack(out).float() / 127.5 - 1).to(images.device)


def bsr_degrade(images, generator=None, probs=BSR_PROBS) -> torch.Tensor:
    """Stage 2's corruption: a random mixture of BSR degradations per image. `[B, 3, H, W]`.

    Per image: the steps (blur, blur, resize, noise) in a random order (BSRGAN's "degradation
    shuffle"), each kept with its probability, then camera noise, then JPEG last (as BSRGAN ends).
    """
    images = _check_images(images)
    g = _cpu_generator(generator)
    ops = {"blur": random_blur, "resize": random_resize, "noise": gaussian_noise, "camera": camera_noise,
           "jpeg": jpeg}
    out = []
    for x in images.detach().cpu().split(1):
        order = [("blur", "blur", "resize", "noise")[i] for i in torch.randperm(4, generator=g).tolist()]
        for name in order + ["camera", "jpeg"]:
            if float(_uniform(g, 0, 1)) < probs[name]:
                x = ops[name](x, g)
        out.append(x)
    return torch.cat(out).to(images.device)


def degrade(images, kind: str, generator=None, blur_kernel: int = 3, blur_sigma: float = 0.6) -> torch.Tensor:
    """Corrupt conditioning images: 'blur' (fixed Gaussian), 'bsr' (random mixture) or 'none'."""
    if kind not in DEGRADATIONS:
        raise ConfigError(f"unknown degradation {kind!r}; valid choices: {', '.join(map(repr, DEGRADATIONS))}")
    if kind == "blur":
        return gaussian_blur(images, blur_kernel, blur_sigma)
    if kind == "bsr":
        return bsr_degrade(images, generator)
    return _check_images(images)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def _diffusion(stage: int, preset: str) -> DiffusionConfig:
    schedule = "cosine" if stage == 1 else "linear"            # paper: cosine / linear (Table 3)
    if preset == "paper":                                      # GLIDE/ADM's eps-prediction
        return DiffusionConfig(timesteps=1000, schedule=schedule, mean_type="eps")
    # x0-prediction with the conditioning image as a skip (cond_skip): right from step 0 the model
    # returns the bilinear upsample, so short CPU runs learn only the detail; smoke uses a short chain
    return DiffusionConfig(timesteps=100 if preset == "smoke" else 1000, schedule=schedule, mean_type="x0")


def _train(stage: int, preset: str) -> TrainConfig:
    if preset == "smoke":
        return TrainConfig(steps=3, batch_size=4, warmup_steps=1, ckpt_every=1000, log_every=1)
    if preset == "toy":  # notebook 07's CPU budget: ~50 s / ~65 s of one core (measured, 2-core machine)
        if stage == 1:
            return TrainConfig(steps=400, batch_size=16, lr=1e-3, warmup_steps=40, ckpt_every=200, log_every=10)
        return TrainConfig(steps=500, batch_size=4, lr=1e-3, warmup_steps=50, ckpt_every=250, log_every=10)
    if preset == "small":  # one GPU; stage 2's 256-px crops of 1024-px renders are drawn on the CPU
        return TrainConfig(steps=5000 if stage == 1 else 2000, batch_size=64 if stage == 1 else 16, lr=3e-4,
                           warmup_steps=200, lr_schedule="cosine", ema_decay=0.999, ckpt_every=500,
                           log_every=50, precision="bf16")
    # paper (Table 3): 1M iterations, batch 1024 / 512, lr 1.2e-4, EMA 0.9999, no weight decay
    return TrainConfig(steps=1_000_000, batch_size=1024 if stage == 1 else 512, lr=1.2e-4, warmup_steps=10000,
                       ema_decay=0.9999, ckpt_every=5000, log_every=100, precision="bf16")


@dataclasses.dataclass(frozen=True)
class UpsamplerConfig(PresetConfig):
    """One upsampler. `stage1(preset)` / `stage2(preset)`; `smoke/toy/small/paper()` give stage 1.

    `unet.image_size` is the OUTPUT side of the whole image (toy: 128 / 512); training crops are
    `crop_fraction` of it (toy: 32 / 128 px), and their conditioning windows a quarter of that.
    """
    stage: int = 1                                   # 1: base -> x4 (paper 64->256), 2: x4 -> x16 (256->1024)
    unet: UNetConfig = dataclasses.field(default_factory=lambda: UNetConfig.upsampler(1, "toy"))  # paper: 700M / 300M params
    diffusion: DiffusionConfig = dataclasses.field(default_factory=lambda: _diffusion(1, "toy"))  # paper: 1000 steps, cosine / linear
    degradation: str = "blur"                        # paper: 'blur' (stage 1), 'bsr' (stage 2); 'none' for the ablation
    blur_kernel: int = 3                             # paper: 3
    blur_sigma: float = 0.6                          # paper: 0.6
    crop_fraction: float = 0.25                      # paper: 0.25 (random crops one-fourth the target size)
    crop_focus: float = 0.0                          # paper: 0 (uniform crops); P(crop centred near an object):
    # toy 0.5, as half the uniform crops of a toy scene are plain background (measured on 2 CPU cores:
    # upsampler 2 after 500 steps of batch 4, 30.5 dB PSNR with uniform crops, 32.3 dB with 0.5)
    sample_steps: int = 27                           # paper: 27 (stage 1), 15 (stage 2), DDIM
    cond_skip: bool = True                           # paper: False; ours: x0 = up(cond) + net (see `model_fn`)
    train: TrainConfig = dataclasses.field(default_factory=lambda: _train(1, "toy"))  # paper: 1M iterations

    def __post_init__(self):
        check_choice(self, "stage", (1, 2))
        for name, kind in (("unet", UNetConfig), ("diffusion", DiffusionConfig), ("train", TrainConfig)):
            check(isinstance(getattr(self, name), kind), self, name, f"must be a {kind.__name__}")
        check_choice(self, "degradation", DEGRADATIONS)
        check(isinstance(self.blur_kernel, int) and self.blur_kernel > 0 and self.blur_kernel % 2 == 1,
              self, "blur_kernel", "must be a positive odd int (paper: 3)")
        check_range(self, "blur_sigma", 0.0, low_open=True)
        check_range(self, "crop_fraction", 0.0, 1.0, low_open=True)
        check_range(self, "crop_focus", 0.0, 1.0)
        check_range(self, "sample_steps", 2, self.diffusion.timesteps, integer=True)
        check_choice(self, "cond_skip", (True, False))
        check(not self.cond_skip or self.diffusion.mean_type == "x0", self, "cond_skip",
              f"adds the conditioning image to a predicted x_0, so it needs diffusion.mean_type='x0' "
              f"(got {self.diffusion.mean_type!r}); set cond_skip=False for eps or v")
        u = self.unet
        check(u.attention_resolutions == (), self, "unet",
              "the upsamplers are conv-only (unCLIP §2.1: no attention) so that a model trained on crops "
              "runs on the whole image; set attention_resolutions=()")
        check(u.cond_channels == 3 and u.in_channels == 3 and u.out_channels == 3, self, "unet",
              "needs in_channels=3, out_channels=3 and cond_channels=3 (the low-res image): use "
              "UNetConfig.upsampler(stage, preset)")
        check(u.learn_sigma == (self.diffusion.var_type == "learned_range"), self, "unet",
              f"learn_sigma={u.learn_sigma} does not match diffusion.var_type={self.diffusion.var_type!r}")
        side = self.crop_size
        unit = math.lcm(SCALE, u.downsample_factor)
        check(abs(u.image_size * self.crop_fraction - side) < 1e-9 and side % unit == 0 and side > 0,
              self, "crop_fraction",
              f"crop side = image_size {u.image_size} * {self.crop_fraction} must be a whole multiple of {unit} "
              f"(the x{SCALE} scale and the U-Net's downsample factor {u.downsample_factor})")

    @property
    def crop_size(self) -> int:
        """Side in px (output resolution) of the training crops."""
        return int(round(self.unet.image_size * self.crop_fraction))

    @property
    def input_multiple(self) -> int:
        """Low-res inputs must have H and W divisible by this (their x4 must fit the U-Net's factor)."""
        f = self.unet.downsample_factor
        return f // math.gcd(f, SCALE)

    @classmethod
    def stage1(cls, preset: str = "toy"):
        """Upsampler 1 of `preset` (toy 32->128, small/paper 64->256): Gaussian blur, cosine, 27 DDIM steps."""
        return cls._make(1, preset)

    @classmethod
    def stage2(cls, preset: str = "toy"):
        """Upsampler 2 of `preset` (toy 128->512, small/paper 256->1024): BSR, linear, 15 DDIM steps."""
        return cls._make(2, preset)

    @classmethod
    def _make(cls, stage, preset):
        unet = UNetConfig.upsampler(stage, preset)   # validates the preset name
        if preset == "smoke":  # smoke data is 16 px: outputs are 64 / 256 px
            unet = unet.replace(image_size=16 * SCALE ** stage)
        return cls(stage=stage, unet=unet, diffusion=_diffusion(stage, preset),
                   degradation="blur" if stage == 1 else "bsr", sample_steps=27 if stage == 1 else 15,
                   crop_focus=0.0 if preset == "paper" else 0.5, cond_skip=preset != "paper",
                   train=_train(stage, preset))

    @classmethod
    def smoke(cls):
        return cls.stage1("smoke")

    @classmethod
    def toy(cls):
        return cls.stage1("toy")

    @classmethod
    def small(cls):
        return cls.stage1("small")

    @classmethod
    def paper(cls):
        return cls.stage1("paper")


# ---------------------------------------------------------------------------------------------
# training pairs, rendered on the fly
# ---------------------------------------------------------------------------------------------

def resize_cond(low_res: torch.Tensor, size) -> torch.Tensor:
    """The conditioning image at the output size: bilinear, as GLIDE's super-resolution U-Net. `[B, 3, H, W]`."""
    return F.interpolate(low_res, size=size, mode="bilinear", align_corners=False)


def training_pairs(world, scenes, cfg: UpsamplerConfig, out_res: int, generator=None) -> dict:
    """Ground-truth pairs for `scenes`: a random crop window of each, rendered at `out_res`.

    Returns dict(high_res [B, 3, c, c] float, low_res [B, 3, c/4, c/4] float (the avg-pooled crop, before
    corruption), cond (low_res corrupted by cfg.degradation), crops [(top, left, c)]) with c = cfg.crop_size.
    Crop corners are multiples of 4, so the low-res window is exactly a window of the x4-smaller image.
    """
    from .data import to_float
    c = cfg.crop_size
    if c > out_res:
        raise ConfigError(f"crop side {c} exceeds the {out_res}-px render: lower crop_fraction")
    n = len(scenes)
    positions = (out_res - c) // SCALE + 1          # possible corners per axis, on the x4 grid
    dev = generator.device if generator is not None else "cpu"
    corners = torch.randint(0, positions, (n, 2), generator=generator, device=dev).cpu() * SCALE
    u = torch.rand(n, 4, generator=generator, device=dev).cpu().tolist()   # drawn even when unused
    for k, scene in enumerate(scenes):
        if u[k][0] < cfg.crop_focus and scene.objects:   # centre the window near one object
            o = scene.objects[int(u[k][1] * len(scene.objects))]
            for axis, (centre, jitter) in enumerate(((o.centre[1], u[k][2]), (o.centre[0], u[k][3]))):
                pos = centre * out_res - c / 2 + (jitter - 0.5) * c / 2           # +- c/4 around the object
                corners[k, axis] = min(max(int(pos) // SCALE, 0), positions - 1) * SCALE
    crops = [(int(t), int(l), c) for t, l in corners.tolist()]
    high = to_float(world.render(scenes, out_res, crop=crops))                   # [B, 3, c, c]
    low = F.avg_pool2d(high, SCALE)                                              # area downsampling
    cond = degrade(low, cfg.degradation, generator, cfg.blur_kernel, cfg.blur_sigma)
    return {"high_res": high, "low_res": low, "cond": cond, "crops": crops}


def model_fn(model, cond_skip: bool):
    """The function the diffusion calls: `fn(x_t, t, cond=up(cond)) -> prediction [B, 3, H, W]`.

    cond_skip: the U-Net predicts x_0 - up(cond), the detail the bilinear upsample lacks (the residual
    that SRDiff, Li et al. 2022, diffuses). With its zero-initialised output layer the model starts at
    the bilinear upsample; measured on 2 CPU cores, 300 steps of v-prediction without it still left
    visible noise everywhere (17.9 dB vs 25.5 dB for bilinear), with it 25.5 dB and sharp outlines.
    """
    if not cond_skip:
        return model
    return lambda x, t, cond: cond + model(x, t, cond=cond)


def make_loss_fn(cfg: UpsamplerConfig, world, out_res: int):
    """loss_fn for `train.Trainer`: batch = list of scenes; every random draw comes from `generator`."""
    from .gaussian_diffusion import _randn
    diffusion = create_diffusion(cfg.diffusion)

    def loss_fn(model, scenes, generator):
        device = next(model.parameters()).device
        pair = training_pairs(world, scenes, cfg, out_res, generator)
        x0 = pair["high_res"].to(device)
        cond = resize_cond(pair["cond"].to(device), x0.shape[-2:])
        t = diffusion.sample_timesteps(len(x0), generator, device)
        noise = _randn(x0.shape, generator, device)
        losses = diffusion.training_losses(model_fn(model, cfg.cond_skip), x0, t, model_kwargs={"cond": cond},
                                           noise=noise)
        return losses["loss"].mean(), {}

    return loss_fn


# ---------------------------------------------------------------------------------------------
# the trained upsampler
# ---------------------------------------------------------------------------------------------

class Upsampler:
    """A trained upsampler (EMA weights): `upsample(low_res [B, 3, h, w]) -> [B, 3, 4h, 4w]`."""

    def __init__(self, cfg: UpsamplerConfig, model: UNetModel, device, name: str = "", history=None):
        self.cfg, self.device, self.name, self.history = cfg, torch.device(device), name, history
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.base_diffusion = create_diffusion(cfg.diffusion)
        self._spaced = {}

    def __repr__(self):
        return (f"Upsampler(stage={self.cfg.stage}, degradation={self.cfg.degradation!r}, "
                f"sample_steps={self.cfg.sample_steps}, name={self.name!r})")

    def diffusion(self, steps: int | None = None):
        """The diffusion respaced to `steps` DDIM steps (default cfg.sample_steps), cached."""
        steps = self.cfg.sample_steps if steps is None else steps
        # at least 2: a one-step chain has no posterior variance to build (gaussian_diffusion needs 2 steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= self.cfg.diffusion.timesteps:
            raise ConfigError(f"steps = {steps!r} must be an int in 2..{self.cfg.diffusion.timesteps} "
                              f"(paper: {self.cfg.sample_steps})")
        if steps not in self._spaced:
            self._spaced[steps] = respace(self.base_diffusion, steps)
        return self._spaced[steps]

    def check_input(self, low_res) -> torch.Tensor:
        """Refuse what the model cannot take; returns the images on the model's device."""
        low_res = _check_images(low_res, "low_res")
        m = self.cfg.input_multiple
        h, w = low_res.shape[-2:]
        if h % m or w % m:
            f = self.cfg.unet.downsample_factor
            raise DataError(f"low_res is {h}x{w}, but its x{SCALE} ({SCALE * h}x{SCALE * w}) must be a multiple of "
                            f"the U-Net's factor {f}: crop or pad the input to a multiple of {m} px "
                            f"(e.g. {max(m, h // m * m)}x{max(m, w // m * m)})")
        return low_res.to(self.device)

    @torch.no_grad()
    def upsample(self, low_res, steps: int | None = None, generator=None, eta: float = 0.0,
                 batch_size: int | None = None, progress: bool = False, noise=None) -> torch.Tensor:
        """x4 upsampling by DDIM: low_res float `[B, 3, h, w]` in [-1, 1] -> `[B, 3, 4h, 4w]` in [-1, 1].

        Runs on whole images of any size whose x4 fits the U-Net's factor (the model is conv-only).
        `noise` (x_T `[B, 3, 4h, 4w]`) or `generator` fixes the result; `batch_size` bounds memory
        (the result does not depend on it).
        """
        low_res = self.check_input(low_res)
        b, _, h, w = low_res.shape
        shape = (b, 3, SCALE * h, SCALE * w)
        if noise is None:
            from .gaussian_diffusion import _randn
            noise = _randn(shape, generator, self.device)
        elif tuple(noise.shape) != shape:
            raise DataError(f"noise has shape {tuple(noise.shape)} but must be {shape} (x4 of low_res)")
        diffusion = self.diffusion(steps)
        cond = resize_cond(low_res.float(), shape[-2:])
        outs = []
        size = batch_size or b
        for a in range(0, b, size):
            outs.append(diffusion.ddim_sample_loop(
                model_fn(self.model, self.cfg.cond_skip), (min(size, b - a), *shape[1:]), noise=noise[a:a + size].to(self.device),
                model_kwargs={"cond": cond[a:a + size]}, eta=eta, generator=generator, progress=progress))
        return torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------

def out_resolution(run, cfg: UpsamplerConfig) -> int:
    """Side of the full output image of `cfg`'s stage in this run: base resolution * 4**stage."""
    out_res = run.cfg.data.resolution * SCALE ** cfg.stage
    if cfg.unet.image_size != out_res:
        raise ConfigError(f"upsampler {cfg.stage}'s unet.image_size = {cfg.unet.image_size} but this run's images "
                          f"are {run.cfg.data.resolution} px, so stage {cfg.stage} outputs {out_res} px: build the "
                          f"config with UpsamplerConfig.stage{cfg.stage}('{run.preset}') or set "
                          f"unet.image_size={out_res}")
    return out_res


def stage_config(run, cfg: UpsamplerConfig) -> dict:
    """Everything that determines a trained upsampler (its fields at the top level, so that
    `train.steps` may grow on resume), plus the data world and the seed."""
    return {**cfg.to_dict(), "data": run.cfg.data.to_dict(), "seed": run.seed}


def train(run, name: str, cfg: UpsamplerConfig | None = None, steps: int | None = None,
          progress: bool = True) -> Upsampler:
    """Train an upsampler as stage `name` of the run folder (resuming its checkpoint if there is one).

    cfg: default `run.cfg.<name>` (so 'upsampler1' / 'upsampler2'); pass another for a variant, e.g.
    `train(run, "upsampler1_clean", run.cfg.upsampler1.replace(degradation="none"))`.
    """
    from .stages import write_record
    from .train import Trainer
    if cfg is None:
        if name not in STAGE_NAMES.values():
            raise ConfigError(f"stage {name!r} has no config in run.cfg: pass cfg= (an UpsamplerConfig) or use "
                              f"{' / '.join(STAGE_NAMES.values())}")
        cfg = getattr(run.cfg, name)
    if steps is not None:
        cfg = cfg.replace(train=cfg.train.replace(steps=steps))
    out_res = out_resolution(run, cfg)
    world = run.world
    run.seed_everything()
    model = UNetModel(cfg.unet)   # initialised after seeding: same seed -> same weights
    config = stage_config(run, cfg)
    trainer = Trainer(model, make_loss_fn(cfg, world, out_res), lambda idx: world.scenes(idx.tolist(), "train"),
                      run.cfg.data.train_size, cfg.train, run.folder.checkpoint_path(name), stage=name,
                      config=config, seed=run.seed, device=run.device, progress=progress)
    history = trainer.fit()
    record = write_record(run, name, config, history=history)
    return Upsampler(cfg, trainer.ema.model, run.device, name=record["id"], history=history)


def load(run, name: str) -> Upsampler:
    """The trained upsampler `name` of the run folder (EMA weights), with the config it was trained with."""
    from .stages import trained_record
    from .train import load_checkpoint
    record = trained_record(run, name)
    fields = {f.name for f in dataclasses.fields(UpsamplerConfig)}
    cfg = UpsamplerConfig.from_dict({k: v for k, v in record["config"].items() if k in fields})
    ckpt = load_checkpoint(run.folder.checkpoint_path(name), stage=name, config=record["config"],
                           fix=f"delete {run.folder.root / name} to retrain {name}")
    model = UNetModel(cfg.unet)
    model.load_state_dict(ckpt["ema"])
    return Upsampler(cfg, model, run.device, name=record["id"], history=record.get("history"))


def load_or_train(run, name: str, cfg: UpsamplerConfig, steps: int | None = None, progress: bool = True) -> Upsampler:
    """Load upsampler `name` if it was trained with `cfg` (and `steps`), else train (or resume) it.

    For variants that are not registered stages, e.g. stage 1 without corruption for the ablation.
    """
    from .stages import read_record
    if steps is not None:
        cfg = cfg.replace(train=cfg.train.replace(steps=steps))
    record = read_record(run, name)
    if record is not None and record["config"] == stage_config(run, cfg):
        return load(run, name)
    return train(run, name, cfg, progress=progress)


def train_upsampler1(run, steps: int | None = None) -> Upsampler:
    """Stage 'upsampler1': base -> x4, Gaussian-blur corrupted conditioning."""
    return train(run, "upsampler1", run.cfg.with_steps("upsampler1", steps).upsampler1)


def load_upsampler1(run) -> Upsampler:
    return load(run, "upsampler1")


def train_upsampler2(run, steps: int | None = None) -> Upsampler:
    """Stage 'upsampler2': x4 -> x16, BSR-degraded conditioning."""
    return train(run, "upsampler2", run.cfg.with_steps("upsampler2", steps).upsampler2)


def load_upsampler2(run) -> Upsampler:
    return load(run, "upsampler2")


def benchmark(run, step_counts=None, n: int = 1, up1: Upsampler | None = None, up2: Upsampler | None = None,
              split: str = "val") -> dict:
    """Sampling time per image of the chain base -> x4 -> x16, stage by stage, at each step count.

    step_counts: (stage-1 steps, stage-2 steps) pairs; default (5, 5), (10, 10) and the configs' own
    (paper: 27, 15). Inputs: `n` ground-truth base renders of `split`. Returns a flat dict of seconds
    per image: 'upsampler1_s@S1', 'upsampler2_s@S2', 'chain_s@S1+S2', plus 'n', 'device', 'threads'.
    """
    from .data import to_float
    from .stages import load_or_train
    up1 = up1 or load_or_train(run, "upsampler1", verbose=False)
    up2 = up2 or load_or_train(run, "upsampler2", verbose=False)
    step_counts = step_counts or ((5, 5), (10, 10), (up1.cfg.sample_steps, up2.cfg.sample_steps))
    scenes = run.dataset(split).scenes()[:n]
    low = to_float(run.world.render(scenes)).to(up1.device)
    g = torch.Generator().manual_seed(0)
    out = {"n": n, "device": str(up1.device), "threads": torch.get_num_threads()}

    def timed(fn):
        if up1.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = fn()
        if up1.device.type == "cuda":
            torch.cuda.synchronize()
        return y, (time.perf_counter() - t0) / n

    for s1, s2 in step_counts:
        mid, t1 = timed(lambda: up1.upsample(low, steps=s1, generator=g))
        _, t2 = timed(lambda: up2.upsample(mid, steps=s2, generator=g))
        out[f"upsampler1_s@{s1}"] = t1
        out[f"upsampler2_s@{s2}"] = t2
        out[f"chain_s@{s1}+{s2}"] = t1 + t2
    return out
