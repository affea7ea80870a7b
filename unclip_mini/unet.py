"""The ADM U-Net (Dhariwal & Nichol 2021) as GLIDE (Nichol et al. 2021) and unCLIP use it.

One module serves every image model of the stack (unCLIP §2.1 and Appendix C, Table 3):

* the decoder: a U-Net with self-attention at some feature-map sizes, conditioned through the
  timestep embedding (`emb=`: the decoder adds its projection of z_i there) and through context
  tokens that every attention layer's keys/values also see (`context=`: the caption's token
  features plus 4 tokens projected from z_i; GLIDE's `encoder_kv`);
* the two upsamplers: conv-only U-Nets (no attention, so fully convolutional: trained on 1/4-size
  crops, run on whole images) conditioned on the low-resolution image, upsampled to the output size
  and concatenated to x as extra input channels (`cond=`; GLIDE's `SuperResUNetModel`).

Layout (ADM): input conv -> `input_blocks` (per level: `num_res_blocks` ResBlocks [+ AttentionBlock],
then a downsampling ResBlock) -> `middle_block` (ResBlock, AttentionBlock, ResBlock) ->
`output_blocks` (per level: `num_res_blocks + 1` ResBlocks on [h, skip] [+ AttentionBlock], then an
upsampling ResBlock) -> GroupNorm, SiLU, zero-initialised output conv.
ResBlocks get the timestep embedding by scale-shift norm (FiLM): GroupNorm(h) * (1 + scale) + shift.

What we add for the CPU: `pixel_unshuffle = r` puts a space-to-depth by r in front of the U-Net
([B, C, H, W] -> [B, C*r*r, H/r, W/r]) and a depth-to-space after it, so every convolution runs on an
r-times smaller map (r = 2 makes a toy training step about 3x cheaper: README, measurements).
What we leave out: fp16 code inside the model (use autocast in the training loop), class labels,
1-D/3-D variants, ADM's `num_heads` (we only use `num_head_channels`, as GLIDE and unCLIP do).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import PRESETS, PresetConfig, check, check_choice, check_positive, check_range
from .errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class UNetConfig(PresetConfig):
    """Hyper-parameters of one U-Net. Presets `smoke/toy/small/paper()` are the DECODER's;
    `UNetConfig.upsampler(stage, preset)` gives the two upsamplers'. Defaults = toy decoder.

    Paper values are unCLIP Table 3: decoder 64 px / upsampler
    64->256 / upsampler 256->1024. `attention_resolutions` and `image_size` are side lengths of the
    feature maps AFTER the pixel unshuffle: with image_size 32 and pixel_unshuffle 2 the U-Net's
    levels work at 16, 8, 4 px, and `attention_resolutions=(8,)` means the second level.
    """
    image_size: int = 32                        # paper: 64 / 256 / 1024 (training-time input side)
    in_channels: int = 3                        # paper: 3 (RGB x_t)
    out_channels: int = 3                       # paper: 3 (epsilon); doubled when learn_sigma
    learn_sigma: bool = False                   # paper: True (decoder: learned variance) / False / False (DDIM)
    model_channels: int = 32                    # paper: 512 / 320 / 192 ("Channels")
    channel_mult: tuple[int, ...] = (1, 2, 2)   # paper: (1,2,3,4) / (1,2,3,4) / (1,1,2,2,4,4)
    num_res_blocks: int = 2                     # paper: 3 / 3 / 2 ("Depth")
    attention_resolutions: tuple[int, ...] = (8,)  # paper: (32,16,8) / () / (); empty = conv-only
    num_head_channels: int = 32                 # paper: 64 ("Heads channels")
    dropout: float = 0.0                        # paper: 0.1 / 0.1 / 0
    use_scale_shift_norm: bool = True           # paper: True (ADM, GLIDE)
    resblock_updown: bool = True                # paper: True (ADM, GLIDE: ResBlocks resample)
    context_dim: int = 64                       # paper: 2048 (GLIDE text encoder width) / 0 / 0
    cond_channels: int = 0                      # paper: 0 / 3 / 3 (the upsampled low-res image)
    pixel_unshuffle: int = 2                    # paper: 1 (off); ours: 2 or 4 on the CPU
    use_checkpoint: bool = False                # paper: not stated; True at paper scale to fit memory
    emb_dim: int | None = None                  # paper: 4 * model_channels = 2048 (ADM); None = that
    norm: str = "group"                         # paper: 'group' (GroupNorm, ADM); 'pixel': LayerNorm over the
    #                                             channels of each position (no spatial statistics, so a conv-only
    #                                             model trained on crops computes the same thing on whole images)

    def __post_init__(self):
        check_positive(self, "image_size", "in_channels", "out_channels", "model_channels",
                       "num_res_blocks", "num_head_channels", "pixel_unshuffle")
        for name in ("learn_sigma", "use_scale_shift_norm", "resblock_updown", "use_checkpoint"):
            check_choice(self, name, (True, False))
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            check(isinstance(value, tuple) and all(isinstance(v, int) and v > 0 for v in value),
                  self, name, "must be a tuple of positive ints, e.g. (1, 2, 2)")
        check(len(self.channel_mult) > 0, self, "channel_mult", "needs at least one level, e.g. (1, 2, 2)")
        check_range(self, "dropout", 0.0, 1.0, high_open=True)
        check_choice(self, "norm", NORMS)
        check(self.norm == "group" or not self.attention_resolutions, self, "norm",
              "'pixel' is for conv-only U-Nets (the upsamplers); attention layers keep GroupNorm")
        check_range(self, "context_dim", 0, integer=True)
        check_range(self, "cond_channels", 0, integer=True)
        if self.emb_dim is not None:
            check_positive(self, "emb_dim")
        factor = self.downsample_factor
        check(self.image_size % factor == 0, self, "image_size",
              f"must be a multiple of pixel_unshuffle * 2**(len(channel_mult) - 1) = {factor}; "
              f"use e.g. image_size={max(factor, self.image_size // factor * factor)}")
        sides = self.feature_sizes
        for side in self.attention_resolutions:
            check(side in sides, self, "attention_resolutions",
                  f"{side} is not a feature-map side of this U-Net (image_size {self.image_size}, "
                  f"pixel_unshuffle {self.pixel_unshuffle}); reachable sides: {sides}")
        for width in self.attention_widths:
            check(width % self.num_head_channels == 0, self, "num_head_channels",
                  f"must divide every attention layer's width {self.attention_widths}")
        check(self.context_dim == 0 or self.attention_resolutions, self, "context_dim",
              "context tokens are read by attention layers, but attention_resolutions is empty; "
              "set context_dim=0 or add an attention resolution")

    @property
    def downsample_factor(self) -> int:
        """H and W of inputs must be multiples of this: pixel_unshuffle * 2**(levels - 1)."""
        return self.pixel_unshuffle * 2 ** (len(self.channel_mult) - 1)

    @property
    def feature_sizes(self) -> tuple[int, ...]:
        """Side of the feature map at each level, after the pixel unshuffle (for image_size)."""
        side = self.image_size // self.pixel_unshuffle
        return tuple(side // 2 ** level for level in range(len(self.channel_mult)))

    @property
    def attention_widths(self) -> tuple[int, ...]:
        """Channel widths of the levels with attention, plus the middle block's (when any)."""
        if not self.attention_resolutions:
            return ()
        widths = [self.model_channels * m for m, s in zip(self.channel_mult, self.feature_sizes)
                  if s in self.attention_resolutions]
        return tuple(sorted(set(widths + [self.model_channels * self.channel_mult[-1]])))

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding (and of `emb=`): emb_dim or 4 * model_channels."""
        return self.emb_dim or 4 * self.model_channels

    @property
    def model_out_channels(self) -> int:
        """Channels of the output: out_channels, doubled when learn_sigma (eps, then v for sigma)."""
        return self.out_channels * (2 if self.learn_sigma else 1)

    # --- decoder presets -------------------------------------------------------------------
    @classmethod
    def smoke(cls):
        return cls(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(8,), num_head_channels=8, context_dim=16, pixel_unshuffle=1)

    @classmethod
    def toy(cls):
        return cls()  # 32 px, unshuffled to 16 px; ~1.2 M params

    @classmethod
    def small(cls):
        return cls(image_size=64, model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                   attention_resolutions=(16, 8), num_head_channels=64, dropout=0.1,
                   context_dim=512, pixel_unshuffle=1)

    @classmethod
    def paper(cls):
        return cls(image_size=64, learn_sigma=True, model_channels=512, channel_mult=(1, 2, 3, 4),
                   num_res_blocks=3, attention_resolutions=(32, 16, 8), num_head_channels=64,
                   dropout=0.1, context_dim=2048, pixel_unshuffle=1, use_checkpoint=True)

    # --- upsampler presets -----------------------------------------------------------------
    @classmethod
    def upsampler(cls, stage: int, preset: str = "toy"):
        """Config of upsampler `stage` (1: 64->256 in the paper, 2: 256->1024) for `preset`.

        Conv-only, conditioned on the low-res image (cond_channels=3). image_size is the output
        side; the upsampler trains on crops of 1/4 of it (paper: crop fraction 0.25) and, being
        fully convolutional, runs on the whole image. toy: 32->128->512 px, small: 64->256->1024.
        """
        if stage not in (1, 2):
            raise ConfigError(f"upsampler stage {stage!r} does not exist; valid stages: 1 (first x4), 2 (second x4)")
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} for the upsampler; valid presets: {', '.join(PRESETS)}")
        common = dict(learn_sigma=False, attention_resolutions=(), context_dim=0, cond_channels=3)
        sizes = {  # (image_size, model_channels, channel_mult, num_res_blocks, dropout, pixel_unshuffle)
            (1, "smoke"): (32, 8, (1, 2), 1, 0.0, 2),
            (2, "smoke"): (64, 8, (1, 2), 1, 0.0, 4),
            (1, "toy"): (128, 32, (1, 2, 2), 1, 0.0, 2),
            (2, "toy"): (512, 32, (1, 2, 2), 1, 0.0, 4),
            (1, "small"): (256, 64, (1, 2, 3, 4), 2, 0.1, 1),
            (2, "small"): (1024, 32, (1, 1, 2, 2, 4, 4), 1, 0.0, 1),
            (1, "paper"): (256, 320, (1, 2, 3, 4), 3, 0.1, 1),
            (2, "paper"): (1024, 192, (1, 1, 2, 2, 4, 4), 2, 0.0, 1),
        }
        size, width, mult, depth, dropout, unshuffle = sizes[stage, preset]
        # GroupNorm pools statistics over the whole feature map, so a model trained on quarter-size crops
        # computes something else on the whole image (the README's measurements table); PixelNorm pools
        # nothing over space. The paper preset keeps ADM's GroupNorm.
        return cls(image_size=size, model_channels=width, channel_mult=mult, num_res_blocks=depth,
                   dropout=dropout, pixel_unshuffle=unshuffle, use_checkpoint=preset == "paper",
                   norm="group" if preset == "paper" else "pixel", **common)


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------

def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [B] -> [B, dim] (ADM, as in Transformers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]                  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)      # [B, 2*half]
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


NORMS = ("group", "pixel")


class PixelNorm(nn.Module):
    """LayerNorm over the channels of each position, with a per-channel affine: [B, C, H, W] -> same.

    Unlike GroupNorm it pools nothing over space, so the output at a pixel depends only on its receptive
    field: a model trained on crops computes on a whole image exactly what it computes on its crops.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def normalization(channels: int, kind: str = "group") -> nn.Module:
    """GroupNorm with 32 groups (ADM), or the largest divisor of 32 that fits narrow toy widths;
    kind='pixel': `PixelNorm` (no statistics over space)."""
    if kind == "pixel":
        return PixelNorm(channels)
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches then start as the identity (ADM)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class Downsample(nn.Module):
    """Halve H and W: a stride-2 conv, or 2x2 average pooling (used inside ResBlocks)."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels == channels:
            self.op = nn.AvgPool2d(2)
        else:
            raise ConfigError(f"Downsample without a conv keeps the {channels} channels; "
                              f"got out_channels={out_channels}: pass use_conv=True")

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour resize, then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ConfigError(f"Upsample without a conv keeps the {channels} channels; "
                              f"got out_channels={out_channels}: pass use_conv=True")
        self.conv = _conv3x3(channels, out_channels) if use_conv else nn.Identity()

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling (ADM).

    x [B, C, H, W], emb [B, E] -> [B, out_channels, H', W'] with H' = 2H (up), H/2 (down) or H.
    """

    def __init__(self, channels: int, emb_dim: int, dropout: float = 0.0, out_channels: int | None = None,
                 *, use_scale_shift_norm: bool = True, up: bool = False, down: bool = False,
                 use_checkpoint: bool = False, norm: str = "group"):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm, self.use_checkpoint = use_scale_shift_norm, use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels, norm), nn.SiLU(), _conv3x3(channels, out_channels))
        # resampling happens between the activation and the conv, on h and on the skip path alike
        if up:
            self.h_upd, self.x_upd = Upsample(channels, use_conv=False), Upsample(channels, use_conv=False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, use_conv=False), Downsample(channels, use_conv=False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        # scale-shift norm needs a scale AND a shift per channel
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels, norm), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(_conv3x3(out_channels, out_channels)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        h = self.in_layers[:-1](x)                          # norm, SiLU: [B, C, H, W]
        h = self.in_layers[-1](self.h_upd(h))               # resample, conv: [B, C_out, H', W']
        x = self.x_upd(x)
        e = self.emb_layers(emb)[:, :, None, None]          # [B, 2*C_out or C_out, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift  # FiLM on the normalised features
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, whose keys/values optionally also include
    projected context tokens (GLIDE's `encoder_kv`: the context tokens are put in front of the keys).

    x [B, C, H, W], context [B, L, context_dim], context_mask [B, L] bool (True = real) -> [B, C, H, W].
    """

    def __init__(self, channels: int, num_head_channels: int, context_dim: int = 0, use_checkpoint: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = channels // num_head_channels, num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)   # per head: [q, k, v] (ADM's layout)
        self.encoder_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None  # per head: [k, v]
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x, context=None, context_mask=None):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, context_mask, use_reentrant=False)
        return self._forward(x, context, context_mask)

    def _forward(self, x, context, context_mask):
        b, c, height, width = x.shape
        n, d, t = self.num_heads, self.head_dim, height * width
        qkv = self.qkv(self.norm(x).reshape(b, c, t))                   # [B, 3C, T]
        q, k, v = qkv.reshape(b, n, 3 * d, t).transpose(2, 3).split(d, dim=-1)  # 3 x [B, n, T, d]
        mask = None
        if context is not None and self.encoder_kv is not None:
            ekv = self.encoder_kv(context)                              # [B, L, 2C]
            ek, ev = ekv.reshape(b, -1, n, 2 * d).transpose(1, 2).split(d, dim=-1)  # 2 x [B, n, L, d]
            k, v = torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)  # [B, n, L + T, d]
            if context_mask is not None:
                # the image's own positions are always visible, so no row is ever fully masked
                keep = torch.cat([context_mask, context_mask.new_ones(b, t)], dim=1)  # [B, L + T]
                mask = keep[:, None, None, :]                             # [B, 1, 1, L + T]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)     # [B, n, T, d]
        h = h.transpose(2, 3).reshape(b, c, t)
        return x + self.proj_out(h).reshape(b, c, height, width)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands `emb` to ResBlocks and the context tokens to AttentionBlocks (ADM)."""

    def forward(self, x, emb, context=None, context_mask=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# the U-Net
# ---------------------------------------------------------------------------------------------

class UNetModel(nn.Module):
    """The ADM/GLIDE U-Net: (x_t, t, conditioning) -> [B, out_channels (x2 if learn_sigma), H, W]."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if not isinstance(cfg, UNetConfig):
            raise ConfigError(f"UNetModel needs a UNetConfig, got {type(cfg).__name__}: "
                              f"use UNetConfig.toy() or UNetConfig.upsampler(1, 'toy')")
        self.cfg = cfg
        mc, emb_dim, r2 = cfg.model_channels, cfg.time_embed_dim, cfg.pixel_unshuffle ** 2

        def res(c_in, c_out, **kw):
            return ResBlock(c_in, emb_dim, cfg.dropout, c_out, use_scale_shift_norm=cfg.use_scale_shift_norm,
                            use_checkpoint=cfg.use_checkpoint, norm=cfg.norm, **kw)

        def attn(c):
            return AttentionBlock(c, cfg.num_head_channels, cfg.context_dim, cfg.use_checkpoint)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        ch = mc * cfg.channel_mult[0]
        # the input conv sees x and cond, both space-to-depth'ed: (in + cond) * r^2 channels
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(_conv3x3((cfg.in_channels + cfg.cond_channels) * r2, ch))])
        skip_chans, side, last = [ch], cfg.image_size // cfg.pixel_unshuffle, len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mc * mult)]
                ch = mc * mult
                if side in cfg.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != last:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                side //= 2

        # ADM puts attention in the middle whenever the model has attention at all
        middle = [res(ch, ch)] + ([attn(ch)] if cfg.attention_resolutions else []) + [res(ch, ch)]
        self.middle_block = TimestepEmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mc * mult)]   # input: [h, skip] concatenated
                ch = mc * mult
                if side in cfg.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch))
                    side *= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # zero-initialised: a fresh model predicts 0 everywhere; depth-to-space follows
        self.out = nn.Sequential(normalization(ch, cfg.norm), nn.SiLU(), zero_module(_conv3x3(ch, cfg.model_out_channels * r2)))

    def forward(self, x, timesteps, *, emb=None, context=None, context_mask=None, cond=None):
        """Predict from noisy images.

        x [B, in_channels, H, W]; timesteps [B] int or float (or a scalar, used for every image);
        emb [B, time_embed_dim], added to the timestep embedding; context [B, L, context_dim] tokens
        that attention layers also attend to; context_mask [B, L] bool, True = real token;
        cond [B, cond_channels, H, W], concatenated to x. Returns [B, model_out_channels, H, W].
        """
        cfg = self.cfg
        x, cond = self._check_inputs(x, timesteps, emb, context, context_mask, cond)
        b = x.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        e = self.time_embed(timestep_embedding(timesteps, cfg.model_channels))  # [B, E]
        if emb is not None:
            e = e + emb
        h = x if cond is None else torch.cat([x, cond], dim=1)           # [B, in + cond, H, W]
        if cfg.pixel_unshuffle > 1:
            h = F.pixel_unshuffle(h, cfg.pixel_unshuffle)                # [B, (in+cond) r^2, H/r, W/r]
        skips = []
        for block in self.input_blocks:
            h = block(h, e, context, context_mask)
            skips.append(h)
        h = self.middle_block(h, e, context, context_mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), e, context, context_mask)
        h = self.out(h)                                                  # [B, out r^2, H/r, W/r]
        if cfg.pixel_unshuffle > 1:
            h = F.pixel_shuffle(h, cfg.pixel_unshuffle)                  # [B, out, H, W]
        return h

    def _check_inputs(self, x, timesteps, emb, context, context_mask, cond):
        cfg = self.cfg
        if not torch.is_tensor(x) or x.ndim != 4:
            raise DataError(f"x must be a [B, {cfg.in_channels}, H, W] tensor, got "
                            f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        b, c, height, width = x.shape
        if c != cfg.in_channels:
            hint = (" (pass the conditioning image as cond=, not concatenated to x)"
                    if cfg.cond_channels and c == cfg.in_channels + cfg.cond_channels else "")
            raise DataError(f"x has {c} channels but this U-Net expects in_channels={cfg.in_channels}: "
                            f"pass x as [B, {cfg.in_channels}, H, W]{hint}")
        f = cfg.downsample_factor
        if height % f or width % f:
            raise DataError(f"x is {height}x{width} but H and W must be multiples of {f} (pixel_unshuffle "
                            f"{cfg.pixel_unshuffle} x 2**{len(cfg.channel_mult) - 1} downsamplings): crop or pad "
                            f"to {height // f * f or f}x{width // f * f or f}")
        t = torch.as_tensor(timesteps)
        if t.ndim not in (0, 1) or (t.ndim == 1 and t.shape[0] != b):
            raise DataError(f"timesteps has shape {tuple(t.shape)} but must be [B] = [{b}] (one per image) or a scalar")
        if emb is not None and tuple(emb.shape) != (b, cfg.time_embed_dim):
            raise DataError(f"emb has shape {tuple(emb.shape)} but must be [B, time_embed_dim] = "
                            f"[{b}, {cfg.time_embed_dim}]: project it to {cfg.time_embed_dim} first")
        if context is not None:
            if cfg.context_dim == 0:
                raise ConfigError("context tokens were given but this U-Net has context_dim=0 (no attention reads "
                                  "them): build it with UNetConfig(..., context_dim=D) or drop context=")
            if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
                raise DataError(f"context has shape {tuple(context.shape)} but must be [B, L, context_dim] = "
                                f"[{b}, L, {cfg.context_dim}]")
            if context_mask is not None and (context_mask.dtype != torch.bool or
                                             tuple(context_mask.shape) != tuple(context.shape[:2])):
                raise DataError(f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])} "
                                f"(True = real token), got {context_mask.dtype} {tuple(context_mask.shape)}")
        elif context_mask is not None:
            raise DataError("context_mask was given without context: pass context= too, or drop context_mask=")
        if cfg.cond_channels:
            if cond is None:
                raise DataError(f"this U-Net is conditioned on an image (cond_channels={cfg.cond_channels}) but cond "
                                f"is missing: pass cond=[B, {cfg.cond_channels}, {height}, {width}] (the low-res "
                                f"image resized to x's size)")
            if tuple(cond.shape) != (b, cfg.cond_channels, height, width):
                raise DataError(f"cond has shape {tuple(cond.shape)} but must be "
                                f"{(b, cfg.cond_channels, height, width)}: "
                                f"resize the low-res image to x's {height}x{width} first")
        elif cond is not None:
            raise ConfigError("cond was given but this U-Net has cond_channels=0: build it with "
                              "UNetConfig(..., cond_channels=3) or drop cond=")
        return x, cond


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device, so paper sizes can be counted for free)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
