"""unCLIP end to end (unclip.py): slerp, the pipeline's generate, its conditionings, the manipulations through
(z_i, x_T), and `stages.load_pipeline` on a smoke run with every stage trained."""
import math
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from unclip_mini import stages, unclip
from unclip_mini.errors import ArtifactError, CaptionTooLong, ConfigError, DataError

torch.set_num_threads(1)


# -- slerp ----------------------------------------------------------------------------------------

def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def angle(a, b):
    return torch.arccos((F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).clamp(-1, 1))


def test_slerp_endpoints_unit_norm_and_equal_angles():
    a, b = unit(5, 8, seed=1), unit(5, 8, seed=2)
    torch.testing.assert_close(unclip.slerp(a, b, 0.0), a)
    torch.testing.assert_close(unclip.slerp(a, b, 1.0), b)
    thetas = torch.linspace(0, 1, 9)
    path = unclip.slerp(a, b, thetas)                                         # [9, 5, 8]
    assert path.shape == (9, 5, 8)
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(9, 5, dtype=torch.float64))
    steps = torch.stack([angle(path[k], path[k + 1]) for k in range(8)])      # [8, 5]
    torch.testing.assert_close(steps, angle(a, b).expand(8, 5) / 8)           # equal theta steps, equal angles
    # it stays on the great circle: every point is in the plane of a and b
    normal = b - (a * b).sum(-1, keepdim=True) * a
    residual = path - (path * a).sum(-1, keepdim=True) * a - \
        (path * F.normalize(normal, dim=-1)).sum(-1, keepdim=True) * F.normalize(normal, dim=-1)
    assert residual.abs().max() < 1e-9


def test_slerp_nearly_parallel_opposite_and_norms():
    a = unit(1, 6, seed=3)
    b = F.normalize(a + 1e-12 * unit(1, 6, seed=4), dim=-1)                   # nearly parallel
    mid = unclip.slerp(a, b, 0.5)
    assert torch.isfinite(mid).all() and abs(mid.norm().item() - 1) < 1e-9
    opp = unclip.slerp(a, -a, torch.linspace(0, 1, 5))                        # opposite: a fixed great circle
    torch.testing.assert_close(opp[0], a)
    torch.testing.assert_close(opp[-1], -a)
    torch.testing.assert_close(opp.norm(dim=-1), torch.ones(5, 1, dtype=torch.float64))
    torch.testing.assert_close(angle(a, opp[2]), torch.tensor([math.pi / 2], dtype=torch.float64))
    steps = torch.stack([angle(opp[k], opp[k + 1]) for k in range(4)])
    torch.testing.assert_close(steps, torch.full((4, 1), math.pi / 4, dtype=torch.float64))
    # norms are interpolated linearly (x_T of two images is not unit norm)
    x, y = 2 * unit(1, 6, seed=5), 4 * unit(1, 6, seed=6)
    assert unclip.slerp(x, y, 0.25).norm().item() == pytest.approx(2.5)
    with pytest.raises(DataError, match="zero vector"):
        unclip.slerp(torch.zeros(1, 6), a, 0.5)
    with pytest.raises(DataError, match="one shape"):
        unclip.slerp(a, unit(1, 5), 0.5)


# -- the pipeline ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("unclip_smoke")
    run = stages.Run("smoke", run_dir=root, device="cpu")
    for name in ("clip", "diffusion_prior", "ar_prior", "decoder", "upsampler1", "upsampler2"):
        stages.load_or_train(run, name, verbose=False)
    return root


@pytest.fixture(scope="module")
def pipe(trained_dir):
    return stages.load_pipeline(stages.Run("smoke", run_dir=trained_dir, device="cpu"))


CAPTIONS = ["a red circle", "a blue square left of a green star"]


