"""Tests for unclip_mini.diffusion_prior: the sequence, causality and the cached prefix, the null caption,
the x0 loss, best-of-N, deterministic sampling, the stage round trip, config errors."""
import json

import pytest
import torch
from torch.testing import assert_close

from unclip_mini import diffusion_prior as dp
from unclip_mini import gaussian_diffusion as gd
from unclip_mini.errors import ArtifactError, ConfigError, DataError

D, TW, MAXLEN, B, L = 16, 24, 12, 3, 7


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a busy 2-core machine run ~50x slower with 2 threads (spinning workers): use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dp.DiffusionPriorConfig.smoke().replace(width=32, layers=2, heads=4, **kw)
    return dp.DiffusionPriorNetwork(cfg, D, TW, MAXLEN).eval()


def inputs(b=B, seed=0, lengths=(7, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    te = torch.nn.functional.normalize(torch.randn(b, D, generator=g), dim=-1)
    tt = torch.randn(b, L, TW, generator=g)
    tm = torch.arange(L)[None] < torch.tensor(lengths[:b])[:, None]  # right-padded captions
    x = torch.randn(b, D, generator=g)
    t = torch.tensor([5, 50, 99][:b])
    return x, t, te, tt, tm


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["smoke", "toy", "small", "paper"])
def test_presets_validate_and_round_trip(name):
    cfg = dp.DiffusionPriorConfig.preset(name)
    assert cfg.diffusion.mean_type == "x0" and cfg.cond_drop_prob == 0.1
    assert dp.DiffusionPriorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_paper_preset_and_scale():
    cfg = dp.DiffusionPriorConfig.paper()
    assert (cfg.width, cfg.layers, cfg.heads, cfg.sample_steps, cfg.num_candidates) == (2048, 24, 32, 64, 2)
    assert cfg.scale_for(1024) == 17.2
    assert dp.DiffusionPriorConfig.toy().replace(embed_scale=None).scale_for(64) == 8.0  # sqrt(D)


@pytest.mark.parametrize("change, match", [
    (dict(heads=3), "heads"),
    (dict(sample_steps=101), "sample_steps"),
    (dict(sample_steps=1), "sample_steps"),
    (dict(cond_drop_prob=1.0), "cond_drop_prob"),
    (dict(embed_scale=0.0), "embed_scale"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(num_candidates=0), "num_candidates"),
    (dict(diffusion=gd.DiffusionConfig(timesteps=100, var_type="learned_range", loss_type="hybrid")), "diffusion"),
    (dict(widht=64), "no field 'widht'"),
])
def test_config_errors_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        dp.DiffusionPriorConfig.smoke().replace(**change)


# ---------------------------------------------------------------------------------------------
# the network: shapes, causality, padding, what the output depends on
# ---------------------------------------------------------------------------------------------

def test_shapes_and_layout():
    model = make()
    x, t, te, tt, tm = inputs()
    assert model(x, t, te, tt, tm).shape == (B, D)
    layout = model.layout(L)
    assert len(layout) == L + 4 and layout[-1][1].startswith("query") and layout[L][1].startswith("z_t")
    assert model(x, t, te, tt.half(), tm).dtype == torch.float32  # cached float16 tokens are accepted


def test_cached_prefix_equals_full_forward():
    """Causality: caption and z_t never see t or z_i^(t), so a prefix cached once serves every step."""
    model = make()
    x, t, te, tt, tm = inputs()
    drop = torch.tensor([False, True, False])
    cache = model.encode_prefix(te, tt, tm, drop)
    for k in range(2):  # the second call must overwrite the first call's step positions
        xk, tk = x + k, t + 3 * k
        assert_close(model.forward_cached(xk, tk, cache), model(xk, tk, te, tt, tm, drop), atol=1e-5, rtol=1e-5)


def test_padding_never_matters():
    model = make()
    x, t, te, tt, tm = inputs()
    tt2 = torch.cat([tt, 100 * torch.randn(B, 3, TW)], dim=1)  # garbage in 3 more padded positions
    tm2 = torch.cat([tm, torch.zeros(B, 3, dtype=torch.bool)], dim=1)
    tt3 = torch.where(tm[..., None], tt, torch.randn_like(tt))  # and different garbage where padded
    ref = model(x, t, te, tt, tm)
    assert_close(model(x, t, te, tt2, tm2), ref, atol=1e-5, rtol=1e-5)
    assert_close(model(x, t, te, tt3, tm), ref, atol=1e-5, rtol=1e-5)


def _changes(model, base, **changed):
    x, t, te, tt, tm, drop = base
    args = dict(x=x, t=t, text_embed=te, text_tokens=tt, text_mask=tm, drop=drop)
    out = model(**args)
    args.update(changed)
    return (model(**args) - out).abs().amax(dim=-1)  # [B]


def test_conditional_output_depends_on_every_input():
    model = make()
    x, t, te, tt, tm = inputs()
    base = (x, t, te, tt, tm, None)
    tt_first = tt.clone()
    tt_first[:, 0] += 1.0  # only the first caption token
    for name, value in dict(x=x + 0.5, t=t + 7, text_embed=te.roll(1, 0), text_tokens=tt_first).items():
        assert (_changes(model, base, **{name: value}) > 1e-4).all(), name


def test_unconditional_branch_sees_the_noised_embedding_and_the_timestep():
    """The null caption removes the caption and z_t, never z_i^(t) or t (the peer bug this guards against)."""
    model = make()
    x, t, te, tt, tm = inputs()
    drop = torch.ones(B, dtype=torch.bool)
    base = (x, t, te, tt, tm, drop)
    assert (_changes(model, base, x=x + 0.5) > 1e-4).all()
    assert (_changes(model, base, t=t + 7) > 1e-4).all()
    assert (_changes(model, base, text_embed=te.flip(0), text_tokens=torch.randn_like(tt)) < 1e-6).all()
    # and the null embedding differs from every real caption: dropping changes the output
    assert (_changes(model, (x, t, te, tt, tm, None), drop=drop) > 1e-4).all()


def test_bad_inputs_fail_with_the_fix():
    model = make()
    x, t, te, tt, tm = inputs()
    with pytest.raises(DataError, match=r"\[B, 16\] CLIP text embeddings"):
        model(x, t, te[:, :8], tt, tm)
    with pytest.raises(DataError, match="per-token features"):
        model(x, t, te, tt[..., :5], tm)
    with pytest.raises(DataError, match="at most 12"):
        model(x, t, te, torch.zeros(B, 13, TW), torch.ones(B, 13, dtype=torch.bool))
    with pytest.raises(DataError, match="text_mask must be a bool"):
        model(x, t, te, tt, tm.float())


# ---------------------------------------------------------------------------------------------
# training: the x0 loss and the null-caption rate
# ---------------------------------------------------------------------------------------------

def test_loss_is_mse_to_the_scaled_clean_embedding_and_drops_captions_at_the_rate():
    model = make()
    diffusion = gd.create_diffusion(model.cfg.diffusion)
    seen = []

    def spy(x_t, t, **kw):
        seen.append((x_t, t, kw["drop"]))
        return model(x_t, t, **kw)

    n = 4000
    g = torch.Generator().manual_seed(0)
    z_i = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
    x, _, te, tt, tm = inputs(1)
    batch = (z_i, te.expand(n, D), tt.expand(n, L, TW), tm.expand(n, L))
    loss, _ = dp.loss_fn(diffusion, 4.0, 0.1)(spy, batch, torch.Generator().manual_seed(1))
    x_t, t, drop = seen[0]
    assert drop.dtype == torch.bool and abs(drop.float().mean().item() - 0.1) < 0.015
    with torch.no_grad():  # from scratch: || f(z_i^(t), t, y) - scale * z_i ||^2
        ref = ((model(x_t, t, te.expand(n, D), tt.expand(n, L, TW), tm.expand(n, L), drop) - 4.0 * z_i) ** 2).mean()
    assert_close(loss.detach(), ref)
    # x_t really is q(x_t | scale * z_i): recover the noise and check it is standard normal
    abar = diffusion.alphas_cumprod[t][:, None]
    eps = (x_t - abar.sqrt() * 4.0 * z_i) / (1 - abar).sqrt()
    assert abs(eps.std().item() - 1) < 0.03


def test_null_caption_mask_rate_and_determinism():
    m = dp.null_caption_mask(50_000, 0.1, torch.Generator().manual_seed(0))
    assert abs(m.float().mean().item() - 0.1) < 0.005
    assert torch.equal(m, dp.null_caption_mask(50_000, 0.1, torch.Generator().manual_seed(0)))
    assert not dp.null_caption_mask(100, 0.0, torch.Generator().manual_seed(0)).any()


# ---------------------------------------------------------------------------------------------
# sampling: best-of-N, guidance, determinism
# ---------------------------------------------------------------------------------------------

def test_best_of_picks_the_larger_dot_product_with_the_text_embedding():
    te = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cands = torch.tensor([[[0.6, 0.8], [0.8, 0.6]],     # caption 0: second is closer to z_t
                          [[0.6, 0.8], [0.8, 0.6]]])    # caption 1: first is
    best, index = dp.best_of(cands, te)
    assert index.tolist() == [1, 0]
    assert_close(best, torch.tensor([[0.8, 0.6], [0.6, 0.8]]))


def _prior(**kw):
    return dp.DiffusionPrior(make(**kw), make(**kw).cfg.replace(sample_steps=5), "cpu")


def test_sampling_is_deterministic_unit_norm_and_batch_independent():
    prior = _prior()
    _, _, te, tt, tm = inputs()
    s1 = prior.sample(te, tt, tm, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    s2 = prior.sample(te, tt, tm, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), batch_size=2)
    s3 = prior.sample(te, tt, tm, guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
    assert s1.shape == (B, D)
    assert_close(s1.norm(dim=-1), torch.ones(B))
    assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    assert (s1 - s3).abs().max() > 1e-3


def test_best_of_two_returns_the_candidate_closest_to_the_caption():
    prior = _prior()
    _, _, te, tt, tm = inputs()
    best, cands, index = prior.sample(te, tt, tm, num_candidates=2, generator=torch.Generator().manual_seed(0),
                                      return_candidates=True)
    assert cands.shape == (B, 2, D)
    dots = torch.einsum("bnd,bd->bn", cands, te)
    assert torch.equal(index, dots.argmax(1))
    assert_close(best, cands[torch.arange(B), index])


def test_guidance_zero_is_unconditional_and_one_is_conditional():
    prior = _prior()
    _, _, te, tt, tm = inputs()
    kw = dict(num_candidates=1, steps=4)
    g = lambda: torch.Generator().manual_seed(0)
    u1 = prior.sample(te, tt, tm, guidance_scale=0.0, generator=g(), **kw)
    u2 = prior.sample(te.flip(0), torch.randn_like(tt), tm, guidance_scale=0.0, generator=g(), **kw)
    assert_close(u1, u2, atol=1e-5, rtol=1e-5)  # s = 0: the caption plays no part
    c1 = prior.sample(te, tt, tm, guidance_scale=1.0, generator=g(), **kw)
    c2 = prior.sample(te.flip(0), tt, tm, guidance_scale=1.0, generator=g(), **kw)
    assert (c1 - c2).abs().max() > 1e-3
    # s = 1 through the doubled batch equals the conditional model alone (the fast path)
    c3 = prior.sample(te, tt, tm, guidance_scale=1.0 + 1e-9, generator=g(), **kw)
    assert_close(c1, c3, atol=1e-5, rtol=1e-5)


def test_sampling_errors():
    prior = _prior()
    _, _, te, tt, tm = inputs()
    with pytest.raises(ConfigError, match="num_candidates"):
        prior.sample(te, tt, tm, num_candidates=0)
    for steps in (1, 1000):
        with pytest.raises(ConfigError, match="steps"):
            prior.sample(te, tt, tm, steps=steps)
    with pytest.raises(DataError, match="one row per caption"):
        prior.sample(te, tt[:2], tm[:2])


# ---------------------------------------------------------------------------------------------
# the stage (the one slow test: trains the smoke CLIP and the smoke prior, ~10 s)
# ---------------------------------------------------------------------------------------------

def test_train_load_round_trip(tmp_path):
    from unclip_mini import stages
    run = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    with pytest.raises(ArtifactError, match="no trained 'diffusion_prior' stage"):
        stages.load_stage(run, "diffusion_prior")
    stages.load_or_train(run, "clip", verbose=False)
    trained = stages.train_stage(run, "diffusion_prior")
    record = stages.read_record(run, "diffusion_prior")
    assert record["requires"] == {"clip": stages.read_record(run, "clip")["id"]}
    assert record["history"]["step"][-1] == run.cfg.diffusion_prior.train.steps
    loaded = stages.load_or_train(run, "diffusion_prior", verbose=False)
    assert loaded.record["id"] == trained.record["id"] == record["id"]
    e = run.embeddings("heldout")
    a = trained.sample(e["text_embed"][:4], e["text_tokens"][:4], e["text_mask"][:4],
                       generator=torch.Generator().manual_seed(0))
    b = loaded.sample(e["text_embed"][:4], e["text_tokens"][:4], e["text_mask"][:4],
                      generator=torch.Generator().manual_seed(0))
    assert_close(a, b)
    # sampling settings are not part of the trained stage: changing them loads the same weights
    run2 = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    run2.cfg = run2.cfg.replace(diffusion_prior=run2.cfg.diffusion_prior.replace(guidance_scale=3.0, sample_steps=4))
    again = stages.load_stage(run2, "diffusion_prior")
    assert again.cfg.guidance_scale == 3.0 and again.cfg.sample_steps == 4
    assert again.record["id"] == trained.record["id"]
    # a prior trained on another CLIP is refused
    path = tmp_path / "clip" / "stage.json"
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "id": "clip-0000000000"}))
    with pytest.raises(ArtifactError, match="retrain"):
        stages.load_stage(run, "diffusion_prior")


