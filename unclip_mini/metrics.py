"""Metrics: how close generated images and embeddings are to what they should be.

Images (unCLIP §5 scores samples with FID on MS-COCO and CLIP score; the toy world also has an attribute
checker, `checker.py`, that reads each sample's ground truth):
- `frechet_distance`: FID's formula (Heusel et al. 2017) on CLIP image embeddings instead of Inception
  features (a toy world has no Inception, but it has a CLIP).
- `clip_score`: mean cosine similarity between each caption's z_t and its sample's z_i (GLIDE §4, x100).
- `psnr`, `ssim` (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5): for the upsamplers.
- `high_frequency`: the detail an upsampler adds beyond what its input can hold (the spectrum outside the
  low-resolution image's Nyquist square): its energy against the truth's, scale by scale, and its correlation
  with the truth's.

Embeddings (the priors' outputs, scored the same way for both priors):
- `embedding_metrics`: cos(ẑ_i, z_i), cos(ẑ_i, z_t), and whether the nearest true z_i is the right one.
- `candidate_diversity`, `pair_cosine`: how much samples of one caption vary, against the real spread.
- `ModalityProbe`: does an embedding look like an image embedding or a text embedding?

Counts:
- `compare_rates`: is one measured rate above, below or within the sampling noise of another?
- `compare_paired`: the same for two models scored on the same items (same captions, same x_T), from the
  items only one of them got right (an exact sign test, McNemar's).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import DataError

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


def high_frequency(out: torch.Tensor, truth: torch.Tensor, low_res_side: int) -> dict:
    """How much of the truth's fine detail an upsampled batch has, in the band its input cannot hold.

    out, truth: images [B, C, H, W] of one size; low_res_side: the side (px) of the upsampler's input. The band is
    every 2-D frequency with max(|k_x|, |k_y|) above the input's Nyquist frequency (low_res_side / 2 cycles per
    frame): exactly what a low_res_side-px image cannot represent, so interpolation puts almost nothing there.
    Returns, summed over the batch and the channels:
    - `hf_ratio`: energy of `out` in the band / energy of `truth` there (1: as much detail as the truth;
      ~0: interpolation; > 1: over-sharpened or noisy). Energy ignores where the detail is.
    - `hf_corr`: Re<F_out, F_truth> / sqrt(E_out E_truth) over the band, the correlation of the two high-passed
      images (1: the right detail in the right place; ~0: noise or detail out of phase).
    - `hf_spectrum_db`: how far the output's power spectrum is from the truth's across the band, scale by
      scale: the band cut into square rings max(|k_x|, |k_y|) = k, one per integer k, and the mean over the
      rings of |10 log10(E_out(k) / E_truth(k))| (0: the truth's amount of detail at every scale; interpolation
      sits 15-25 dB below it at every ring). Like `hf_ratio` it ignores where the detail is, so it still
      means something where no model can know where the truth's detail lies (an upsampled decoder sample,
      whose objects sit a fraction of a pixel away from the source scene's); unlike it, the coarsest rings,
      which hold most of the energy, do not outweigh the finest.
    """
    a, b, _ = _pair(out, truth, None)
    h, w = b.shape[-2:]
    if not isinstance(low_res_side, int) or not 2 <= low_res_side < min(h, w):
        raise DataError(f"low_res_side = {low_res_side!r} must be an int in 2..{min(h, w) - 1} (the side of the "
                        f"upsampler's input, smaller than the {h}x{w} images)")
    fa = torch.fft.fft2(a - a.mean((-2, -1), keepdim=True))
    fb = torch.fft.fft2(b - b.mean((-2, -1), keepdim=True))
    ky = torch.fft.fftfreq(h, d=1 / h).abs()[:, None].to(a.device)
    kx = torch.fft.fftfreq(w, d=1 / w).abs()[None, :].to(a.device)
    band = torch.maximum(ky, kx) > low_res_side / 2
    power_a, power_b = fa.abs().pow(2), fb.abs().pow(2)
    e_a, e_b = power_a[..., band].sum(), power_b[..., band].sum()
    if e_b <= 1e-12 * power_b.sum():  # (rounding leaves ~1e-30 of the energy anywhere)
        raise DataError("the truth has no energy above the input's Nyquist frequency: nothing to compare")
    cross = (fa * fb.conj()).real[..., band].sum()
    ring = torch.maximum(ky, kx).round().long()                              # [h, w]: each frequency's ring k
    rings = ring[band].unique()
    per_ring = lambda power: torch.zeros(int(ring.max()) + 1, dtype=power.dtype, device=power.device).index_add_(
        0, ring.flatten(), power.flatten(0, -3).sum(0).flatten())[rings]
    floor = 1e-12 * power_b.sum()                                            # a ring with no energy: -120 dB
    ring_db = 10 * torch.log10(per_ring(power_a).clamp(min=floor) / per_ring(power_b).clamp(min=floor))
    return {"hf_ratio": float(e_a / e_b), "hf_corr": float(cross / (e_a * e_b).sqrt().clamp(min=1e-30)),
            "hf_spectrum_db": float(ring_db.abs().mean())}


# ---------------------------------------------------------------------------------------------
# embeddings: one vocabulary for both priors
# ---------------------------------------------------------------------------------------------

def embedding_metrics(pred, image_embed, text_embed, matches: dict | None = None) -> dict:
    """How good predicted image embeddings are (all `[N, D]`, rows aligned; normalised here).

    cos_image: mean cos(ẑ_i, z_i); cos_text: mean cos(ẑ_i, z_t); top1: fraction of rows whose nearest true
    z_i among the N is their own; for each `matches` entry name -> `[N, N]` bool (e.g. the same scene, an
    image that fits the caption), top1_<name>: the nearest z_i is one that matches.
    """
    pred, image_embed, text_embed = (F.normalize(x.float().cpu(), dim=-1) for x in (pred, image_embed, text_embed))
    nearest = (pred @ image_embed.T).argmax(dim=1)
    idx = torch.arange(len(pred))
    out = {"cos_image": (pred * image_embed).sum(1).mean().item(),
           "cos_text": (pred * text_embed).sum(1).mean().item(),
           "top1": (nearest == idx).float().mean().item()}
    for name, m in (matches or {}).items():
        out[f"top1_{name}"] = m[idx, nearest].float().mean().item()
    return out


class ModalityProbe:
    """A linear classifier "image embedding or text embedding?" fitted on real z_i and z_t.

    If CLIP's two modalities sit in different regions (the modality gap), it separates them; then
    `p_image(x)` says whether an embedding looks like a real image embedding (what a decoder was trained on).
    """

    def __init__(self, image_embed, text_embed, weight_decay: float = 1e-4, max_iter: int = 200):
        x = F.normalize(torch.cat([image_embed, text_embed]).float().cpu(), dim=-1)          # [2N, D]
        y = torch.cat([torch.ones(len(image_embed)), torch.zeros(len(text_embed))])
        self.w = torch.zeros(x.shape[1], requires_grad=True)
        self.b = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([self.w, self.b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():  # logistic regression with a little L2
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ self.w + self.b, y) + weight_decay * self.w.square().sum()
            loss.backward()
            return loss
        opt.step(closure)
        self.w, self.b = self.w.detach(), self.b.detach()

    def p_image(self, x) -> torch.Tensor:
        """P(image embedding) for embeddings `[N, D]` -> `[N]`."""
        return torch.sigmoid(F.normalize(x.float().cpu(), dim=-1) @ self.w + self.b)


def candidate_diversity(candidates) -> float:
    """Mean cos between different candidates of the same caption (`[B, N, D]`, N >= 2)."""
    c = F.normalize(candidates.float().cpu(), dim=-1)
    n = c.shape[1]
    sims = c @ c.transpose(1, 2)                                                          # [B, N, N]
    return ((sims.sum((1, 2)) - sims.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))).mean().item()


def pair_cosine(image_embed, match) -> float:
    """Mean cos(z_i, z_j) over the pairs i != j with match[i, j]: e.g. two images of the same scene, or an
    image and another image that fits its caption (what a perfect sampler of P(z_i | y) scores on average).
    nan when there is no such pair."""
    z = F.normalize(image_embed.float().cpu(), dim=-1)
    pairs = match & ~torch.eye(len(z), dtype=torch.bool)
    if not bool(pairs.any()):
        return float("nan")
    return (z @ z.T)[pairs].mean().item()


# ---------------------------------------------------------------------------------------------
# counts
# ---------------------------------------------------------------------------------------------

def compare_rates(p_a: float, n_a: int, p_b: float, n_b: int, z: float = 2.0) -> int:
    """+1 if the rate p_a (a fraction of n_a trials) is above p_b (of n_b) by more than `z` standard errors of
    their difference, -1 if below by as much, 0 within the noise. The standard error is the unpooled one,
    sqrt(p_a (1 - p_a) / n_a + p_b (1 - p_b) / n_b) (a two-proportion z-test; z = 2 is about a 5% two-sided
    test). Where that error is zero (each rate 0 or 1) any difference counts."""
    for p, n in ((p_a, n_a), (p_b, n_b)):
        if not (0.0 <= p <= 1.0) or n < 1:
            raise DataError(f"compare_rates needs rates in [0, 1] over at least one trial: got {p} of {n}")
    diff = p_a - p_b
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    if se == 0.0:
        return (diff > 0) - (diff < 0)
    return 1 if diff > z * se else (-1 if diff < -z * se else 0)


def paired_p(only_a: int, only_b: int) -> float:
    """The two-sided exact p of "no difference" between two models scored on the same items (the sign test
    on discordant pairs, McNemar 1947). only_a: items a got right and b wrong; only_b: the reverse; items
    both got right or both wrong say nothing about the difference. Under "no difference" each of the
    n = only_a + only_b discordant items is a fair coin, so p = 2 P(X >= max(only_a, only_b)), X ~
    Binomial(n, 1/2), capped at 1 (1 when only_a == only_b, or no item is discordant)."""
    for k in (only_a, only_b):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise DataError(f"a paired comparison needs counts of items (ints >= 0): got {only_a!r} and {only_b!r}")
    if only_a == only_b:   # no discordant items, or as many each way: no evidence either way
        return 1.0
    n, k = only_a + only_b, max(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n)


def compare_paired(only_a: int, only_b: int, z: float = 2.0) -> int:
    """+1 if model a gets more items right than model b beyond the noise, -1 if fewer, 0 within it, for two
    models scored on the same items (paired samples): `paired_p` counts below erfc(z / sqrt 2), the
    two-sided normal tail at z standard errors (4.6% at z = 2), as `compare_rates` does. Pairing removes
    the spread both models share (the items themselves, the x_T), so it tells apart differences that two
    unpaired rates cannot."""
    if paired_p(only_a, only_b) >= math.erfc(z / math.sqrt(2)):
        return 0
    return 1 if only_a > only_b else -1


def discordant(right_a, right_b) -> tuple[int, int]:
    """(only_a, only_b) for `compare_paired`: how many items only a got right, and only b, from two per-item
    lists of right/wrong in the same order (e.g. `checker.caption_accuracy(...)["right"]` of two models)."""
    right_a, right_b = list(right_a), list(right_b)
    if len(right_a) != len(right_b):
        raise DataError(f"{len(right_a)} and {len(right_b)} items: a paired comparison scores both models on the "
                        "same items, in the same order")
    return (sum(bool(a) and not b for a, b in zip(right_a, right_b)),
            sum(bool(b) and not a for a, b in zip(right_a, right_b)))
