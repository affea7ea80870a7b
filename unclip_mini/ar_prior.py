"""The autoregressive (AR) prior: caption -> CLIP image embedding as a sequence of discrete codes (unCLIP §2.2).

    "the CLIP image embedding z_i is converted into a sequence of discrete codes and predicted
     autoregressively conditioned on the caption y."  (Ramesh et al. 2022, §2.2)

The recipe, in the paper's order:

1. **PCA.** Fit PCA on the training image embeddings z_i and keep the first K components, enough to hold
   `variance_to_keep` of their variance (paper: 319 of 1,024). Components go in order of decreasing
   eigenvalue: the coarse content first, the detail last (unCLIP §4, Figure 7).
2. **Quantize.** Each kept component's coefficient is cut into `n_buckets` buckets (paper: 1,024), with
   edges either uniform over the training range or at the training quantiles (`bucket_edges`).
   A code decodes to the mean of the training coefficients in its bucket.
3. **Sequence.** A causal transformer (transformer.py, shared with the diffusion prior) reads the prefix
   [caption tokens (CLIP's per-token features, projected), z_t (projected), a token for the quantized
   z_i . z_t] and predicts the K codes one at a time with cross-entropy.
4. **Sampling.** The dot-product token is drawn from the top `1 - dot_percentile` of its training
   distribution ("captions which better describe the image"); the caption is dropped 10% of the time in
   training so the logits can be guided (classifier-free guidance); codes are drawn with a temperature,
   a whole batch at once, with a KV cache so each new code costs one position, not the whole sequence.
5. **Decode.** Codes -> bucket centres -> inverse PCA -> renormalise to unit norm: z_i.

What is left out: the paper's AR prior has its own 24-layer text encoder over the caption (Table 3); here the
caption enters as the frozen CLIP text transformer's token features, projected to the prior's width.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import PresetConfig, check, check_choice, check_positive, check_range
from .errors import ConfigError, DataError
from .progress import tqdm
from .train import StageSpec, TrainConfig
from . import gaussian_diffusion as gd
from .transformer import Transformer


@dataclass(frozen=True)
class ARPriorConfig(PresetConfig):
    """PCA + quantizer + causal transformer of the AR prior (sizes: unCLIP Table 3, 'AR prior' column)."""
    variance_to_keep: float = 0.99     # keep the fewest components holding this much variance (paper: "<1% MSE")
    n_components: int | None = None    # or keep exactly this many (paper: 319 of 1,024); None: use variance_to_keep
    n_buckets: int = 256               # buckets per kept component (paper: 1024)
    bucket_edges: str = "quantile"     # 'quantile' (equal counts) | 'uniform' (equal widths); paper: not stated
    dot_buckets: int = 32              # buckets of the z_i . z_t token, at its training quantiles (paper: not stated)
    width: int = 96                    # transformer width (paper: 1664, the "latent decoder")
    layers: int = 3                    # (paper: 24)
    heads: int = 4                     # (paper: 26)
    dropout: float = 0.0               # (paper: none)
    checkpoint: bool = False           # activation checkpointing per block in training (paper: not stated; on at
                                       # `paper`: batch 4096 of 24 blocks x 1664 wide would not fit otherwise)
    cond_drop_prob: float = 0.1        # drop caption, z_t and dot token together, for guidance (paper: 10%)
    guidance_scale: float = 1.0        # classifier-free guidance on the logits; 1 = off (paper §5.5: guiding hurt)
    temperature: float = 1.0           # softmax temperature when sampling codes; 0 = argmax
    dot_percentile: float = 0.5        # draw the dot token from above this quantile (paper: 0.5, "the top half")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="cosine", weight_decay=0.04,
        betas=(0.9, 0.95), ema_decay=0.999, ckpt_every=500, log_every=25))

    def __post_init__(self):
        check_range(self, "variance_to_keep", 0.0, 1.0, low_open=True)
        if self.n_components is not None:
            check_positive(self, "n_components")
        check_range(self, "n_buckets", 2, integer=True)
        check_choice(self, "bucket_edges", ("quantile", "uniform"))
        check_range(self, "dot_buckets", 2, integer=True)
        check_positive(self, "width", "layers", "heads")
        check(self.width % self.heads == 0, self, "heads", f"must divide width {self.width}")
        check_range(self, "dropout", 0.0, 1.0, high_open=True)
        check_choice(self, "checkpoint", (True, False))
        check_range(self, "cond_drop_prob", 0.0, 1.0)
        check_range(self, "guidance_scale", 0.0)
        check_range(self, "temperature", 0.0)
        check_range(self, "dot_percentile", 0.0, 1.0, high_open=True)
        check(self.guidance_scale == 1.0 or self.cond_drop_prob > 0, self, "guidance_scale",
              "guidance needs an unconditional model: set cond_drop_prob > 0 (paper: 0.1) or guidance_scale=1")

    @classmethod
    def smoke(cls):
        return cls(n_buckets=16, dot_buckets=8, width=32, layers=1, heads=2,
                   train=TrainConfig(steps=20, batch_size=32, lr=1e-3, warmup_steps=5, ckpt_every=10,
                                     log_every=5, ema_decay=0.9))

    @classmethod
    def toy(cls):
        # the toy diffusion prior's size and training time (README, measurements). Sampling: at toy size codes
        # drawn at temperature 1 scatter z_i further from the truth than z_t itself is, so the toy draws the
        # most likely code (temperature 0) and the dot token from its whole training range (percentile 0: the
        # marginal top half ignores the caption and pushed the codes off this caption's images); the
        # measurements are in the README's table
        return cls(temperature=0.0, dot_percentile=0.0)

    @classmethod
    def small(cls):
        return cls(n_buckets=1024, width=512, layers=12, heads=8,  # the small diffusion prior's size
                   train=TrainConfig(steps=20000, batch_size=1024, lr=3e-4, warmup_steps=1000,
                                     lr_schedule="cosine", weight_decay=0.04, betas=(0.9, 0.95),
                                     ema_decay=0.999, ckpt_every=2000, log_every=100, precision="bf16"))

    @classmethod
    def paper(cls):
        # Table 3, AR prior: latent decoder 1664 wide, 24 deep, 26 heads, context 384; AdamW wd 4e-2,
        # batch 4096, 1M iterations, lr 1.6e-4, beta2 0.91, Adam eps 1e-10, EMA 0.999.
        return cls(n_components=319, n_buckets=1024, width=1664, layers=24, heads=26, checkpoint=True,
                   train=TrainConfig(steps=1_000_000, batch_size=4096, lr=1.6e-4, warmup_steps=10000,
                                     weight_decay=0.04, betas=(0.9, 0.91), eps=1e-10, ema_decay=0.999,
                                     ckpt_every=5000, log_every=100, precision="bf16", grad_clip=0.0,
                                     decay_1d=False, parallel="fsdp"))

    def pca_config(self) -> dict:
        """The fields that determine the PCA + quantizer artifact."""
        return {k: getattr(self, k) for k in ("variance_to_keep", "n_components", "n_buckets", "bucket_edges",
                                              "dot_buckets")}


# ---------------------------------------------------------------------------------------------
# PCA + quantizer
# ---------------------------------------------------------------------------------------------

def components_for_variance(explained_variance_ratio, variance_to_keep: float) -> int:
    """The fewest leading components whose explained-variance ratios sum to >= `variance_to_keep`."""
    cum = np.cumsum(np.asarray(explained_variance_ratio, dtype=np.float64))
    return int(min(len(cum), np.searchsorted(cum, variance_to_keep - 1e-12) + 1))


def bucket_edges(coeffs: torch.Tensor, n_buckets: int, kind: str = "quantile") -> torch.Tensor:
    """Edges `[K, n_buckets + 1]` per column of `coeffs [N, K]`: equal widths ('uniform') or counts ('quantile')."""
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 2:
        raise ConfigError(f"n_buckets = {n_buckets!r}: a quantizer needs at least 2 buckets (paper: 1024)")
    x = coeffs.double()
    if kind == "uniform":
        lo, hi = x.min(0).values, x.max(0).values                      # [K]
        t = torch.linspace(0, 1, n_buckets + 1, dtype=torch.float64)
        return (lo[:, None] + (hi - lo)[:, None] * t[None]).float()
    if kind == "quantile":
        q = np.linspace(0, 1, n_buckets + 1)
        return torch.from_numpy(np.quantile(x.numpy(), q, axis=0).T.copy()).float()  # [K, n+1]
    raise ConfigError(f"bucket_edges = {kind!r} is not a valid choice; valid choices: 'quantile', 'uniform'")


def quantize(coeffs: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Codes `[B, K]` (long): the bucket of each coefficient; values past the end edges go to the end buckets."""
    inner = edges[:, 1:-1].contiguous()                                 # [K, n-1]
    return torch.searchsorted(inner, coeffs.T.contiguous(), right=True).T  # [B, K] in [0, n-1]


