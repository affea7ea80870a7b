"""The causal transformer shared by both priors and the GLIDE-style text encoder (unCLIP §2.2, GLIDE §2.3).

A stack of pre-LN residual blocks (GPT-2 style): x + Attention(LayerNorm(x)), then x + MLP(LayerNorm(x)),
and a final LayerNorm `ln_f` (the residual stream of a pre-LN stack is never normalised, so every
caller needs one; it lives here so the callers cannot forget it). No embeddings inside: callers own
their token and position embeddings and read out whichever positions they need.

Masks: `causal=True` lets position i see positions <= i; `key_padding_mask` [B, L] (True = real token)
hides padded keys from every query. A query that would see no key at all (a padded position at the
front of a left-padded sequence) gets a zero attention output instead of NaN.

Incremental decoding (the autoregressive prior): `cache = model.init_cache(B, max_len)`, then
`model(x_new, cache=cache)` appends the new positions' keys/values and attends over everything cached;
`cache.length` is the position of the next token (callers add position embeddings from it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .errors import ConfigError, DataError


class KVCache:
    """Keys and values of the positions decoded so far, per layer: [B, heads, max_len, head_dim]."""

    def __init__(self, layers, batch, heads, max_len, head_dim, device=None, dtype=None):
        shape = (batch, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.keep = torch.ones(batch, max_len, dtype=torch.bool, device=device)  # False = padded key
        self.batch, self.max_len, self.length = batch, max_len, 0


class Attention(nn.Module):
    """Multi-head self-attention via `scaled_dot_product_attention`: [B, L, W] -> [B, L, W]."""

    def __init__(self, width, heads, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, mask=None, is_causal=False, empty=None, cache=None, layer=0):
        b, l, w = x.shape
        q, k, v = self.qkv(x).reshape(b, l, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, h, l, d]
        if cache is not None:  # write the new keys/values, attend over all positions so far
            start = cache.length
            cache.keys[layer][:, :, start:start + l] = k
            cache.values[layer][:, :, start:start + l] = v
            k, v = cache.keys[layer][:, :, :start + l], cache.values[layer][:, :, :start + l]
        p = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
        if empty is not None:  # queries that may see no key get no attention output
            h = h.masked_fill(empty[:, None], 0.0)                       # empty: [B, l, 1]
        return self.proj(h.transpose(1, 2).reshape(b, l, w))


class Block(nn.Module):
    """One pre-LN residual block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, width, heads, dropout=0.0, mlp_ratio=4):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None, is_causal=False, empty=None, cache=None, layer=0):
        x = x + self.drop(self.attn(self.ln_1(x), mask, is_causal, empty, cache, layer))
        return x + self.drop(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """Pre-LN transformer with a final LayerNorm: x [B, L, width] -> [B, L, width]."""

    def __init__(self, width: int, layers: int, heads: int, *, causal: bool = True, dropout: float = 0.0,
                 mlp_ratio: int = 4, checkpoint: bool = False):
        super().__init__()
        self.checkpoint = checkpoint  # training recomputes each block in the backward pass (activation memory / L)
        if width % heads:
            raise ConfigError(f"Transformer width {width} is not divisible by heads {heads}: "
                              f"use a width that is a multiple of {heads}, or change heads")
        self.width, self.heads, self.causal = width, heads, causal
        self.blocks = nn.ModuleList([Block(width, heads, dropout, mlp_ratio) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)

    def init_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        """An empty KV cache for incremental decoding of up to `max_len` positions."""
        if not self.causal:
            raise ConfigError("a KV cache needs causal=True: a bidirectional transformer's past outputs "
                              "change when tokens are appended; run the full sequence instead")
        p = next(self.parameters())
        return KVCache(len(self.blocks), batch, self.heads, max_len, self.width // self.heads,
                       device or p.device, dtype or p.dtype)

    def forward(self, x, key_padding_mask=None, cache: KVCache | None = None):
        """x [B, l, W]; key_padding_mask [B, l] bool (True = keep); with `cache`, x holds the next l positions."""
        if x.ndim != 3 or x.shape[-1] != self.width:
            raise DataError(f"x has shape {tuple(x.shape)} but must be [B, L, {self.width}]")
        b, l, _ = x.shape
        m = key_padding_mask
        if m is not None and (m.dtype != torch.bool or tuple(m.shape) != (b, l)):
            raise DataError(f"key_padding_mask must be a bool tensor of shape {(b, l)} (True = real token), "
                            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        start = 0
        if cache is not None:
            start = cache.length
            if b != cache.batch or start + l > cache.max_len:
                raise DataError(f"the KV cache holds batch {cache.batch} and {cache.max_len} positions "
                                f"({start} used); got batch {b} with {l} new: make the cache with "
                                f"init_cache({b}, max_len>={start + l})")
            cache.keep[:, start:start + l] = True if key_padding_mask is None else key_padding_mask
            keep = cache.keep[:, :start + l]                              # [B, S] over all keys so far
            if bool(keep.all()):
                keep = None                                               # nothing padded so far
        else:
            keep = key_padding_mask

        mask, empty, is_causal = None, None, False
        if keep is None and start == 0 and self.causal:
            is_causal = True                                              # fast path: plain causal
        elif keep is not None or self.causal:
            s = start + l
            allowed = torch.ones(b, l, s, dtype=torch.bool, device=x.device)
            if self.causal:  # query i sits at absolute position start + i and sees keys <= it
                q_pos = torch.arange(start, s, device=x.device)[:, None]
                allowed = allowed & (torch.arange(s, device=x.device)[None, :] <= q_pos)
            if keep is not None:
                allowed = allowed & keep[:, None, :]
            empty = ~allowed.any(dim=-1, keepdim=True)                    # [B, l, 1] rows with no key
            mask = (allowed | empty)[:, None]                             # [B, 1, l, S]; empty rows: no NaN
            empty = empty if bool(empty.any()) else None
        recompute = self.checkpoint and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, is_causal, empty, None, i, use_reentrant=False)
            else:
                x = block(x, mask, is_causal, empty, cache, i)
        if cache is not None:
            cache.length += l
        return self.ln_f(x)
