"""Tests of unclip_mini/ar_prior.py: PCA, quantizer, dot token, guidance, KV-cache sampling, errors, the stage."""
import pytest
import torch
import torch.nn.functional as F

from unclip_mini import ar_prior
from unclip_mini import gaussian_diffusion as gd
from unclip_mini.ar_prior import ARPriorConfig, ARPriorNetwork, PCAQuantizer
from unclip_mini.errors import ConfigError, DataError

D, N, TEXT_W, TEXT_LEN = 16, 400, 24, 10


def embeddings(n=N, d=D, seed=0):
    """Unit-norm z_i with a decaying spectrum (a few strong directions), and paired z_t near them."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, d)
    z_i = F.normalize(torch.randn(n, d, generator=g) * scale + 0.5, dim=-1)
    z_t = F.normalize(z_i + 0.3 * torch.randn(n, d, generator=g), dim=-1)
    return z_i, z_t


def fit(**kw):
    z_i, z_t = embeddings()
    args = dict(variance_to_keep=0.99, n_buckets=32, bucket_edges_kind="quantile", dot_buckets=8) | kw
    return PCAQuantizer.fit(z_i, z_t, **args), z_i, z_t


def captions(b=3, l=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, l, dtype=torch.bool)
    mask[0, 4:] = False                                       # a shorter caption, right-padded
    return torch.randn(b, l, TEXT_W, generator=g), mask


def model_for(q, seed=0, **kw):
    cfg = ARPriorConfig.smoke().replace(n_buckets=q.n_buckets, dot_buckets=q.dot_buckets, **kw)
    torch.manual_seed(seed)
    return ARPriorNetwork(cfg, D, TEXT_W, TEXT_LEN, q.n_components).eval()


# -- PCA ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.9, 0.99])
def test_pca_keeps_the_requested_variance_with_the_fewest_components(keep):
    q, _, _ = fit(variance_to_keep=keep)
    cum = q.explained_variance_ratio.cumsum(0)
    k = q.n_components
    assert cum[k - 1] >= keep - 1e-6
    assert k == 1 or cum[k - 2] < keep                        # one fewer would not be enough
    assert (q.explained_variance_ratio[:-1] >= q.explained_variance_ratio[1:] - 1e-7).all()  # decreasing


def test_pca_reconstruction_improves_with_components_and_is_exact_with_all():
    q, z_i, _ = fit()
    errs = [ar_prior.reconstruction_error(z_i, q.pca_reconstruct(z_i, k)) for k in (1, 4, D)]
    assert errs[0] > errs[1] > errs[2]
    torch.testing.assert_close(q.pca_reconstruct(z_i, D), z_i, atol=1e-5, rtol=0)


def test_fixed_number_of_components():
    q, _, _ = fit(n_components=5)
    assert q.n_components == 5 and q.encode(embeddings()[0]).shape == (N, 5)


# -- quantizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["quantile", "uniform"])
def test_quantize_dequantize_error_is_within_the_bucket_width(kind):
    q, z_i, _ = fit(bucket_edges_kind=kind)
    coeffs = q.project(z_i)
    codes = q.encode(z_i)
    assert codes.dtype == torch.long and codes.min() >= 0 and codes.max() < q.n_buckets
    back = q.dequantize(codes)
    lo = torch.gather(q.edges, 1, codes.T).T                  # the edges of each value's bucket
    hi = torch.gather(q.edges, 1, codes.T + 1).T
    assert ((coeffs >= lo - 1e-5) & (coeffs <= hi + 1e-5)).all()
    assert ((back - coeffs).abs() <= (hi - lo) + 1e-5).all()
    assert (back - coeffs).abs().max() > 0                    # it does quantize


def test_decode_is_unit_norm_and_close_to_the_input():
    q, z_i, _ = fit(n_buckets=256)
    z = q.decode(q.encode(z_i))
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(N))
    assert F.cosine_similarity(z, z_i).mean() > 0.99


def test_quantile_edges_hold_equal_counts_and_uniform_edges_equal_widths():
    z_i, _ = embeddings()
    coeffs = PCAQuantizer.fit(z_i, n_components=3, n_buckets=8).project(z_i)
    qe = ar_prior.bucket_edges(coeffs, 8, "quantile")
    ue = ar_prior.bucket_edges(coeffs, 8, "uniform")
    counts = torch.stack([torch.bincount(c, minlength=8) for c in ar_prior.quantize(coeffs, qe).T])
    assert (counts - N / 8).abs().max() <= 1                  # equal counts
    widths = ue[:, 1:] - ue[:, :-1]
    torch.testing.assert_close(widths, widths[:, :1].expand_as(widths))  # equal widths
    torch.testing.assert_close(ue[:, 0], coeffs.min(0).values)
    torch.testing.assert_close(ue[:, -1], coeffs.max(0).values)
    ucounts = torch.stack([torch.bincount(c, minlength=8) for c in ar_prior.quantize(coeffs, ue).T])
    assert (ucounts.max(1).values > ucounts.min(1).values + 5).all()    # uniform: uneven counts


def test_payload_round_trip():
    q, z_i, _ = fit()
    q2 = PCAQuantizer.from_payload(q.to_payload())
    assert torch.equal(q.encode(z_i), q2.encode(z_i))
    assert torch.equal(q.decode(q.encode(z_i)), q2.decode(q.encode(z_i)))


# -- the dot-product token -----------------------------------------------------------------------

def test_dot_codes_follow_the_training_quantiles():
    q, z_i, z_t = fit()
    codes = q.dot_codes(z_i, z_t)
    counts = torch.bincount(codes, minlength=q.dot_buckets)
    assert (counts - N / q.dot_buckets).abs().max() <= 1      # quantile buckets: equal counts


@pytest.mark.parametrize("percentile", [0.0, 0.5, 0.85])
def test_dot_percentile_picks_from_the_top_of_the_distribution(percentile):
    q, _, _ = fit(dot_buckets=20)
    codes = q.sample_dot_codes(4000, percentile, torch.Generator().manual_seed(0))
    lowest = int(percentile * q.dot_buckets)
    assert codes.min() == lowest and codes.max() == q.dot_buckets - 1
    counts = torch.bincount(codes, minlength=q.dot_buckets)[lowest:].float()
    assert counts.min() > 0.7 * counts.mean()                  # uniform over the top buckets


def test_dot_percentile_out_of_range_is_refused():
    q, _, _ = fit()
    with pytest.raises(ConfigError, match="top half"):
        q.sample_dot_codes(4, 1.0)


# -- guidance and sampling ------------------------------------------------------------------------

def test_guidance_scale_one_is_the_conditional_logits():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    assert torch.equal(gd.guide(cond, uncond, 1.0), cond)
    torch.testing.assert_close(gd.guide(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(gd.guide(cond, uncond, 3.0), uncond + 3 * (cond - uncond))


def test_guided_sampling_differs_from_conditional_and_scale_one_equals_it():
    q, _, z_t = fit()
    tokens, mask = captions()
    model = model_for(q)
    dots = torch.tensor([5, 6, 7])
    with torch.no_grad():  # a trained null embedding would differ from the conditional one; make it so here
        model.null_text_embed.normal_()
    args = (tokens, mask, z_t[:3], dots)
    plain = model.sample_codes(*args, temperature=0)
    assert torch.equal(model.sample_codes(*args, temperature=0, guidance_scale=1.0), plain)
    assert not torch.equal(model.sample_codes(*args, temperature=0, guidance_scale=8.0), plain)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_kv_cache_sampling_equals_full_forward_greedy_decoding(guidance_scale):
    q, _, z_t = fit()
    tokens, mask = captions()
    model = model_for(q)
    dots = torch.tensor([1, 4, 7])
    cached = model.sample_codes(tokens, mask, z_t[:3], dots, temperature=0, guidance_scale=guidance_scale)
    full = model.sample_codes(tokens, mask, z_t[:3], dots, temperature=0, guidance_scale=guidance_scale,
                              use_cache=False)
    assert torch.equal(cached, full)
    # and greedy decoding is the argmax of the teacher-forced logits of its own output
    if guidance_scale == 1.0:
        logits = model(tokens, mask, z_t[:3], dots, cached)
        assert torch.equal(logits.argmax(-1), cached)


def test_sampling_is_reproducible_with_a_generator():
    q, _, z_t = fit()
    tokens, mask = captions()
    model = model_for(q)
    dots = torch.tensor([1, 4, 7])
    a = model.sample_codes(tokens, mask, z_t[:3], dots, generator=torch.Generator().manual_seed(3))
    b = model.sample_codes(tokens, mask, z_t[:3], dots, generator=torch.Generator().manual_seed(3))
    c = model.sample_codes(tokens, mask, z_t[:3], dots, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_padding_tokens_do_not_change_the_logits():
    q, z_i, z_t = fit()
    tokens, mask = captions()
    model = model_for(q)
    codes, dots = q.encode(z_i[:3]), torch.tensor([1, 4, 7])
    noisy = tokens.clone()
    noisy[~mask] = 100 * torch.randn(int((~mask).sum()), TEXT_W)
    torch.testing.assert_close(model(tokens, mask, z_t[:3], dots, codes), model(noisy, mask, z_t[:3], dots, codes))


def test_loss_is_finite_and_dropped_rows_ignore_the_caption():
    q, z_i, z_t = fit()
    tokens, mask = captions()
    model = model_for(q)
    codes, dots = q.encode(z_i[:3]), torch.tensor([1, 4, 7])
    drop = torch.tensor([True, False, True])
    a = model(tokens, mask, z_t[:3], dots, codes, drop)
    b = model(torch.randn_like(tokens), mask, torch.randn_like(z_t[:3]), torch.tensor([0, 4, 2]), codes, drop)
    torch.testing.assert_close(a[drop], b[drop])
    assert (a[~drop] - b[~drop]).abs().max() > 1e-4
    batch = {"text_tokens": tokens, "text_mask": mask, "text_embed": z_t[:3], "dot_codes": dots, "codes": codes}
    loss, logs = ar_prior.ar_loss_fn(0.1)(model, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and 0 <= logs["acc"] <= 1


# -- bad input ---------------------------------------------------------------------------------

def test_more_components_than_the_embedding_has():
    z_i, _ = embeddings()
    with pytest.raises(ConfigError, match=f"only {D} dimensions.*at most {D}"):
        PCAQuantizer.fit(z_i, n_components=D + 1)


def test_fewer_than_two_buckets():
    z_i, _ = embeddings()
    with pytest.raises(ConfigError, match="at least 2 buckets"):
        PCAQuantizer.fit(z_i, n_buckets=1)
    with pytest.raises(ConfigError, match="n_buckets"):
        ARPriorConfig(n_buckets=1)


def test_pca_on_fewer_samples_than_components():
    z_i, _ = embeddings(n=8)
    with pytest.raises(DataError, match="8 image embeddings.*more than 12"):
        PCAQuantizer.fit(z_i, n_components=12)
    with pytest.raises(DataError, match="8 image embeddings"):
        PCAQuantizer.fit(z_i)                                  # variance mode needs all D components


def test_config_validation():
    with pytest.raises(ConfigError, match="bucket_edges"):
        ARPriorConfig(bucket_edges="log")
    with pytest.raises(ConfigError, match="dot_percentile"):
        ARPriorConfig(dot_percentile=1.0)
    with pytest.raises(ConfigError, match="cond_drop_prob"):
        ARPriorConfig(cond_drop_prob=0.0, guidance_scale=2.0)
    for name in ("smoke", "toy", "small", "paper"):
        assert isinstance(ARPriorConfig.preset(name), ARPriorConfig)
    assert ARPriorConfig.paper().n_components == 319 and ARPriorConfig.paper().n_buckets == 1024
    cfg = ARPriorConfig.toy()
    assert ARPriorConfig.from_dict(cfg.to_dict()) == cfg


def test_too_long_caption_is_refused():
    q, _, z_t = fit()
    model = model_for(q)
    tokens = torch.randn(1, TEXT_LEN + 1, TEXT_W)
    with pytest.raises(DataError, match=f"at most {TEXT_LEN}"):
        model.sample_codes(tokens, torch.ones(1, TEXT_LEN + 1, dtype=torch.bool), z_t[:1], torch.tensor([0]))


# -- the stage (the one slow test) ----------------------------------------------------------------

def fake_clip(run, n=(300, 40, 40), length=8):
    """A CLIP stage record and embeddings cache without training a CLIP (the AR stage reads only these)."""
    from unclip_mini import stages
    record = stages.write_record(run, "clip", {"fake_for_tests": True})  # no checkpoint: never loaded
    splits = {}
    for i, (split, size) in enumerate(zip(("train", "val", "heldout"), n)):
        z_i, z_t = embeddings(size, seed=i)
        lengths = torch.randint(3, length + 1, (size,), generator=torch.Generator().manual_seed(i))
        mask = torch.arange(length)[None] < lengths[:, None]               # right-padded captions
        splits[split] = {"text_embed": z_t, "image_embed": z_i, "tokens": torch.zeros(size, length, dtype=torch.int32),
                         "text_tokens": torch.randn(size, length, TEXT_W).half(), "text_mask": mask}
    run.folder.save("clip", "embeddings", splits, config={"fake_for_tests": True}, requires={"clip": record["id"]})
    return record


def test_smoke_train_stage_then_load_stage(tmp_path):
    from unclip_mini import stages
    run = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    clip = fake_clip(run)
    trained = stages.train_stage(run, "ar_prior")
    record = stages.read_record(run, "ar_prior")
    assert record["requires"] == {"clip": clip["id"]}
    assert run.folder.exists("ar_prior", "pca")
    loaded = stages.load_or_train(run, "ar_prior", verbose=False)
    h = run.embeddings("heldout")
    args = (h["text_embed"][:8], h["text_tokens"][:8], h["text_mask"][:8])
    a = trained.sample(*args, generator=torch.Generator().manual_seed(0))
    b = loaded.sample(*args, generator=torch.Generator().manual_seed(0))
    assert a.shape == (8, D)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(a, b)
    assert len(record["history"]["loss"]) > 0
    stages.write_record(run, "clip", {"fake_for_tests": "retrained"})   # a new CLIP: the prior is refused
    with pytest.raises(Exception, match="retrain"):
        stages.load_stage(run, "ar_prior")