def bucket_centres(coeffs: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Centres `[K, n]`: the mean training coefficient of each bucket (its midpoint if the bucket is empty)."""
    k, n = edges.shape[0], edges.shape[1] - 1
    codes = quantize(coeffs, edges)                                     # [N, K]
    flat = (codes + n * torch.arange(k)[None]).reshape(-1)              # bucket id across components
    total = torch.zeros(k * n, dtype=torch.float64).index_add_(0, flat, coeffs.double().reshape(-1))
    count = torch.zeros(k * n, dtype=torch.float64).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    mid = 0.5 * (edges[:, 1:] + edges[:, :-1]).double().reshape(-1)
    return torch.where(count > 0, total / count.clamp(min=1), mid).reshape(k, n).float()


FIT_SAMPLES = 200_000  # the most image embeddings the PCA and the bucket edges are fitted on


class PCAQuantizer:
    """z_i <-> codes: PCA to the first K components, each quantized into buckets (unCLIP §2.2).

    Holds `mean [D]`, `components [C, D]` (every component the fit found, decreasing eigenvalue),
    `explained_variance_ratio [C]`, `n_components` K (the kept ones), `edges [K, n+1]`, `centres [K, n]`,
    and the dot-token quantizer `dot_edges [dot_buckets + 1]` (quantiles of the training z_i . z_t).
    """

    def __init__(self, mean, components, explained_variance_ratio, n_components, edges, centres, dot_edges,
                 bucket_kind="quantile"):
        self.mean, self.components = mean.float(), components.float()
        self.explained_variance_ratio = explained_variance_ratio.float()
        self.n_components, self.bucket_kind = int(n_components), bucket_kind
        self.edges, self.centres, self.dot_edges = edges.float(), centres.float(), dot_edges.float()

    # -- fitting -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, image_embed: torch.Tensor, text_embed: torch.Tensor | None = None, *, n_components=None,
            variance_to_keep: float = 0.99, n_buckets: int = 256, bucket_edges_kind: str = "quantile",
            dot_buckets: int = 32) -> "PCAQuantizer":
        """Fit PCA (scikit-learn) on `image_embed [N, D]` and the bucket edges of the kept components.

        `text_embed [N, D]` (the paired z_t) sets the dot-token buckets; without it they span [-1, 1].
        """
        from sklearn.decomposition import PCA
        if image_embed.dim() != 2:
            raise DataError(f"image_embed must be [N, D], got {tuple(image_embed.shape)}")
        n, d = image_embed.shape
        if n_components is not None and (isinstance(n_components, bool) or not isinstance(n_components, int)
                                         or n_components < 1):
            raise ConfigError(f"n_components = {n_components!r} must be a positive int (or None to keep "
                              f"{variance_to_keep:.0%} of the variance)")
        if n_components is not None and n_components > d:
            raise ConfigError(f"n_components = {n_components} but the image embedding has only {d} dimensions: "
                              f"ask for at most {d} components, or set n_components=None to keep "
                              f"variance_to_keep = {variance_to_keep} of the variance")
        want = n_components if n_components is not None else d
        if n <= want:
            raise DataError(f"PCA was given {n} image embeddings but must find {want} components: fit it on "
                            f"more than {want} embeddings (the whole 'train' split), or keep fewer components "
                            f"(n_components < {n})")
        if n_buckets < 2 or dot_buckets < 2:
            raise ConfigError(f"n_buckets = {n_buckets}, dot_buckets = {dot_buckets}: a quantizer needs at "
                              f"least 2 buckets (paper: 1024 per component)")
        if n > FIT_SAMPLES:  # paper scale: a fixed random subset pins the PCA and the quantiles down closely enough
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:FIT_SAMPLES]
            image_embed = image_embed[pick]
            text_embed = None if text_embed is None else text_embed[pick]
        pca = PCA(svd_solver="full").fit(image_embed.double().cpu().numpy())
        ratio = torch.from_numpy(pca.explained_variance_ratio_.copy())
        k = n_components if n_components is not None else components_for_variance(ratio, variance_to_keep)
        mean = torch.from_numpy(pca.mean_.copy())
        components = torch.from_numpy(pca.components_.copy())          # [C, D], decreasing eigenvalue
        coeffs = (image_embed.double().cpu() - mean) @ components[:k].T  # [N, K]
        edges = bucket_edges(coeffs, n_buckets, bucket_edges_kind)
        centres = bucket_centres(coeffs.float(), edges)
        if text_embed is not None:
            dots = (image_embed.double() * text_embed.double()).sum(-1).cpu()
            dot_edges = torch.from_numpy(np.quantile(dots.numpy(), np.linspace(0, 1, dot_buckets + 1)))
        else:
            dot_edges = torch.linspace(-1, 1, dot_buckets + 1)
        return cls(mean, components, ratio, k, edges, centres, dot_edges, bucket_edges_kind)

    @property
    def n_buckets(self) -> int:
        return self.edges.shape[1] - 1

    @property
    def dot_buckets(self) -> int:
        return self.dot_edges.shape[0] - 1

    @property
    def embed_dim(self) -> int:
        return self.mean.shape[0]

    # -- PCA ---------------------------------------------------------------------------------
    def project(self, image_embed: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """PCA coefficients `[B, k]` of `image_embed [B, D]` (k = the kept components by default)."""
        k = self.n_components if k is None else k
        return (image_embed.float() - self.mean.to(image_embed.device)) @ self.components[:k].to(image_embed.device).T

    def unproject(self, coeffs: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
        """Inverse PCA of `coeffs [B, k]` (the leading k components) -> `[B, D]`, unit norm by default."""
        z = self.mean.to(coeffs.device) + coeffs.float() @ self.components[:coeffs.shape[1]].to(coeffs.device)
        return F.normalize(z, dim=-1) if renormalize else z

    def pca_reconstruct(self, image_embed: torch.Tensor, k: int, renormalize: bool = True) -> torch.Tensor:
        """z_i rebuilt from its first k principal components `[B, D]` (the PCA probing of unCLIP §4, Figure 7)."""
        if not 1 <= k <= self.components.shape[0]:
            raise ConfigError(f"k = {k}: the PCA has {self.components.shape[0]} components; use 1 <= k <= "
                              f"{self.components.shape[0]}")
        return self.unproject(self.project(image_embed, k), renormalize)

    # -- codes -------------------------------------------------------------------------------
    def encode(self, image_embed: torch.Tensor) -> torch.Tensor:
        """z_i `[B, D]` -> codes `[B, K]` (long, in [0, n_buckets))."""
        return quantize(self.project(image_embed), self.edges)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes `[B, K]` -> PCA coefficients `[B, K]` (bucket centres)."""
        return torch.gather(self.centres.to(codes.device), 1, codes.T.long()).T    # centres[k, codes[b, k]]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes `[B, K]` -> z_i `[B, D]`: bucket centres, inverse PCA, renormalised to unit norm."""
        return self.unproject(self.dequantize(codes).cpu()).to(codes.device)

    def dot_codes(self, image_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
        """The quantized z_i . z_t token `[B]` (long, in [0, dot_buckets))."""
        dots = (image_embed.float() * text_embed.float()).sum(-1)
        return torch.bucketize(dots.cpu(), self.dot_edges[1:-1].contiguous(), right=True)

    def sample_dot_codes(self, batch: int, percentile: float, generator=None) -> torch.Tensor:
        """Dot tokens `[batch]` drawn from the training distribution above its `percentile` quantile.

        The dot edges are the training quantiles, so bucket j holds the fraction 1/n between the j/n and
        (j+1)/n quantiles: u ~ U[percentile, 1) -> bucket floor(u n) draws from the top (1 - percentile).
        """
        if not 0.0 <= percentile < 1.0:
            raise ConfigError(f"dot_percentile = {percentile!r} must be in [0, 1) (0.5 = the top half, as in "
                              f"the paper; 0 = the whole distribution)")
        u = percentile + (1 - percentile) * torch.rand(batch, generator=generator, device="cpu"
                                                       if generator is None else generator.device).cpu()
        return (u * self.dot_buckets).floor().long().clamp(max=self.dot_buckets - 1)

    # -- storage -----------------------------------------------------------------------------
    def to_payload(self) -> dict:
        """Plain tensors (and an int and a str) for `RunFolder.save`."""
        return {"mean": self.mean, "components": self.components,
                "explained_variance_ratio": self.explained_variance_ratio, "n_components": self.n_components,
                "edges": self.edges, "centres": self.centres, "dot_edges": self.dot_edges,
                "bucket_kind": self.bucket_kind}

    @classmethod
    def from_payload(cls, p: dict) -> "PCAQuantizer":
        return cls(p["mean"], p["components"], p["explained_variance_ratio"], p["n_components"], p["edges"],
                   p["centres"], p["dot_edges"], p.get("bucket_kind", "quantile"))


def reconstruction_error(image_embed: torch.Tensor, image_embed_hat: torch.Tensor) -> float:
    """Mean squared error relative to the mean squared norm: E||z - z_hat||^2 / E||z||^2 (paper's footnote 1)."""
    z, zh = image_embed.float(), image_embed_hat.float()
    return float(((z - zh) ** 2).sum(-1).mean() / (z ** 2).sum(-1).mean())


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------

class ARPriorNetwork(nn.Module):
    """Causal transformer over [caption tokens, z_t, dot token, code_1 .. code_K-1] -> logits of code_1 .. code_K.

    Args:
        cfg: ARPriorConfig.
        embed_dim: D, the CLIP embedding width (z_t, z_i).
        text_width: W, the width of CLIP's per-token caption features.
        text_len: the most caption tokens a prefix may hold (the CLIP context length).
        n_components: K, the codes per embedding.
    """

    def __init__(self, cfg: ARPriorConfig, embed_dim: int, text_width: int, text_len: int, n_components: int):
        super().__init__()
        self.cfg, self.text_len, self.n_components = cfg, text_len, n_components
        w = cfg.width
        self.text_proj = nn.Linear(text_width, w)                        # caption token features -> width
        self.text_embed_proj = nn.Linear(embed_dim, w)                   # z_t -> one token
        self.null_text_embed = nn.Parameter(torch.zeros(w))              # z_t's token when the caption is dropped
        self.dot_embedding = nn.Embedding(cfg.dot_buckets + 1, w)        # the last row: "dropped"
        self.code_embedding = nn.Embedding(cfg.n_buckets, w)             # shared by every component
        self.positions = nn.Parameter(torch.randn(text_len + 2 + n_components, w) * 0.02)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, causal=True, dropout=cfg.dropout,
                                       checkpoint=cfg.checkpoint)
        self.head = nn.Linear(w, cfg.n_buckets)
        nn.init.normal_(self.code_embedding.weight, std=0.02)
        nn.init.normal_(self.dot_embedding.weight, std=0.02)

    def embed_prefix(self, text_tokens, text_mask, text_embed, dot_codes, drop=None):
        """The prefix `[B, L + 2, W]` and its key mask `[B, L + 2]`; `drop [B]` bool replaces the caption by nothing."""
        b, l, _ = text_tokens.shape
        if l > self.text_len:
            raise DataError(f"the caption has {l} tokens but this AR prior was built for at most {self.text_len}: "
                            f"use the CLIP it was trained with (its context length is {self.text_len})")
        tok = self.text_proj(text_tokens.to(self.positions.dtype)) + self.positions[:l]          # [B, L, W]
        # z_t is unit norm: x sqrt(D) gives it unit variance per dim, like the other inputs
        zt = self.text_embed_proj(text_embed.to(self.positions.dtype) * text_embed.shape[-1] ** 0.5)  # [B, W]
        dot_codes = dot_codes.long()
        mask = text_mask.bool()
        if drop is not None:
            zt = torch.where(drop[:, None], self.null_text_embed.expand_as(zt), zt)
            dot_codes = torch.where(drop, torch.full_like(dot_codes, self.cfg.dot_buckets), dot_codes)
            mask = mask & ~drop[:, None]                                  # a dropped caption: every token hidden
        zt = zt + self.positions[self.text_len]
        dot = self.dot_embedding(dot_codes) + self.positions[self.text_len + 1]
        x = torch.cat([tok, zt[:, None], dot[:, None]], dim=1)
        keep = torch.cat([mask, torch.ones(b, 2, dtype=torch.bool, device=mask.device)], dim=1)
        return x, keep

    def embed_codes(self, codes, start: int = 0):
        """Codes `[B, k]` (components start .. start+k-1) -> inputs `[B, k, W]`."""
        p = self.text_len + 2 + start
        return self.code_embedding(codes) + self.positions[p:p + codes.shape[1]]

    def forward(self, text_tokens, text_mask, text_embed, dot_codes, codes, drop=None):
        """Teacher-forced logits `[B, K, n_buckets]` of every code; `codes [B, K]` are the targets."""
        x, keep = self.embed_prefix(text_tokens, text_mask, text_embed, dot_codes, drop)
        l = x.shape[1]
        x = torch.cat([x, self.embed_codes(codes[:, :-1])], dim=1)       # [B, L + 2 + K - 1, W]
        keep = torch.cat([keep, torch.ones_like(codes[:, :-1], dtype=torch.bool)], dim=1)
        keep = None if bool(keep.all()) else keep
        h = self.transformer(x, key_padding_mask=keep)
        return self.head(h[:, l - 1:])                                   # outputs at dot, code_1 .. code_K-1

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_codes(self, text_tokens, text_mask, text_embed, dot_codes, *, guidance_scale: float = 1.0,
                     temperature: float = 1.0, generator=None, use_cache: bool = True) -> torch.Tensor:
        """Draw the K codes `[B, K]` one at a time (guided on the logits; temperature 0 = argmax).

        With `use_cache` the prefix runs once and each new code is one position through the KV cache;
        without it every step re-runs the whole sequence (the same numbers, much slower).
        """
        b, dev = text_tokens.shape[0], self.positions.device
        text_tokens, text_mask = text_tokens.to(dev), text_mask.to(dev)
        text_embed, dot_codes = text_embed.to(dev), dot_codes.to(dev)
        guided = guidance_scale != 1.0
        drop = None
        if guided:  # one doubled batch: conditional rows, then the same rows with the caption dropped
            text_tokens, text_mask, text_embed, dot_codes, drop = gd.with_null_rows(
                text_tokens, text_mask, text_embed, dot_codes)
        prefix, keep = self.embed_prefix(text_tokens, text_mask, text_embed, dot_codes, drop)
        rows, k_total = prefix.shape[0], self.n_components
        codes = torch.zeros(b, k_total, dtype=torch.long, device=dev)
        cache = self.transformer.init_cache(rows, prefix.shape[1] + k_total - 1) if use_cache else None
        h = self.transformer(prefix, key_padding_mask=keep, cache=cache)[:, -1]
        for k in range(k_total):
            logits = self.head(h).float()                                             # [B (x2), n_buckets]
            if guided:  # classifier-free guidance on the logits
                logits = gd.guide(logits[:b], logits[b:], guidance_scale)
            if temperature == 0:
                code = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                u = torch.rand(b, generator=generator, device="cpu" if generator is None else generator.device)
                code = torch.searchsorted(probs.cumsum(-1), u.to(dev)[:, None]).squeeze(-1)
                code = code.clamp(max=probs.shape[-1] - 1)
            codes[:, k] = code
            if k == k_total - 1:
                break
            new = torch.cat([codes[:, k:k + 1]] * (2 if guided else 1))
            if use_cache:
                h = self.transformer(self.embed_codes(new, start=k), cache=cache)[:, -1]
            else:  # the whole sequence again, for comparison
                both = torch.cat([codes[:, :k + 1]] * (2 if guided else 1))
                x = torch.cat([prefix, self.embed_codes(both)], dim=1)
                full_keep = torch.cat([keep, torch.ones_like(both, dtype=torch.bool)], dim=1)
                h = self.transformer(x, key_padding_mask=full_keep)[:, -1]
        return codes


def ar_loss_fn(cond_drop_prob: float):
    """`loss_fn(model, batch, generator)` for the Trainer: cross-entropy of every code, caption dropped at random."""
    def loss_fn(model, batch, generator):
        codes = batch["codes"]
        b = codes.shape[0]
        drop = distributed.rand(b, generator, codes.device) < cond_drop_prob
        logits = model(batch["text_tokens"], batch["text_mask"], batch["text_embed"], batch["dot_codes"],
                       codes, drop)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
        acc = (logits.argmax(-1) == codes).float().mean()
        return loss, {"acc": float(acc)}
    return loss_fn


# ---------------------------------------------------------------------------------------------
# the trained prior: caption -> z_i
# ---------------------------------------------------------------------------------------------

class ARPrior:
    """A trained AR prior and its PCA quantizer: `sample(text_embed, text_tokens, text_mask) -> z_i [B, D]`."""

    def __init__(self, model: ARPriorNetwork, quantizer: PCAQuantizer, cfg: ARPriorConfig, device="cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.quantizer, self.cfg, self.device = quantizer, cfg, torch.device(device)
        self.record = None  # the stage record, when it came from a run folder (stages.load_or_train)

    @torch.no_grad()
    def sample(self, text_embed, text_tokens, text_mask, guidance_scale=None, temperature=None,
               dot_percentile=None, generator=None, use_cache: bool = True, batch_size: int = 512,
               return_codes: bool = False, progress: bool = False):
        """Image embeddings `[B, D]` (unit norm) for captions given as z_t `[B, D]`, token features `[B, L, W]`
        and mask `[B, L]`. None takes the config's value; `return_codes` also returns the codes `[B, K]`."""
        cfg = self.cfg
        g = cfg.guidance_scale if guidance_scale is None else guidance_scale
        t = cfg.temperature if temperature is None else temperature
        p = cfg.dot_percentile if dot_percentile is None else dot_percentile
        if text_tokens.dim() != 3 or text_mask.shape != text_tokens.shape[:2] or text_embed.shape[0] != \
                text_tokens.shape[0]:
            raise DataError(f"text_embed {tuple(text_embed.shape)}, text_tokens {tuple(text_tokens.shape)} and "
                            f"text_mask {tuple(text_mask.shape)} must be [B, D], [B, L, W] and [B, L] for the "
                            f"same B: pass the output of ClipEncoder.encode_text")
        if g != 1.0 and cfg.cond_drop_prob == 0:
            raise ConfigError(f"guidance_scale = {g} needs a prior trained with cond_drop_prob > 0; use 1.0")
        out, all_codes = [], []
        n = text_embed.shape[0]
        for s in tqdm(range(0, n, batch_size), desc="AR prior", disable=not progress):
            sl = slice(s, s + batch_size)
            dots = self.quantizer.sample_dot_codes(text_embed[sl].shape[0], p, generator)
            codes = self.model.sample_codes(text_tokens[sl].float(), text_mask[sl], text_embed[sl].float(), dots,
                                            guidance_scale=g, temperature=t, generator=generator,
                                            use_cache=use_cache)
            all_codes.append(codes.cpu())
            out.append(self.quantizer.decode(codes.cpu()))
        z = torch.cat(out).to(text_embed.device)
        return (z, torch.cat(all_codes)) if return_codes else z


# ---------------------------------------------------------------------------------------------
# the stage: fit the PCA quantizer on the train split's z_i (`ar_prior/pca.pt`), then train the prior
# ---------------------------------------------------------------------------------------------

def _prepare(cfg: ARPriorConfig, ctx) -> dict:
    emb = ctx.embeddings("train")
    quantizer = PCAQuantizer.fit(emb["image_embed"], emb["text_embed"], n_components=cfg.n_components,
                                 variance_to_keep=cfg.variance_to_keep, n_buckets=cfg.n_buckets,
                                 bucket_edges_kind=cfg.bucket_edges, dot_buckets=cfg.dot_buckets)
    ctx.save("pca", quantizer.to_payload(), config=cfg.pca_config())
    return {"embed_dim": quantizer.embed_dim, "text_width": int(emb["text_tokens"].shape[-1]),
            "text_len": int(ctx.cfg.clip.context_length), "n_components": quantizer.n_components}


def _quantizer(cfg: ARPriorConfig, ctx) -> PCAQuantizer:
    return PCAQuantizer.from_payload(ctx.load("pca", config=cfg.pca_config()))


def _batches(cfg: ARPriorConfig, dims, ctx):
    emb, quantizer, device = ctx.embeddings("train"), _quantizer(cfg, ctx), ctx.device
    codes = quantizer.encode(emb["image_embed"])                                  # [N, K]
    dot_codes = quantizer.dot_codes(emb["image_embed"], emb["text_embed"])        # [N]

    def get_batch(idx):
        mask = emb["text_mask"][idx]
        n = max(int(mask.sum(1).max()), 1)  # captions are right-padded: drop columns padded in every row
        return {"text_tokens": emb["text_tokens"][idx, :n].float().to(device), "text_mask": mask[:, :n].to(device),
                "text_embed": emb["text_embed"][idx].to(device), "dot_codes": dot_codes[idx].to(device),
                "codes": codes[idx].to(device)}
    return get_batch, len(codes)


def build_network(cfg: ARPriorConfig, dims: dict) -> ARPriorNetwork:
    return ARPriorNetwork(cfg, dims["embed_dim"], dims["text_width"], dims["text_len"], dims["n_components"])


SPEC = StageSpec(
    name="ar_prior", needs=("clip",), notebook="05_ar_prior",
    about="caption -> CLIP image embedding as PCA-quantized codes, autoregressively",
    prepare=_prepare, batches=_batches, build=build_network,
    loss=lambda cfg, dims, ctx: ar_loss_fn(cfg.cond_drop_prob),
    wrap=lambda network, cfg, dims, ctx: ARPrior(network, _quantizer(cfg, ctx), cfg, ctx.device),
    sampling_fields=("guidance_scale", "temperature", "dot_percentile"))
