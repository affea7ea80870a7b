"""Tests of unclip_mini/unet.py: shapes, conditioning paths, initialisation, sizes, errors."""
import math

import pytest
import torch

from unclip_mini.errors import ConfigError, DataError
from unclip_mini.unet import UNetConfig, UNetModel, count_parameters, timestep_embedding

from _helpers import perturb_


def make(cfg, seed=0, perturb=True):
    """A model; `perturb` adds noise to every parameter so zero-initialised branches are live."""
    torch.manual_seed(seed)
    model = UNetModel(cfg)
    if perturb:
        perturb_(model, seed + 1)
    return model.eval()


def inputs(cfg, b=2, side=None, seed=0, ctx_len=5):
    g = torch.Generator().manual_seed(seed)
    s = side or cfg.image_size
    kw = {}
    if cfg.context_dim:
        kw["context"] = torch.randn(b, ctx_len, cfg.context_dim, generator=g)
        kw["context_mask"] = torch.ones(b, ctx_len, dtype=torch.bool)
    if cfg.cond_channels:
        kw["cond"] = torch.randn(b, cfg.cond_channels, s, s, generator=g)
    x = torch.randn(b, cfg.in_channels, s, s, generator=g)
    return x, torch.tensor([3, 700][:b] + [1] * max(0, b - 2)), kw


SMOKE_CONFIGS = {
    "decoder": UNetConfig.smoke(),
    "decoder_learn_sigma": UNetConfig.smoke().replace(learn_sigma=True),
    "decoder_unshuffle2": UNetConfig.smoke().replace(pixel_unshuffle=2, attention_resolutions=(4,)),
    "decoder_no_updown": UNetConfig.smoke().replace(resblock_updown=False, use_scale_shift_norm=False),
    "upsampler1": UNetConfig.upsampler(1, "smoke"),
    "upsampler2": UNetConfig.upsampler(2, "smoke"),
}


@pytest.mark.parametrize("name", list(SMOKE_CONFIGS))
def test_output_shape(name):
    cfg = SMOKE_CONFIGS[name]
    x, t, kw = inputs(cfg)
    out = make(cfg)(x, t, **kw)
    channels = 6 if cfg.learn_sigma else 3
    assert out.shape == (2, channels, cfg.image_size, cfg.image_size)
    assert torch.isfinite(out).all()


def test_presets_validate_and_round_trip():
    for preset in ("smoke", "toy", "small", "paper"):
        for cfg in (UNetConfig.preset(preset), UNetConfig.upsampler(1, preset), UNetConfig.upsampler(2, preset)):
            assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    assert UNetConfig.paper().model_out_channels == 6 and UNetConfig.toy().model_out_channels == 3
    assert UNetConfig.upsampler(1, "paper").attention_resolutions == ()


def test_timestep_embedding_analytic():
    emb = timestep_embedding(torch.tensor([0.0, 2.5]), 7)
    assert emb.shape == (2, 7)
    torch.testing.assert_close(emb[0, :3], torch.ones(3))              # cos(0)
    torch.testing.assert_close(emb[0, 3:], torch.zeros(4))             # sin(0) and the odd pad
    freqs = torch.exp(-math.log(10000.0) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1, :3], torch.cos(2.5 * freqs))


def test_float_and_scalar_timesteps():
    cfg = UNetConfig.smoke()
    model = make(cfg)
    x, _, kw = inputs(cfg)
    a = model(x, torch.tensor([5.0, 5.0]), **kw)
    torch.testing.assert_close(model(x, 5, **kw), a)
    assert not torch.allclose(model(x, torch.tensor([5.5, 5.5]), **kw), a)


def test_conv_only_runs_at_four_times_the_training_size():
    cfg = UNetConfig.upsampler(1, "smoke")  # trained at 32 px, conv-only
    model = make(cfg)
    x, t, kw = inputs(cfg, side=4 * cfg.image_size)
    out = model(x, t, **kw)
    assert out.shape == (2, 3, 128, 128) and torch.isfinite(out).all()


def test_fresh_model_outputs_zeros():
    for cfg in SMOKE_CONFIGS.values():
        x, t, kw = inputs(cfg)
        out = make(cfg, perturb=False)(x, t, **kw)
        assert torch.count_nonzero(out) == 0


def test_context_changes_output_and_masked_tokens_are_ignored():
    cfg = UNetConfig.smoke()
    model = make(cfg)
    x, t, kw = inputs(cfg)
    base = model(x, t, **kw)
    other = dict(kw, context=kw["context"] + 1.0)
    assert (model(x, t, **other) - base).abs().max() > 1e-4
    mask = kw["context_mask"].clone()
    mask[:, 3:] = False                                   # the last two tokens are padding
    masked = model(x, t, context=kw["context"], context_mask=mask)
    assert (masked - base).abs().max() > 1e-4              # the mask itself matters
    ctx = kw["context"].clone()
    ctx[:, 3:] = 100 * torch.randn(2, 2, cfg.context_dim)  # change only padded tokens
    torch.testing.assert_close(model(x, t, context=ctx, context_mask=mask), masked)


def test_emb_and_cond_change_output():
    cfg = UNetConfig.smoke()
    model = make(cfg)
    x, t, kw = inputs(cfg)
    emb = torch.randn(2, cfg.time_embed_dim)
    assert (model(x, t, emb=emb, **kw) - model(x, t, **kw)).abs().max() > 1e-4
    up = UNetConfig.upsampler(1, "smoke")
    model = make(up)
    x, t, kw = inputs(up)
    assert (model(x, t, cond=kw["cond"] + 1) - model(x, t, **kw)).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["decoder", "decoder_unshuffle2", "upsampler1"])
