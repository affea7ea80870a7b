"""Tests of unclip_mini/decoder.py: configs, conditioning paths, guidance dropout, sampling, the stages."""
import pytest
import torch

from unclip_mini import decoder as D
from unclip_mini import stages
from unclip_mini.errors import ConfigError, DataError
from unclip_mini.unet import count_parameters

from _helpers import perturb_

# smoke models are tiny: extra threads only wait on each other (and on a shared machine, a lot)
torch.set_num_threads(1)


def make(cfg=None, seed=0, perturb=True):
    """A smoke decoder; `perturb` makes the zero-initialised branches live so every input matters."""
    torch.manual_seed(seed)
    model = D.Decoder(cfg or D.DecoderConfig.smoke())
    if perturb:
        perturb_(model, seed + 1)
    return model.eval()


def inputs(cfg, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    z = torch.nn.functional.normalize(torch.randn(b, cfg.clip_dim, generator=g), dim=-1)
    tokens = torch.zeros(b, 8, dtype=torch.long)
    tokens[:, 0] = 49406                                           # start of text
    tokens[:, 1:5] = torch.randint(1, 40000, (b, 4), generator=g)
    tokens[:, 5] = 49407                                           # end of text, then padding
    return x, torch.tensor([5, 50, 99][:b]), z, tokens


def test_presets_validate_and_round_trip():
    for preset in ("smoke", "toy", "small", "paper"):
        for cfg in (D.DecoderConfig.preset(preset), D.DecoderConfig.glide(preset)):
            assert D.DecoderConfig.from_dict(cfg.to_dict()) == cfg
        assert D.DecoderConfig.glide(preset).use_image_embed is False
        assert D.DecoderConfig.preset(preset).use_image_embed is True
    paper = D.DecoderConfig.paper()
    assert (paper.n_image_tokens, paper.p_drop_image, paper.p_drop_text, paper.sample_steps) == (4, 0.1, 0.5, 250)
    assert paper.unet.learn_sigma and paper.diffusion.loss_type == "hybrid"


def test_paper_size_matches_table_3():
    with torch.device("meta"):  # no memory: only the shapes
        model = D.Decoder(D.DecoderConfig.paper())
    assert 3.3e9 < count_parameters(model) < 3.7e9          # Table 3: 3.5B
    assert 1.1e9 < count_parameters(model.text) < 1.4e9     # GLIDE: ~1.2B text encoder


@pytest.mark.parametrize("change, field", [
    (dict(text_width=32), "text_width"),                    # != unet.context_dim
    (dict(text_heads=3), "text_heads"),
    (dict(p_drop_text=1.5), "p_drop_text"),
    (dict(sampler="euler"), "sampler"),
    (dict(sample_steps=1000), "sample_steps"),              # smoke chain has 100 steps
])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        D.DecoderConfig.smoke().replace(**change)


def test_learned_variance_needs_learn_sigma():
    cfg = D.DecoderConfig.smoke()
    with pytest.raises(ConfigError, match="learn_sigma"):
        cfg.replace(unet=cfg.unet.replace(learn_sigma=True))


def test_forward_shapes_and_context():
    cfg = D.DecoderConfig.smoke()
    model = make(cfg)
    x, t, z, tokens = inputs(cfg)
    assert model(x, t, z, tokens).shape == x.shape
    c = model.condition(z, tokens)
    assert c["context"].shape == (3, 8 + 4, cfg.text_width)        # caption tokens + 4 z_i tokens
    assert c["context_mask"][:, :6].all() and not c["context_mask"][:, 6:8].any()  # padding is masked
    assert c["context_mask"][:, 8:].all()                          # the z_i tokens are always visible
    assert c["emb"].shape == (3, cfg.unet.time_embed_dim)
    cfg_big = cfg.replace(unet=cfg.unet.replace(learn_sigma=True),
                          diffusion=cfg.diffusion.replace(var_type="learned_range", loss_type="hybrid"))
    assert make(cfg_big)(x, t, z, tokens).shape == (3, 6, cfg.image_size, cfg.image_size)


def test_every_conditioning_path_matters():
    cfg = D.DecoderConfig.smoke()
    model = make(cfg)
    x, t, z, tokens = inputs(cfg)
    base = model(x, t, z, tokens)
    assert not torch.allclose(model(x, t, z.flip(0), tokens), base)          # z_i
    assert not torch.allclose(model(x, t, z, tokens.flip(0)), base)          # caption
    # z_i reaches the U-Net through the timestep embedding AND the context tokens
    c1, c2 = model.condition(z, tokens), model.condition(z.flip(0), tokens)
    assert not torch.allclose(c1["emb"], c2["emb"])
    assert not torch.allclose(c1["context"][:, -4:], c2["context"][:, -4:])
    torch.testing.assert_close(c1["context"][:, :-4], c2["context"][:, :-4])  # caption tokens unchanged


def test_padding_does_not_change_the_output():
    cfg = D.DecoderConfig.smoke()
    model = make(cfg)
    x, t, z, tokens = inputs(cfg)
    longer = torch.cat([tokens, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(x, t, z, longer), model(x, t, z, tokens))


def test_null_condition_is_zero_embedding_and_empty_caption():
    cfg = D.DecoderConfig.smoke()
    model = make(cfg)
    x, t, z, tokens = inputs(cfg)
    torch.testing.assert_close(model(x, t), model(x, t, torch.zeros_like(z), torch.zeros_like(tokens)))


def test_glide_baseline_has_no_image_path():
    cfg = D.DecoderConfig.glide("smoke")
    model = make(cfg)
    x, t, z, tokens = inputs(cfg)
    assert not hasattr(model, "image_to_emb")
    assert model.condition(None, tokens)["context"].shape[1] == tokens.shape[1]
    with pytest.raises(ConfigError, match="GLIDE"):
        model(x, t, z, tokens)


def test_bad_inputs_fail_with_the_fix():
    cfg = D.DecoderConfig.smoke()
    model = make(cfg)
    x, t, z, tokens = inputs(cfg)
    with pytest.raises(DataError, match=r"\[B, 16\]"):
        model(x, t, z[:, :8], tokens)
    with pytest.raises(DataError, match="batch size"):
        model(x, t, z[:2], tokens)
    with pytest.raises(DataError, match="integer"):
        model(x, t, z, tokens.float())
    with pytest.raises(DataError, match="positions"):
        model(x, t, z, torch.ones(3, cfg.text_ctx + 1, dtype=torch.long))
    with pytest.raises(DataError, match="how many"):
        model.sample()


def test_training_losses_deterministic_and_dropout_from_the_generator():
    cfg = D.DecoderConfig.smoke().replace(p_drop_text=0.5, p_drop_image=0.5)
    model = make(cfg)
    x, _, z, tokens = inputs(cfg, b=3)
    x, z, tokens = x.repeat(20, 1, 1, 1), z.repeat(20, 1), tokens.repeat(20, 1)
    seen = []
    forward = model.forward

    def spy(x_t, t, image_embed=None, tokens=None):
        seen.append((image_embed.clone(), tokens.clone()))
        return forward(x_t, t, image_embed, tokens)

    model.forward = spy
    a = model.training_losses(x, z, tokens, torch.Generator().manual_seed(1))["loss"]
    b = model.training_losses(x, z, tokens, torch.Generator().manual_seed(1))["loss"]
    c = model.training_losses(x, z, tokens, torch.Generator().manual_seed(2))["loss"]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    img, tok = seen[0]
    dropped_img = (img == 0).all(1)
    dropped_tok = (tok == 0).all(1)
    assert 10 < int(dropped_img.sum()) < 50 and 10 < int(dropped_tok.sum()) < 50   # ~30 of 60 each
    torch.testing.assert_close(img[~dropped_img], z[~dropped_img])                  # the rest untouched
    assert (dropped_img != dropped_tok).any()                                        # independent


def test_toy_recipe_timestep_draws_logit_normal_for_the_decoder_uniform_for_the_baseline():
    dec, glide = D.DecoderConfig.toy(), D.DecoderConfig.glide("toy")
    assert dec.diffusion.timestep_sampling == "logit_normal"
    assert glide.diffusion.timestep_sampling == "uniform"
    assert "timestep_sampling" not in glide.to_dict()["diffusion"]      # the baseline's stage id is unchanged
    assert dec.to_dict()["diffusion"]["timestep_sampling"] == "logit_normal"
    # the draw notebook 06 writes from scratch: t = floor(T sigmoid(u)), u ~ N(0, 1), first from the generator
    smoke = D.DecoderConfig.smoke()
    cfg = smoke.replace(diffusion=smoke.diffusion.replace(timestep_sampling="logit_normal"))
    model = make(cfg)
    x, _, z, tokens = inputs(cfg, b=3)
    seen = []
    forward = model.forward
    model.forward = lambda x_t, t, image_embed=None, tokens=None: seen.append(t) or forward(x_t, t, image_embed, tokens)
    model.training_losses(x, z, tokens, torch.Generator().manual_seed(7))
    T = model.diffusion.num_timesteps
    want = (torch.sigmoid(torch.randn(3, generator=torch.Generator().manual_seed(7))) * T).long().clamp(0, T - 1)
    assert torch.equal(seen[0], want)


def test_sample_deterministic_noise_fixes_it_and_guidance_extremes():
    cfg = D.DecoderConfig.smoke()
    model = make(cfg)
    _, _, z, tokens = inputs(cfg, b=2)
    a = model.sample(z, tokens, generator=torch.Generator().manual_seed(0))
    b = model.sample(z, tokens, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, cfg.image_size, cfg.image_size) and a.abs().max() <= 1
    torch.testing.assert_close(a, b)
    noise = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model.sample(z, tokens, noise=noise, generator=torch.Generator().manual_seed(1)),
                               model.sample(z, tokens, noise=noise, generator=torch.Generator().manual_seed(2)))
    # scale 0 is the unconditional model: the null z_i and the empty caption
    torch.testing.assert_close(model.sample(z, tokens, guidance_scale=0.0, noise=noise),
                               model.sample(noise=noise, guidance_scale=1.0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.sample(z, tokens, guidance_scale=3.0, noise=noise),
                              model.sample(z, tokens, guidance_scale=1.0, noise=noise))


def test_separate_text_guidance():
    cfg = D.DecoderConfig.smoke()
    model = make(cfg)
    _, _, z, tokens = inputs(cfg, b=2)
    noise = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(5))
    one = model.sample(z, tokens, guidance_scale=3.0, noise=noise)
    # the caption's scale equal to z_i's is the one-scale guidance (it telescopes)
    torch.testing.assert_close(model.sample(z, tokens, guidance_scale=3.0, text_guidance_scale=3.0, noise=noise),
                               one, atol=1e-5, rtol=1e-5)
    # the caption's scale 0: z_i alone, guided, the caption ignored
    torch.testing.assert_close(model.sample(z, tokens, guidance_scale=3.0, text_guidance_scale=0.0, noise=noise),
                               model.sample(z, None, guidance_scale=3.0, noise=noise), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.sample(z, tokens, guidance_scale=3.0, text_guidance_scale=8.0, noise=noise), one)
    with pytest.raises(ConfigError, match="text_guidance_scale"):
        model.sample(z, tokens, text_guidance_scale=-1.0, noise=noise)
    glide = make(D.DecoderConfig.glide("smoke"))
    with pytest.raises(ConfigError, match="no z_i"):
        glide.sample(tokens=tokens, text_guidance_scale=2.0, noise=noise)


def test_ddpm_sampler_with_learned_variance_runs():
    cfg = D.DecoderConfig.smoke()
    cfg = cfg.replace(unet=cfg.unet.replace(learn_sigma=True), sampler="ddpm", sample_steps=4,
                      diffusion=cfg.diffusion.replace(var_type="learned_range", loss_type="hybrid"))
    model = make(cfg)
    x, _, z, tokens = inputs(cfg, b=2)
    out = model.sample(z, tokens, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, cfg.image_size, cfg.image_size) and torch.isfinite(out).all()
    terms = model.training_losses(x, z, tokens, torch.Generator().manual_seed(0))
    assert "vb" in terms and torch.isfinite(terms["loss"]).all()


def test_stage_round_trip(tmp_path):
    run = stages.Run("smoke", run_dir=tmp_path)
    trained = stages.load_or_train(run, "decoder", steps=4, verbose=False)  # trains the smoke CLIP first
    clip_id = stages.read_record(run, "clip")["id"]
    record = stages.read_record(run, "decoder")
    assert record["requires"] == {"clip": clip_id} and record["config"]["train"]["steps"] == 4
    assert record["steps"] == 4 and "guidance_scale" not in record["config"]  # sampling fields: not trained
    loaded = stages.load_stage(run, "decoder")
    assert loaded.record["id"] == trained.record["id"] == record["id"]
    emb = run.embeddings("val")
    kw = dict(image_embed=emb["image_embed"][:2], tokens=emb["tokens"][:2])
    torch.testing.assert_close(loaded.sample(generator=torch.Generator().manual_seed(0), **kw),
                               trained.sample(generator=torch.Generator().manual_seed(0), **kw))
    glide = stages.load_or_train(run, "glide", steps=3, verbose=False)
    assert glide.cfg.use_image_embed is False and stages.load_stage(run, "glide").record["stage"] == "glide"
    with pytest.raises(Exception, match="decoder"):
        stages.load_stage(stages.Run("smoke", run_dir=tmp_path / "empty"), "decoder")


def test_glide_baseline_needs_no_clip_and_trains_on_the_clip_caches_tokens(tmp_path):
    """The course trains the baseline beside the CLIP, so it must not read the CLIP's cache: it tokenizes its
    captions itself, and must get exactly the ids the CLIP stage caches (what the pipeline feeds it)."""
    from unclip_mini.clip_model import caption_tokens
    alone = stages.Run("smoke", run_dir=tmp_path / "alone")
    glide = stages.load_or_train(alone, "glide", steps=2, verbose=False)
    assert stages.read_record(alone, "clip") is None, "training the baseline must not train a CLIP"
    assert glide.record["requires"] == {}
    run = stages.Run("smoke", run_dir=tmp_path / "run")
    stages.load_or_train(run, "clip", verbose=False)
    for split in ("train", "val"):
        cached = run.embeddings(split)["tokens"]
        mine = caption_tokens(run.cfg.clip, run.dataset(split).captions())
        assert mine.dtype == cached.dtype and torch.equal(mine, cached), split


def test_caption_encoder_runs_once_per_sample_not_per_step():
    cfg = D.DecoderConfig.smoke()
    model = make(cfg)
    _, _, z, tokens = inputs(cfg, b=2)
    calls = []
    hook = model.text.register_forward_hook(lambda *a: calls.append(1))
    try:
        model.sample(z, tokens, steps=5, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(calls) == 1, f"the caption encoder ran {len(calls)} times for one 5-step (guided) sample"


def test_invert_recovers_a_latent_that_decodes_back():
    cfg = D.DecoderConfig.smoke()
    model = make(cfg)
    _, _, z, tokens = inputs(cfg, b=2)
    images = model.sample(z, tokens, steps=20, generator=torch.Generator().manual_seed(1))
    x_t = model.invert(images, z, tokens, steps=20)
    assert x_t.shape == images.shape and torch.isfinite(x_t).all()
    assert torch.equal(x_t, model.invert(images, z, tokens, steps=20))            # deterministic
    back = model.sample(z, tokens, steps=20, noise=x_t)
    other = model.sample(z, tokens, steps=20, generator=torch.Generator().manual_seed(2))
    err, baseline = (back - images).pow(2).mean().sqrt(), (other - images).pow(2).mean().sqrt()
    assert err < 0.5 * baseline, f"round trip RMSE {err:.3f} is not well below a fresh sample's {baseline:.3f}"
    with pytest.raises(DataError, match="resize them first"):
        model.invert(images[:, :, :8, :8], z, tokens)