def test_a_prior_trained_with_a_wider_modality_gap(tmp_path):
    """`text_gap` moves z_t away from the image embeddings (notebook 10's controlled experiment): the prior trains
    on the moved z_t, records the direction, and applies the same move when it samples."""
    from unclip_mini import stages
    run = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    stages.load_or_train(run, "clip", verbose=False)
    cfg = run.cfg.diffusion_prior.replace(text_gap=0.8)
    prior = stages.load_or_train(run, "diffusion_prior", config=cfg, variant="gap", verbose=False)
    direction = torch.tensor(prior.record["dims"]["gap_direction"])
    e = run.embeddings("train")
    assert_close(direction, dp.gap_direction(e["image_embed"], e["text_embed"]), atol=1e-6, rtol=0)
    wide = prior.text_embed_for(e["text_embed"])
    assert_close(wide.norm(dim=-1), torch.ones(len(wide)))
    assert (wide * e["image_embed"]).sum(-1).mean() < (e["text_embed"] * e["image_embed"]).sum(-1).mean() - 0.05
    plain = stages.load_or_train(run, "diffusion_prior", verbose=False)
    assert plain.gap_direction is None and torch.equal(plain.text_embed_for(e["text_embed"]), e["text_embed"])


def test_gap_for_cosine_moves_matched_pairs_to_the_target():
    g = torch.Generator().manual_seed(0)
    zi = torch.nn.functional.normalize(torch.randn(200, 16, generator=g) + 2.0, dim=-1)
    zt = torch.nn.functional.normalize(zi + 0.1 * torch.randn(200, 16, generator=g), dim=-1)
    matched = (zi * zt).sum(-1).mean().item()
    assert matched > 0.8
    for target in (0.5, 0.7):
        a = dp.gap_for_cosine(zi, zt, target)
        widened = dp.widen_gap(zt, dp.gap_direction(zi, zt), a)
        assert a > 0 and (widened * zi).sum(-1).mean().item() == pytest.approx(target, abs=2e-3)
    assert dp.gap_for_cosine(zi, zt, 0.99) == 0.0          # already below the target: no widening
