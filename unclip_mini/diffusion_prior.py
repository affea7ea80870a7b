"""The diffusion prior: caption -> CLIP image embedding z_i by Gaussian diffusion (unCLIP §2.2, Appendix C).

Ramesh et al. 2022 model P(z_i | y) with "a decoder-only Transformer with a causal attention mask on a
sequence consisting of, in order: the encoded text, the CLIP text embedding, an embedding for the
diffusion timestep, the noised CLIP image embedding, and a final embedding whose output from the
Transformer is used to predict the unnoised CLIP image embedding" (§2.2). One sequence per example:

    position   0 .. L-1            L      L+1     L+2        L+3
    token      caption features    z_t    t       z_i^(t)    query  -> f(z_i^(t), t, y) = z_i (x0-prediction)

trained with L_prior = E_{t, z_i^(t)} || f(z_i^(t), t, y) - z_i ||^2 (the library's `training_losses` with
`mean_type='x0'`). Details:

- Scale. Unit-norm CLIP embeddings in D dims have a per-dim std of about 1/sqrt(D): far below the
  unit-variance noise, so almost every noise level would destroy them. z_i is multiplied by
  `embed_scale` before diffusion and samples are renormalised to unit norm after. The paper scales by 17.2
  "to match the empirical variance of RGB pixel values of ImageNet images scaled to [-1,1]" (Appendix C);
  None gives sqrt(D), unit variance per dim (DALLE2-pytorch's default). Notebook 04 measures the choice.
- Classifier-free guidance. With probability `cond_drop_prob` (paper: 10%) a training example loses
  its caption: every caption token is masked out and z_t is replaced by a learned null embedding. The
  timestep and the noised z_i are never dropped: the unconditional model still denoises.
- Causality pays at sampling time: the caption tokens and z_t come first, so their keys and values do
  not depend on t or on z_i^(t). `encode_prefix` runs them once into a KV cache, and each of the
  sampler's steps runs only the last three positions (`forward_cached`).
- Sampling: DDIM (eta = 0) on `sample_steps` respaced steps (paper: 64, with Analytic-DPM's variance,
  which is not implemented here), guidance scale s, and best-of-N: N candidates per caption, keep the
  one with the largest dot product with z_t (paper: N = 2).

Not implemented: the paper's analytic sampling variance (Bao et al. 2022).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from . import gaussian_diffusion as gd
from .config import PresetConfig, check, check_choice, check_positive, check_range
from .errors import ConfigError, DataError
from .progress import tqdm
from .train import StageSpec, TrainConfig
from .transformer import KVCache, Transformer
from .unet import timestep_embedding

SLOTS = ("text_embed", "timestep", "noised_image_embed", "query")  # the 4 positions after the caption
SAMPLING_FIELDS = ("sample_steps", "guidance_scale", "num_candidates", "eta")  # not part of what is trained


def _prior_diffusion(timesteps: int = 1000) -> gd.DiffusionConfig:
    # unCLIP Table 3: 1000 steps, cosine schedule; the prior predicts z_i itself (x0) and trains on MSE
    return gd.DiffusionConfig(timesteps=timesteps, schedule="cosine", mean_type="x0", var_type="fixed_small",
                              loss_type="mse")


@dataclass(frozen=True)
class DiffusionPriorConfig(PresetConfig):
    """The diffusion prior: transformer size, diffusion, embedding scale, guidance, sampling, training."""
    width: int = 128                  # transformer width (paper: 2048, Table 3)
    layers: int = 4                   # transformer blocks (paper: 24)
    heads: int = 4                    # attention heads (paper: 32)
    dropout: float = 0.0              # residual / attention dropout (paper: none listed)
    checkpoint: bool = False          # activation checkpointing per block in training (paper: not stated; on at
                                      # `paper`: batch 4096 of 24 blocks x 2048 wide would not fit otherwise)
    diffusion: gd.DiffusionConfig = field(default_factory=_prior_diffusion)  # paper: 1000 steps, cosine, x0
    embed_scale: float | None = None  # z_i is multiplied by this before diffusion; None: sqrt(D) (paper: 17.2)
    cond_drop_prob: float = 0.1       # caption + z_t replaced by null embeddings this often (paper: 10%)
    sample_steps: int = 64            # DDIM steps when sampling (paper: 64)
    guidance_scale: float = 1.0       # classifier-free guidance s; 1 = plain conditional (paper's value: not checked)
    num_candidates: int = 2           # best-of-N: keep the candidate with the largest z_i . z_t (paper: 2)
    eta: float = 0.0                  # DDIM eta (0: deterministic given the noise; paper: analytic variance)
    text_gap: float = 0.0             # 0: CLIP's own z_t. > 0: z_t moved this far along the text-minus-image
    #                                   direction and renormalised, widening CLIP's modality gap (notebook 10)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2000, batch_size=256, lr=1e-3, warmup_steps=100, lr_schedule="cosine", weight_decay=0.0,
        ema_decay=0.999, ckpt_every=500, log_every=20))

    def __post_init__(self):
        check_positive(self, "width", "layers", "heads", "sample_steps", "num_candidates")
        check(self.width % self.heads == 0, self, "heads", f"must divide width {self.width}")
        check_range(self, "dropout", 0.0, 1.0, high_open=True)
        check_choice(self, "checkpoint", (True, False))
        check(isinstance(self.diffusion, gd.DiffusionConfig), self, "diffusion",
              "must be a gaussian_diffusion.DiffusionConfig")
        check(self.diffusion.var_type != "learned_range", self, "diffusion",
              "the prior predicts one value per embedding dim: use var_type='fixed_small' (or 'fixed_large')")
        if self.embed_scale is not None:
            check_range(self, "embed_scale", 0.0, low_open=True, integer=False)
        check_range(self, "cond_drop_prob", 0.0, 1.0, high_open=True)
        check(2 <= self.sample_steps <= self.diffusion.timesteps, self, "sample_steps",
              f"DDIM needs between 2 and the {self.diffusion.timesteps} diffusion steps")
        check_range(self, "guidance_scale", 0.0)
        check_range(self, "eta", 0.0, 1.0)
        check_range(self, "text_gap", 0.0)
        check(isinstance(self.train, TrainConfig), self, "train", "must be a train.TrainConfig")

    @classmethod
    def smoke(cls):
        return cls(width=32, layers=1, heads=2, diffusion=_prior_diffusion(100), sample_steps=8,
                   train=TrainConfig(steps=20, batch_size=32, lr=1e-3, warmup_steps=5, ckpt_every=10,
                                     log_every=5, ema_decay=0.9))

    @classmethod
    def toy(cls):
        # sizes, steps and sampling settings: the README's measurements table
        # embed_scale 16 (sqrt(D) = 8 before): the candidates vary more at equal cosine to z_i
        return cls(width=96, layers=3, heads=4, sample_steps=16, embed_scale=16.0, train=TrainConfig(
            steps=1200, batch_size=128, lr=1e-3, warmup_steps=100, lr_schedule="cosine", ema_decay=0.999,
            ckpt_every=400, log_every=20))

    @classmethod
    def small(cls):
        return cls(width=512, layers=12, heads=8, train=TrainConfig(
            steps=20000, batch_size=1024, lr=3e-4, warmup_steps=1000, lr_schedule="cosine", weight_decay=6e-2,
            betas=(0.9, 0.96), ema_decay=0.9999, ckpt_every=2000, log_every=50, precision="bf16"))

    @classmethod
    def paper(cls):
        # unCLIP Table 3 (diffusion prior): 1B params, width 2048, 24 blocks, 32 heads, batch 4096, 600K
        # iterations, lr 1.1e-4, Adam beta2 0.96, weight decay 6.0e-2, EMA 0.9999; 1000 cosine steps, 64
        # sampling steps. The warm-up length is not given there (ours: 10K steps).
        return cls(width=2048, layers=24, heads=32, embed_scale=17.2, checkpoint=True, train=TrainConfig(
            steps=600_000, batch_size=4096, lr=1.1e-4, warmup_steps=10_000, lr_schedule="constant",
            weight_decay=6e-2, betas=(0.9, 0.96), eps=1e-6, ema_decay=0.9999, ckpt_every=5000, log_every=100,
            precision="bf16", grad_clip=0.0, decay_1d=False, parallel="fsdp"))

    def scale_for(self, embed_dim: int) -> float:
        """The factor z_i is multiplied by before diffusion: `embed_scale`, or sqrt(D) when it is None."""
        return float(self.embed_scale) if self.embed_scale is not None else math.sqrt(embed_dim)


# ---------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------

class DiffusionPriorNetwork(nn.Module):
    """f(z_i^(t), t, y): the causal transformer over [caption tokens, z_t, t, z_i^(t), query] -> z_i [B, D]."""

    def __init__(self, cfg: DiffusionPriorConfig, embed_dim: int, text_width: int, max_text_len: int):
        super().__init__()
        w = cfg.width
        self.cfg, self.embed_dim, self.text_width, self.max_text_len = cfg, embed_dim, text_width, max_text_len
        self.text_proj = nn.Linear(text_width, w)           # caption token features [B, L, W_text] -> width
        self.text_embed_proj = nn.Linear(embed_dim, w)      # z_t
        self.image_embed_proj = nn.Linear(embed_dim, w)     # the noised z_i^(t)
        self.time_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))  # sinusoid -> MLP (ADM)
        self.query = nn.Parameter(0.02 * torch.randn(w))    # the final token whose output predicts z_i
        self.null_text_embed = nn.Parameter(0.02 * torch.randn(w))  # stands in for z_t when the caption is dropped
        self.text_pos = nn.Parameter(0.01 * torch.randn(max_text_len, w))
        self.slot_pos = nn.Parameter(0.01 * torch.randn(len(SLOTS), w))  # z_t, t, z_i^(t), query
        self.transformer = Transformer(w, cfg.layers, cfg.heads, causal=True, dropout=cfg.dropout,
                                       checkpoint=cfg.checkpoint)
        self.out = nn.Linear(w, embed_dim)

    # -- the two halves of the sequence --------------------------------------------------------
    def _check(self, text_embed, text_tokens, text_mask, drop):
        b = text_embed.shape[0]
        if text_embed.ndim != 2 or text_embed.shape[1] != self.embed_dim:
            raise DataError(f"text_embed has shape {tuple(text_embed.shape)} but this prior reads "
                            f"[B, {self.embed_dim}] CLIP text embeddings: use the CLIP it was trained with")
        if text_tokens.ndim != 3 or text_tokens.shape[0] != b or text_tokens.shape[2] != self.text_width:
            raise DataError(f"text_tokens has shape {tuple(text_tokens.shape)} but must be [{b}, L, "
                            f"{self.text_width}] (the CLIP's per-token features)")
        if text_tokens.shape[1] > self.max_text_len:
            raise DataError(f"the caption has {text_tokens.shape[1]} token positions but the prior reads at most "
                            f"{self.max_text_len}: trim the padding or shorten the caption")
        if text_mask.dtype != torch.bool or tuple(text_mask.shape) != tuple(text_tokens.shape[:2]):
            raise DataError(f"text_mask must be a bool tensor of shape {tuple(text_tokens.shape[:2])} "
                            f"(True = real token), got {text_mask.dtype} {tuple(text_mask.shape)}")
        if drop is not None and (drop.dtype != torch.bool or tuple(drop.shape) != (b,)):
            raise DataError(f"drop must be a bool tensor of shape ({b},) (True = null caption), got "
                            f"{drop.dtype} {tuple(drop.shape)}")

    def prefix(self, text_embed, text_tokens, text_mask, drop=None):
        """The conditioning positions: (tokens [B, L+1, width], keep [B, L+1] bool).

        `drop` [B] bool: those rows get the null caption (every caption token masked, z_t -> learned null).
        """
        self._check(text_embed, text_tokens, text_mask, drop)
        b, length, _ = text_tokens.shape
        p = self.query
        text = self.text_proj(text_tokens.to(p.dtype)) + self.text_pos[:length]             # [B, L, w]
        # z_t is unit norm: x sqrt(D) gives it unit variance per dim whatever embed_scale is
        zt = self.text_embed_proj(text_embed.to(p.dtype) * math.sqrt(self.embed_dim))      # [B, w]
        keep = text_mask
        if drop is not None:
            zt = torch.where(drop[:, None], self.null_text_embed.expand_as(zt), zt)
            keep = keep & ~drop[:, None]
        zt = zt + self.slot_pos[0]
        tokens = torch.cat([text, zt[:, None]], dim=1)                                       # [B, L+1, w]
        keep = torch.cat([keep, torch.ones(b, 1, dtype=torch.bool, device=keep.device)], dim=1)
        return tokens, keep

    def step_tokens(self, x, t):
        """The positions that change at every sampler step: t, z_i^(t), query -> [B, 3, width]."""
        if x.ndim != 2 or x.shape[1] != self.embed_dim:
            raise DataError(f"the noised image embedding has shape {tuple(x.shape)} but must be "
                            f"[B, {self.embed_dim}]")
        b, w = x.shape[0], self.query.shape[0]
        temb = self.time_embed(timestep_embedding(t, w).to(self.query.dtype))               # [B, w]
        xemb = self.image_embed_proj(x.to(self.query.dtype))                                # [B, w]
        return torch.stack([temb, xemb, self.query.expand(b, w)], dim=1) + self.slot_pos[1:]

    # -- full forward (training) and cached forward (sampling) -----------------------------------
    def forward(self, x, t, text_embed, text_tokens, text_mask, drop=None):
        """Predicted (scaled) z_i `[B, D]` from z_i^(t) `[B, D]`, t `[B]`, z_t `[B, D]`, tokens `[B, L, W]`."""
        pre, keep = self.prefix(text_embed, text_tokens, text_mask, drop)
        seq = torch.cat([pre, self.step_tokens(x, t)], dim=1)                               # [B, L+4, w]
        keep = torch.cat([keep, torch.ones(x.shape[0], 3, dtype=torch.bool, device=keep.device)], dim=1)
        h = self.transformer(seq, key_padding_mask=keep)
        return self.out(h[:, -1])

    def encode_prefix(self, text_embed, text_tokens, text_mask, drop=None) -> KVCache:
        """Run the caption and z_t once into a KV cache (causal: they never see t or z_i^(t))."""
        pre, keep = self.prefix(text_embed, text_tokens, text_mask, drop)
        cache = self.transformer.init_cache(pre.shape[0], pre.shape[1] + 3)
        self.transformer(pre, key_padding_mask=keep, cache=cache)
        cache.prefix_length = cache.length
        return cache

    def forward_cached(self, x, t, cache: KVCache):
        """`forward` for a prefix already in `cache`: only t, z_i^(t) and the query are computed `[B, D]`."""
        cache.length = cache.prefix_length  # overwrite the previous step's 3 positions
        h = self.transformer(self.step_tokens(x, t), cache=cache)
        return self.out(h[:, -1])

    @staticmethod
    def layout(text_len: int) -> list[tuple[int, str]]:
        """(position, what sits there) for a caption of `text_len` token positions."""
        rows = [(i, f"caption token {i}") for i in range(text_len)]
        names = ("z_t (CLIP text embedding)", "timestep embedding t", "noised image embedding z_i^(t)",
                 "query -> predicts z_i")
        return rows + [(text_len + k, n) for k, n in enumerate(names)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trim_padding(text_tokens, text_mask):
    """Drop the token columns that are padding in every row (exact: padded keys are masked anyway)."""
    n = max(int(text_mask.sum(1).max()), 1)
    return text_tokens[:, :n], text_mask[:, :n]


# ---------------------------------------------------------------------------------------------
# training: L_prior = E || f(z_i^(t), t, y) - z_i ||^2 with the caption dropped 10% of the time
# ---------------------------------------------------------------------------------------------

def null_caption_mask(batch: int, p: float, generator=None, device=None) -> torch.Tensor:
    """Which rows lose their caption (classifier-free guidance training): `[batch]` bool, True w.p. `p`."""
    return (distributed.rand(batch, generator) < p).to(device)


def loss_fn(diffusion: gd.GaussianDiffusion, embed_scale: float, cond_drop_prob: float):
    """`loss_fn(model, batch, generator)` for `train.Trainer`; batch = (z_i, z_t, text_tokens, text_mask)."""
    def fn(model, batch, generator):
        image_embed, text_embed, text_tokens, text_mask = batch
        b, dev = image_embed.shape[0], image_embed.device
        x_start = image_embed * embed_scale                                # [B, D], ~unit variance per dim
        t = diffusion.sample_timesteps(b, generator, dev)
        noise = gd.randn(x_start.shape, generator, dev)
        drop = null_caption_mask(b, cond_drop_prob, generator, dev)
        kwargs = dict(text_embed=text_embed, text_tokens=text_tokens, text_mask=text_mask, drop=drop)
        terms = diffusion.training_losses(model, x_start, t, model_kwargs=kwargs, noise=noise)
        return terms["loss"].mean(), {}
    return fn


# ---------------------------------------------------------------------------------------------
# sampling: DDIM + classifier-free guidance + best-of-N
# ---------------------------------------------------------------------------------------------

def best_of(candidates: torch.Tensor, text_embed: torch.Tensor):
    """Pick per caption the candidate with the largest dot product with z_t.

    candidates `[B, N, D]`, text_embed `[B, D]` -> (best `[B, D]`, index `[B]`).
    """
    score = torch.einsum("bnd,bd->bn", candidates, text_embed.to(candidates.dtype))
    index = score.argmax(dim=1)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), index], index


class DiffusionPrior:
    """A trained diffusion prior: `sample(z_t, text_tokens, text_mask) -> z_i` (batched, no_grad, device-aware)."""

    def __init__(self, model: DiffusionPriorNetwork, cfg: DiffusionPriorConfig, device="cpu", gap_direction=None):
        self.device = torch.device(device)
        # the text-minus-image direction of a prior trained with `text_gap` > 0 (None: CLIP's own z_t)
        self.gap_direction = None if gap_direction is None else torch.as_tensor(gap_direction, dtype=torch.float32)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.cfg = cfg
        self.record = None  # the stage record, when it came from a run folder (stages.load_or_train)
        self.embed_dim = model.embed_dim
        self.embed_scale = cfg.scale_for(model.embed_dim)
        self.diffusion = gd.create_diffusion(cfg.diffusion)
        self._spaced = {}

    def __repr__(self):
        return (f"DiffusionPrior(width {self.cfg.width}, {self.cfg.layers} layers, "
                f"{count_parameters(self.model) / 1e6:.2f} M params, D={self.embed_dim}, "
                f"scale {self.embed_scale:.3g}, device {self.device})")

    def text_embed_for(self, text_embed):
        """The z_t this prior reads: CLIP's own, or, for a prior trained with `text_gap`, the widened one."""
        if self.gap_direction is None:
            return text_embed
        return widen_gap(text_embed, self.gap_direction, self.cfg.text_gap)

    def spaced(self, steps: int) -> gd.GaussianDiffusion:
        """The diffusion respaced to `steps` evenly spread steps (cached)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= self.diffusion.num_timesteps:
            raise ConfigError(f"steps = {steps!r} must be an int in 2..{self.diffusion.num_timesteps} (DDIM steps)")
        if steps not in self._spaced:
            self._spaced[steps] = gd.create_diffusion(self.cfg.diffusion, respacing=steps)
        return self._spaced[steps]

    @torch.no_grad()
    def sample(self, text_embed, text_tokens, text_mask, guidance_scale=None, num_candidates=None, steps=None,
               generator=None, batch_size: int = 512, return_candidates: bool = False, progress: bool = False):
        """Unit-norm image embeddings ẑ_i `[B, D]` for captions given as CLIP outputs.

        text_embed `[B, D]` (z_t), text_tokens `[B, L, W]` (float16 is fine), text_mask `[B, L]` bool.
        None arguments take the config's values (guidance_scale, num_candidates, sample_steps). The noise is
        drawn up front from `generator` (same seed -> same samples, whatever `batch_size`). With
        `return_candidates`, returns (best [B, D], candidates [B, N, D], index [B]).
        """
        s = self.cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
        n = self.cfg.num_candidates if num_candidates is None else num_candidates
        text_embed = self.text_embed_for(text_embed)
        steps = self.cfg.sample_steps if steps is None else steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"num_candidates = {n!r} must be an int >= 1")
        if s < 0:
            raise ConfigError(f"guidance_scale = {s} must be >= 0 (1 = no guidance, 0 = unconditional)")
        diffusion = self.spaced(steps)
        b = text_embed.shape[0]
        if text_tokens.shape[0] != b or text_mask.shape[0] != b:
            raise DataError(f"text_embed, text_tokens and text_mask hold {b}, {text_tokens.shape[0]} and "
                            f"{text_mask.shape[0]} captions: pass one row per caption in each")
        gen_device = generator.device if generator is not None else self.device
        noise = torch.randn(b, n, self.embed_dim, generator=generator, device=gen_device)
        chunks = []
        for a in tqdm(range(0, b, batch_size), disable=not progress, desc="prior samples"):
            sl = slice(a, a + batch_size)
            chunks.append(self._sample_chunk(diffusion, text_embed[sl], text_tokens[sl], text_mask[sl],
                                             noise[sl].to(self.device), s, generator))
        candidates = torch.cat(chunks)                                      # [B, N, D], unit norm
        best, index = best_of(candidates, text_embed.to(self.device).float())
        return (best, candidates, index) if return_candidates else best

    def _sample_chunk(self, diffusion, text_embed, text_tokens, text_mask, noise, s, generator):
        b, n, d = noise.shape
        dev = self.device
        text_tokens, text_mask = trim_padding(text_tokens, text_mask)
        rep = lambda x: x.to(dev).repeat_interleave(n, dim=0)              # caption i -> rows i*n .. i*n+n-1
        te, tt, tm = rep(text_embed).float(), rep(text_tokens).float(), rep(text_mask)
        if s == 1.0:  # the conditional model alone: no null branch to compute
            cache = self.model.encode_prefix(te, tt, tm)
            model_fn = lambda x, t: self.model.forward_cached(x, t, cache)
        else:  # one doubled batch: the conditional rows, then the same rows with the null caption
            te, tt, tm, drop = gd.with_null_rows(te, tt, tm)
            cache = self.model.encode_prefix(te, tt, tm, drop)
            model_fn = gd.classifier_free_guidance(lambda x, t: self.model.forward_cached(x, t, cache), s)
        x0 = diffusion.ddim_sample_loop(model_fn, (b * n, d), noise=noise.reshape(b * n, d), clip_denoised=False,
                                        eta=self.cfg.eta, generator=generator, device=dev)
        return F.normalize(x0.float(), dim=-1).reshape(b, n, d)            # the scale divides out here


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------

def widen_gap(text_embed, direction, amount: float):
    """norm(z_t + amount * direction) `[B, D]`: text embeddings moved away from the image embeddings."""
    return F.normalize(text_embed.float() + amount * direction.to(text_embed.device), dim=-1)


def gap_direction(image_embed, text_embed) -> torch.Tensor:
    """The unit vector from the mean image embedding to the mean text embedding `[D]` (the modality gap)."""
    return F.normalize(text_embed.float().mean(0) - image_embed.float().mean(0), dim=0)


def gap_for_cosine(image_embed, text_embed, target: float, iters: int = 40) -> float:
    """The `text_gap` a that moves matched pairs to mean cosine `target`: mean cos(widen_gap(z_t, u, a), z_i) =
    target, u = gap_direction(z_i, z_t), found by bisection on [0, 20] (the cosine falls as a grows), rounded to
    3 decimals (notebook 10's modality-gap experiment)."""
    direction = gap_direction(image_embed, text_embed)
    lo, hi = 0.0, 20.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if (widen_gap(text_embed, direction, mid) * image_embed.float()).sum(-1).mean().item() > target:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, 3)


