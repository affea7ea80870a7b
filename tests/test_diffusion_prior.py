"""Tests for unclip_mini.diffusion_prior: the sequence, causality and the cached prefix, the null caption,
the x0 loss, best-of-N, deterministic sampling, the stage round trip, config errors."""
import json
import math

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


def test_metrics_on_known_embeddings():
    z = torch.eye(4)
    m = dp.embedding_metrics(z, z, z.roll(1, 0), matches={"scene": torch.eye(4, dtype=torch.bool)})
    assert m == {"cos_image": 1.0, "cos_text": 0.0, "top1": 1.0, "top1_scene": 1.0}
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    zi = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    assert dp.pair_cosine(zi, same) == pytest.approx(0.6)
    assert math.isnan(dp.pair_cosine(zi, torch.eye(3, dtype=torch.bool)))


def test_modality_probe_and_candidate_diversity():
    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(D)
    shift[0] = 2.0
    zi = torch.nn.functional.normalize(torch.randn(200, D, generator=g) + shift, dim=-1)   # two separated clouds
    zt = torch.nn.functional.normalize(torch.randn(200, D, generator=g) - shift, dim=-1)
    probe = dp.ModalityProbe(zi, zt)
    assert probe.p_image(zi).mean() > 0.9 and probe.p_image(zt).mean() < 0.1
    c = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])   # orthogonal pair, identical pair
    assert dp.candidate_diversity(c) == pytest.approx(0.5)


def test_caption_match_reads_only_what_the_caption_says():
    from unclip_mini import data
    o = lambda colour, shape, size="small", cell=(0, 0): data.SceneObject(colour, shape, size, cell, (0.3, 0.3), 0.2, 0.0)
    t_plain = data.SINGLE_TEMPLATES.index("a {colour} {shape}")
    t_full = data.SINGLE_TEMPLATES.index("a {size} {colour} {shape} in the {cell}")
    t_rel = data.PAIR_TEMPLATES.index("a {colour_a} {shape_a} {rel} a {colour_b} {shape_b}")
    t_and = data.PAIR_TEMPLATES.index("a {colour_a} {shape_a} and a {colour_b} {shape_b}")
    scene = lambda objs, tpl, rel=None: data.Scene(tuple(objs), rel, None, "", tpl)
    scenes = [scene([o("red", "circle")], t_plain),                      # 0: "a red circle"
              scene([o("red", "circle", "large", (1, 1))], t_full),      # 1: "a large red circle in the bottom right"
              scene([o("red", "circle", "small", (1, 1))], t_full),      # 2
              scene([o("red", "circle", cell=(0, 0)), o("blue", "star", cell=(0, 1))], t_rel, "left of"),
              scene([o("blue", "star", cell=(1, 0)), o("red", "circle", cell=(1, 1))], t_rel, "right of"),
              scene([o("blue", "star", cell=(0, 0)), o("red", "circle", cell=(0, 1))], t_and, "left of")]
    m = dp.caption_match_matrix(scenes)
    assert m[0].tolist() == [True, True, True, False, False, False]     # any single red circle
    assert m[1].tolist() == [False, True, False, False, False, False]   # size and cell must match
    assert m[3].tolist() == [False, False, False, True, True, False]    # "A left of B" == "B right of A", any row
    assert m[5].tolist() == [False, False, False, True, True, True]     # "A and B": any arrangement
    assert dp.same_scene_matrix(scenes).sum().item() == 6               # every scene differs


# ---------------------------------------------------------------------------------------------
# the stage (the one slow test: trains the smoke CLIP and the smoke prior, ~10 s)
# ---------------------------------------------------------------------------------------------

def test_benchmark_reports_times():
    from types import SimpleNamespace
    from unclip_mini import stages
    cfg = stages.Config(preset="smoke")
    run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"))  # benchmark reads sizes only: no run folder
    out = dp.benchmark(run, train_steps=1, sample_captions=2, text_len=5)
    assert out["train_ms_per_step"] > 0 and out["sample_ms_per_embedding"] > 0
    assert out["params"] == dp.count_parameters(dp.DiffusionPriorNetwork(
        cfg.diffusion_prior, cfg.clip.embed_dim, cfg.clip.text_width, cfg.clip.context_length))


def test_train_load_round_trip(tmp_path):
    from unclip_mini import clip_model, stages
    run = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    with pytest.raises(ArtifactError, match="no trained diffusion prior"):
        dp.load_stage(run)
    trained = dp.train_stage(run)
    record = stages.read_record(run, "diffusion_prior")
    assert record["requires"] == {"clip": stages.read_record(run, "clip")["id"]}
    assert record["history"]["step"][-1] == run.cfg.diffusion_prior.train.steps
    loaded = stages.load_or_train(run, "diffusion_prior", verbose=False)
    assert loaded.name == trained.name == record["id"]
    e = clip_model.load_embeddings(run, "heldout")
    a = trained.sample(e["text_embed"][:4], e["text_tokens"][:4], e["text_mask"][:4],
                       generator=torch.Generator().manual_seed(0))
    b = loaded.sample(e["text_embed"][:4], e["text_tokens"][:4], e["text_mask"][:4],
                      generator=torch.Generator().manual_seed(0))
    assert_close(a, b)
    # sampling settings are not part of the trained stage: changing them loads the same weights
    run2 = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    run2.cfg = run2.cfg.replace(diffusion_prior=run2.cfg.diffusion_prior.replace(guidance_scale=3.0, sample_steps=4))
    again = dp.load_stage(run2)
    assert again.cfg.guidance_scale == 3.0 and again.cfg.sample_steps == 4 and again.name == trained.name
    # a prior trained on another CLIP is refused
    path = tmp_path / "clip" / "stage.json"
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "id": "clip-0000000000"}))
    with pytest.raises(ArtifactError, match="retrain"):
        dp.load_stage(run)