def test_generate_makes_every_size_deterministically(pipe):
    assert pipe.sizes == (16, 64, 256)
    out = pipe.generate(CAPTIONS, n_per_caption=2, seed=0, decoder_steps=3, upsampler_steps=(2, 2))
    assert out.captions == [CAPTIONS[0]] * 2 + [CAPTIONS[1]] * 2
    assert [tuple(v.shape) for v in out.images.values()] == [(4, 3, 16, 16), (4, 3, 64, 64), (4, 3, 256, 256)]
    assert out.final.shape == (4, 3, 256, 256) and out.final.abs().max() <= 1
    assert out.image_embed.shape == (4, 16) and out.noise.shape == (4, 3, 16, 16) and out.prior == "diffusion"
    torch.testing.assert_close(out.image_embed.norm(dim=-1), torch.ones(4))
    assert set(out.seconds) == {"text", "prior", "decoder", "upsampler1", "upsampler2"}
    again = pipe.generate(CAPTIONS, n_per_caption=2, seed=0, decoder_steps=3, upsampler_steps=(2, 2))
    for s in out.images:
        assert torch.equal(out.images[s], again.images[s]), f"{s} px differs between two runs of one seed"
    # the noise is drawn up front, so the batch size changes only the float rounding of the convolutions
    batched = pipe.generate(CAPTIONS, n_per_caption=2, seed=0, decoder_steps=3, upsampler_steps=(2, 2), batch_size=1)
    for s in out.images:
        torch.testing.assert_close(out.images[s], batched.images[s], atol=1e-4, rtol=0)
    other = pipe.generate(CAPTIONS, n_per_caption=2, seed=1, decoder_steps=3, size="base")
    assert list(other.images) == [16] and not torch.equal(other.images[16], out.images[16])
    # the latents it returns are the ones that made the images
    torch.testing.assert_close(pipe.decode(out.image_embed, pipe.encode_text(out.captions)["tokens"],
                                           noise=out.noise, steps=3), out.images[16])


def test_the_three_conditionings_and_both_priors(pipe):
    kw = dict(seed=0, decoder_steps=3, size=16)
    cap = pipe.generate(CAPTIONS, conditioning="caption", **kw)
    assert torch.equal(cap.image_embed, torch.zeros_like(cap.image_embed)) and cap.prior is None
    txt = pipe.generate(CAPTIONS, conditioning="text_embed", **kw)
    torch.testing.assert_close(txt.image_embed, txt.text_embed)
    ar = pipe.generate(CAPTIONS, prior="ar", **kw)
    dif = pipe.generate(CAPTIONS, prior="diffusion", **kw)
    assert ar.prior == "ar" and not torch.equal(ar.image_embed, dif.image_embed)
    assert len({tuple(g.images[16].flatten()[:20].tolist()) for g in (cap, txt, ar, dif)}) == 4
    # each stage draws from its own stream: one seed gives every conditioning and prior the same x_T (paired)
    for g in (cap, txt, ar):
        assert torch.equal(g.noise, dif.noise)


def test_prior_candidates_reach_the_diffusion_prior(pipe):
    kw = dict(seed=0, decoder_steps=2, size=16)
    best3 = pipe.generate(CAPTIONS, prior_candidates=3, **kw)
    text = pipe.encode_text(CAPTIONS)
    direct = pipe.priors["diffusion"].sample(text["text_embed"], text["text_tokens"], text["text_mask"],
                                             num_candidates=3, generator=unclip.stage_generators(0)["prior"])
    torch.testing.assert_close(best3.image_embed, direct)          # the prior draws from its own stream
    one = pipe.generate(CAPTIONS, prior_candidates=1, **kw)
    assert not torch.equal(one.image_embed, best3.image_embed)
    assert torch.equal(one.noise, best3.noise)     # more candidates use more prior draws, never another x_T
    with pytest.raises(ConfigError, match="for the diffusion prior: the AR prior draws one z_i"):
        pipe.generate(CAPTIONS, prior="ar", prior_candidates=2, **kw)
    with pytest.raises(ConfigError, match="num_candidates = 0 must be an int >= 1"):
        pipe.generate(CAPTIONS, prior_candidates=0, **kw)