def test_gradient_reaches_every_parameter(name):
    cfg = SMOKE_CONFIGS[name]
    model = make(cfg).train()
    x, t, kw = inputs(cfg)
    model(x, t, emb=torch.randn(2, cfg.time_embed_dim), **kw).pow(2).mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, f"no gradient reached {dead}"


def test_checkpointing_gives_the_same_gradients():
    cfg = UNetConfig.smoke()
    grads = []
    for ckpt in (False, True):
        model = make(cfg.replace(use_checkpoint=ckpt)).train()
        x, t, kw = inputs(cfg)
        model(x, t, **kw).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_same_seed_same_model():
    cfg = UNetConfig.smoke()
    x, t, kw = inputs(cfg)
    torch.testing.assert_close(make(cfg, seed=3)(x, t, **kw), make(cfg, seed=3)(x, t, **kw))
    assert not torch.allclose(make(cfg, seed=3)(x, t, **kw), make(cfg, seed=4)(x, t, **kw))


def test_toy_parameter_counts():
    n = count_parameters(UNetModel(UNetConfig.toy()))
    print(f"toy decoder U-Net: {n:,} parameters")
    assert 1.8e6 < n < 2.2e6   # 1,977,868: width 32, mults (1,2,2), 2 res blocks, attention at 8, context 64
    for stage in (1, 2):
        n = count_parameters(UNetModel(UNetConfig.upsampler(stage, "toy")))
        print(f"toy upsampler {stage}: {n:,} parameters")
        assert 1.0e6 < n < 1.6e6


def test_paper_parameter_counts_match_table_3():
    # Table 3: decoder 3.5B *including* GLIDE's 1.2B text encoder -> ~2.3B U-Net; upsamplers 700M and 300M
    with torch.device("meta"):
        decoder = count_parameters(UNetModel(UNetConfig.paper()))
        up1 = count_parameters(UNetModel(UNetConfig.upsampler(1, "paper")))
        up2 = count_parameters(UNetModel(UNetConfig.upsampler(2, "paper")))
    print(f"paper U-Nets: decoder {decoder / 1e9:.3f}B, 64->256 {up1 / 1e6:.0f}M, 256->1024 {up2 / 1e6:.0f}M")
    assert 2.0e9 < decoder < 2.6e9
    assert 0.6e9 < up1 < 0.8e9
    assert 0.25e9 < up2 < 0.35e9


def test_input_errors_name_the_problem_and_fix():
    cfg = UNetConfig.smoke()
    model = make(cfg, perturb=False)
    x, t, kw = inputs(cfg)
    with pytest.raises(DataError, match="x has 4 channels but this U-Net expects in_channels=3"):
        model(torch.randn(2, 4, 16, 16), t)
    with pytest.raises(DataError, match="multiples of 2 .*crop or pad to 14x14"):
        model(torch.randn(2, 3, 15, 15), t)
    with pytest.raises(DataError, match=r"timesteps has shape \(3,\)"):
        model(x, torch.zeros(3))
    with pytest.raises(DataError, match="emb has shape"):
        model(x, t, emb=torch.randn(2, 5))
    with pytest.raises(DataError, match="context has shape"):
        model(x, t, context=torch.randn(2, 5, cfg.context_dim + 1))
    with pytest.raises(DataError, match="context_mask must be a bool"):
        model(x, t, context=kw["context"], context_mask=torch.ones(2, 5))
    up = make(UNetConfig.upsampler(1, "smoke"), perturb=False)
    xu = torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="context_dim=0"):
        up(xu, t, cond=xu, context=torch.randn(2, 5, 16))
    with pytest.raises(DataError, match="cond is missing"):
        up(xu, t)
    with pytest.raises(DataError, match="pass the conditioning image as cond="):
        up(torch.cat([xu, xu], 1), t)
    with pytest.raises(DataError, match="cond has shape"):
        up(xu, t, cond=torch.randn(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="cond_channels=0"):
        model(x, t, cond=x, **kw)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"reachable sides: \(16, 8, 4\)"):
        UNetConfig.toy().replace(attention_resolutions=(32,))
    with pytest.raises(ConfigError, match="multiple of pixel_unshuffle .* = 8"):
        UNetConfig.toy().replace(image_size=36)
    with pytest.raises(ConfigError, match="channel_mult.*at least one level"):
        UNetConfig.toy().replace(channel_mult=())
    with pytest.raises(ConfigError, match="channel_mult.*tuple of positive ints"):
        UNetConfig.toy().replace(channel_mult=[1, 2, 2])
    with pytest.raises(ConfigError, match="num_head_channels.*must divide"):
        UNetConfig.toy().replace(num_head_channels=48)
    with pytest.raises(ConfigError, match="context_dim.*attention_resolutions is empty"):
        UNetConfig.toy().replace(attention_resolutions=())
    with pytest.raises(ConfigError, match="dropout"):
        UNetConfig.toy().replace(dropout=1.0)
    with pytest.raises(ConfigError, match="valid stages"):
        UNetConfig.upsampler(3, "toy")
    with pytest.raises(ConfigError, match="valid presets"):
        UNetConfig.upsampler(1, "huge")
