"""Tests of unclip_mini/transformer.py: causality, padding masks, the KV cache, shapes, errors."""
import pytest
import torch

from unclip_mini.errors import ConfigError, DataError
from unclip_mini.transformer import Transformer

W, LAYERS, HEADS, L = 32, 2, 4, 7


def make(causal=True, seed=0):
    torch.manual_seed(seed)
    return Transformer(W, LAYERS, HEADS, causal=causal, dropout=0.1).eval()


def tokens(b=2, seed=0):
    return torch.randn(b, L, W, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_final_layernorm():
    model = make()
    out = model(tokens())
    assert out.shape == (2, L, W)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, L), atol=1e-5, rtol=0)  # ln_f at init


def test_causal_future_tokens_do_not_change_the_past():
    model, x = make(), tokens()
    y = x.clone()
    y[:, 4] += torch.randn(W)  # not a constant: LayerNorm would remove it
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert (a[:, 4:] - b[:, 4:]).abs().amax(dim=-1).min() > 1e-4     # every later position sees it


def test_bidirectional_sees_the_future():
    model, x = make(causal=False), tokens()
    y = x.clone()
    y[:, 4] += torch.randn(W)  # not a constant: LayerNorm would remove it
    assert (model(x) - model(y)).abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_padded_keys_are_never_attended(causal):
    model, x = make(causal), tokens()
    keep = torch.ones(2, L, dtype=torch.bool)
    keep[0, 5:] = False              # right padding
    keep[1, :2] = False              # left padding: under causal, queries 0-1 of row 1 see no key
    y = x.clone()
    y[0, 5:] = 50 * torch.randn(2, W)
    y[1, :2] = 50 * torch.randn(2, W)
    a, b = model(x, key_padding_mask=keep), model(y, key_padding_mask=keep)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a[keep], b[keep])
    assert (a[keep] - model(x)[keep]).abs().max() > 1e-4             # the mask does change things


def test_kv_cache_step_by_step_equals_full_forward():
    model, x = make(), tokens()
    full = model(x)
    cache = model.init_cache(2, L)
    steps = [model(x[:, i:i + 1], cache=cache) for i in range(L)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    assert cache.length == L
    cache = model.init_cache(2, L + 3)                                # a prefix, then one at a time
    parts = [model(x[:, :4], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(4, L)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full)


def test_kv_cache_with_padding_equals_full_forward():
    model, x = make(), tokens()
    keep = torch.ones(2, L, dtype=torch.bool)
    keep[1, :3] = False
    full = model(x, key_padding_mask=keep)
    cache = model.init_cache(2, L)
    parts = [model(x[:, :3], key_padding_mask=keep[:, :3], cache=cache)]
    parts += [model(x[:, i:i + 1], cache=cache) for i in range(3, L)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full)


def test_errors():
    model = make()
    with pytest.raises(ConfigError, match="not divisible by heads"):
        Transformer(30, 1, 4)
    with pytest.raises(DataError, match=r"must be \[B, L, 32\]"):
        model(torch.randn(2, L, 16))
    with pytest.raises(DataError, match="key_padding_mask must be a bool"):
        model(tokens(), key_padding_mask=torch.ones(2, L))
    cache = model.init_cache(2, 3)
    with pytest.raises(DataError, match=r"init_cache\(2, max_len>=7\)"):
        model(tokens(), cache=cache)
    with pytest.raises(ConfigError, match="needs causal=True"):
        make(causal=False).init_cache(2, 3)