def test_decoder_text_guidance_reaches_the_decoder(pipe):
    kw = dict(seed=0, decoder_steps=2, size=16, decoder_guidance=3.0)
    one = pipe.generate(CAPTIONS, **kw)
    same = pipe.generate(CAPTIONS, decoder_text_guidance=3.0, **kw)     # equal scales: the one-scale guidance
    torch.testing.assert_close(same.images[16], one.images[16], atol=1e-4, rtol=0)
    apart = pipe.generate(CAPTIONS, decoder_text_guidance=0.0, **kw)     # the caption ignored: z_i alone
    z_only = pipe.decode(one.image_embed, None, noise=one.noise, steps=2, guidance_scale=3.0,
                         generator=unclip.stage_generators(0)["decoder"])
    torch.testing.assert_close(apart.images[pipe.base], z_only, atol=1e-4, rtol=0)
    assert torch.equal(apart.noise, one.noise) and torch.equal(apart.image_embed, one.image_embed)


def test_upsampler_chunks_do_not_change_the_images(pipe):
    captions = ["a red circle", "a blue star", "a green square"]
    whole = pipe.generate(captions, seed=4, size="x16").final
    saved = pipe.chunk_pixels
    try:
        pipe.chunk_pixels = 1                       # every upsampler call takes one image
        one_by_one = pipe.generate(captions, seed=4, size="x16").final
    finally:
        pipe.chunk_pixels = saved
    # the x_T of every image is drawn before the chunks: only the kernels' rounding may differ
    assert torch.allclose(one_by_one, whole, atol=1e-4), float((one_by_one - whole).abs().max())