def _prepare(cfg: DiffusionPriorConfig, ctx) -> dict:
    """The sizes the network is built for (the CLIP's embedding and token widths and context length), and for a
    prior trained with `text_gap`, the direction its z_t are moved along."""
    emb = ctx.embeddings("train")
    dims = {"embed_dim": int(emb["image_embed"].shape[1]), "text_width": int(emb["text_tokens"].shape[2]),
            "max_text_len": int(ctx.cfg.clip.context_length)}
    if cfg.text_gap > 0:
        dims["gap_direction"] = [round(v, 7) for v in gap_direction(emb["image_embed"], emb["text_embed"]).tolist()]
    return dims


def _batches(cfg: DiffusionPriorConfig, dims, ctx):
    emb, device = ctx.embeddings("train"), ctx.device
    image_embed, text_embed = emb["image_embed"].to(device), emb["text_embed"].to(device)
    if "gap_direction" in dims:
        text_embed = widen_gap(text_embed, torch.tensor(dims["gap_direction"]), cfg.text_gap)
    text_tokens, text_mask = emb["text_tokens"].to(device), emb["text_mask"].to(device)  # tokens stay float16

    def get_batch(idx):
        idx = idx.to(device)
        tt, tm = trim_padding(text_tokens[idx], text_mask[idx])
        return image_embed[idx], text_embed[idx], tt.float(), tm
    return get_batch, len(image_embed)


def _loss(cfg: DiffusionPriorConfig, dims, ctx):
    diffusion = gd.create_diffusion(cfg.diffusion).to(ctx.device)
    return loss_fn(diffusion, cfg.scale_for(dims["embed_dim"]), cfg.cond_drop_prob)


SPEC = StageSpec(
    name="diffusion_prior", needs=("clip",), notebook="04_diffusion_prior",
    about="caption -> CLIP image embedding by diffusion (the paper's preferred prior)",
    prepare=_prepare, batches=_batches, loss=_loss,
    build=lambda cfg, dims: DiffusionPriorNetwork(cfg, dims["embed_dim"], dims["text_width"], dims["max_text_len"]),
    wrap=lambda network, cfg, dims, ctx: DiffusionPrior(network, cfg, ctx.device, dims.get("gap_direction")),
    sampling_fields=SAMPLING_FIELDS)
