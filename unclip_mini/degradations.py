"""The corruptions unCLIP's upsamplers are trained to undo (unCLIP §2.1; Zhang et al. 2021, "BSRGAN").

    "To improve the robustness of our upsamplers, we slightly corrupt the conditioning images during
    training. For the first upsampling stage, we use gaussian blur, and for the second, we use a more
    diverse BSR degradation." (unCLIP §2.1)

`gaussian_blur` is stage 1's (kernel 3, sigma 0.6); `bsr_degrade` mixes BSRGAN's components per image:
`random_blur` (isotropic or anisotropic), `random_resize`, `gaussian_noise`, `camera_noise`, `jpeg`.
`degrade(images, kind)` picks one by name. All are batched `[B, 3, h, w]` in [-1, 1] and seeded: every
draw comes from a CPU generator seeded by the caller's. Left out of BSRGAN: its reverse-ISP camera model
(we use Poisson shot noise plus Gaussian read noise) and the sharpening of the target.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError

DEGRADATIONS = ("blur", "bsr", "none")    # what corrupts the conditioning image during training

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
# nearly every step; lighter mixtures keep the hatch that heavier ones teach upsampler 2 to erase (README,
# measurements).
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


def check_images(images, what="images") -> torch.Tensor:
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
    check_images(images)
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
    images = check_images(images)
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
    images = check_images(images)
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
    images = check_images(images)
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
    images = check_images(images)
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
    images = check_images(images)
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
    images = check_images(images)
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
    return check_images(images)