def test_bad_requests_are_refused(pipe):
    with pytest.raises(ConfigError, match="this stack makes 16, 64, 256 px"):
        pipe.generate(CAPTIONS, size=128)
    with pytest.raises(ConfigError, match="at least 1 image per caption"):
        pipe.generate(CAPTIONS, n_per_caption=0)
    with pytest.raises(ConfigError, match="unknown prior 'gan'; valid priors: diffusion, ar"):
        pipe.generate(CAPTIONS, prior="gan")
    with pytest.raises(ConfigError, match="unknown conditioning"):
        pipe.generate(CAPTIONS, conditioning="image")
    with pytest.raises(DataError, match="empty caption"):
        pipe.generate([""])
    with pytest.raises(CaptionTooLong, match="has 32 tokens but the text encoder reads at most 24"):
        pipe.generate(["a red circle " * 10])
    with pytest.warns(UserWarning, match="names no colour or shape of the toy world.*colours red"):
        pipe.generate(["a photo of a dog"], size=16, decoder_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.check_captions(CAPTIONS)                                         # known words: no warning


# -- the manipulations ------------------------------------------------------------------------------

def test_encode_and_variations(pipe):
    x = pipe.generate(CAPTIONS, seed=3, decoder_steps=4, size=16).images[16]
    z, x_t = pipe.encode(x, steps=4)
    assert z.shape == (2, 16) and x_t.shape == x.shape
    # the inversion is unguided by default (latent_guidance), whatever scale the decoder samples with
    assert pipe.latent_guidance == 1.0 and pipe.decoder.cfg.guidance_scale != 1.0
    torch.testing.assert_close(x_t, pipe.decoder.invert(x, z, steps=4, guidance_scale=1.0))
    assert not torch.allclose(x_t, pipe.decoder.invert(x, z, steps=4))         # the decoder's own scale differs
    v0 = pipe.variations(latents=(z, x_t), eta=0.0, n=2, steps=4)
    assert v0.shape == (2, 2, 3, 16, 16)
    assert torch.equal(v0[:, 0], v0[:, 1])                                    # eta = 0: deterministic
    torch.testing.assert_close(v0[:, 0], pipe.decoder.sample(image_embed=z, noise=x_t, steps=4, guidance_scale=1.0))
    v1 = pipe.variations(latents=(z, x_t), eta=1.0, n=2, steps=4, seed=0)
    assert not torch.equal(v1[:, 0], v1[:, 1])                                # eta > 0: they vary
    assert torch.equal(v1, pipe.variations(latents=(z, x_t), eta=1.0, n=2, steps=4, seed=0))
    with pytest.raises(ConfigError, match="eta = 1.5"):
        pipe.variations(x, eta=1.5)
    with pytest.raises(DataError, match="decoder works at 16x16"):
        pipe.encode(torch.zeros(1, 3, 64, 64))


def test_interpolate_and_text_diff(pipe):
    x = pipe.generate(CAPTIONS, seed=4, decoder_steps=4, size=16).images[16]
    rows, zs = pipe.interpolate(x[0], x[1], [0.0, 0.5, 1.0], noise="slerp", steps=4)
    assert rows.shape == (3, 3, 16, 16) and zs.shape == (3, 16)
    z, x_t = pipe.encode(x, steps=4)
    torch.testing.assert_close(zs[0], z[0])
    torch.testing.assert_close(rows[0], pipe.decoder.sample(image_embed=z[:1], noise=x_t[:1], steps=4,
                                                            guidance_scale=1.0)[0])
    fixed, _ = pipe.interpolate(x[0], x[1], [0.0, 1.0], noise="fixed", steps=4)
    assert not torch.equal(fixed[0], rows[0])                                 # a random x_T, not the inversion
    with pytest.raises(ConfigError, match="'fixed'"):
        pipe.interpolate(x[0], x[1], [0.5], noise="mean")
    edits = pipe.text_diff(x, "a red circle", "a blue circle", [0.0, 0.3], steps=4)
    assert edits.shape == (2, 2, 3, 16, 16)
    torch.testing.assert_close(edits[0], pipe.decoder.sample(image_embed=z, noise=x_t, steps=4, guidance_scale=1.0))
    assert not torch.equal(edits[1], edits[0])
    with pytest.raises(DataError, match="same CLIP text embedding"):
        pipe.text_diff(x, "a red circle", "a red circle", [0.3], steps=4)


# -- loading --------------------------------------------------------------------------------------

def test_load_pipeline_names_what_is_missing(trained_dir, tmp_path):
    with pytest.raises(ArtifactError, match="no trained unCLIP in .*python -m unclip_mini course --preset smoke"):
        stages.load_pipeline(stages.Run("smoke", run_dir=tmp_path / "empty", device="cpu"))
    partial = tmp_path / "partial"
    shutil.copytree(trained_dir, partial)
    shutil.rmtree(partial / "upsampler2")
    with pytest.raises(ArtifactError, match="no trained upsampler2 stage.*python -m unclip_mini train upsampler2"):
        stages.load_pipeline(stages.Run("smoke", run_dir=partial, device="cpu"))
    two = stages.load_pipeline(stages.Run("smoke", run_dir=partial, device="cpu"), upsamplers=1, priors=("ar",))
    assert two.sizes == (16, 64) and list(two.priors) == ["ar"]
    with pytest.raises(ConfigError, match="this stack has no 'diffusion' prior"):
        two.generate(CAPTIONS, prior="diffusion", size="x4")


def test_stage_generators_are_separate_seeded_streams():
    a, b, c = unclip.stage_generators(0), unclip.stage_generators(0), unclip.stage_generators(1)
    assert list(a) == list(unclip.STREAMS)
    draws = {name: torch.randn(4, generator=g) for name, g in a.items()}
    for name, g in b.items():
        assert torch.equal(torch.randn(4, generator=g), draws[name]), f"{name}: one seed, two streams"
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(unclip.STREAMS)   # no two stages alike
    assert not torch.equal(torch.randn(4, generator=c["decoder"]), draws["decoder"])


def test_stage_generators_follow_the_number_of_upsamplers():
    two, three, none = (unclip.stage_generators(5, n) for n in (2, 3, 0))
    assert list(three) == ["prior", "decoder", "upsampler1", "upsampler2", "upsampler3"]
    assert list(none) == ["prior", "decoder"]
    for name, g in two.items():          # the stages two stacks share draw the same numbers in both
        x = torch.randn(3, generator=g)
        assert torch.equal(torch.randn(3, generator=three[name]), x), name
        if name in none:
            assert torch.equal(torch.randn(3, generator=none[name]), x), name
