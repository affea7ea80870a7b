"""Tests for unclip_mini.gaussian_diffusion: analytic checks of q and p, samplers, losses, respacing, guidance."""
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from unclip_mini import gaussian_diffusion as gd
from unclip_mini.errors import ConfigError, DataError

SHAPE = (4, 3, 8, 8)


def make(timesteps=100, schedule="cosine", mean_type="eps", var_type="fixed_small", loss_type="mse",
         respacing=None):
    cfg = gd.DiffusionConfig(timesteps=timesteps, schedule=schedule, mean_type=mean_type, var_type=var_type,
                             loss_type=loss_type)
    return gd.create_diffusion(cfg, respacing)


def known_x0(shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 1.8 - 0.9  # inside [-1, 1], so clipping never acts


def oracle(base, x0, mean_type="eps", var_values=None):
    """A model that knows x0: it predicts the true noise (or x0, or v) of any x_t under `base`'s schedule.

    `t` is an ORIGINAL step index of `base`, so a respaced chain only works if it maps its steps back.
    """
    def model(x_t, t):
        abar = gd.extract(base.alphas_cumprod, t, x_t.shape)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        out = {"eps": eps, "x0": x0.expand_as(x_t), "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[mean_type]
        return out if var_values is None else torch.cat([out, var_values.expand_as(out)], dim=1)
    return model


# ---------------------------------------------------------------------------------------------
# schedules and the forward process
# ---------------------------------------------------------------------------------------------

def test_cosine_schedule_is_monotone_clipped_and_float32():
    d = make(1000)
    ac = d.alphas_cumprod
    assert ac.dtype == torch.float32 and d.betas.dtype == torch.float32
    assert (ac[1:] < ac[:-1]).all() and ac[0] < 1 and ac[-1] > 0
    assert (d.betas > 0).all() and (d.betas <= 0.999).all()
    assert d.betas[-1].item() == pytest.approx(0.999)  # the last beta is 1 before the clip
    betas = gd.get_named_beta_schedule("cosine", 1000)
    assert betas.dtype == np.float64
    # Improved DDPM: alpha-bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert np.cumprod(1 - betas)[499] == pytest.approx(f(500) / f(0), rel=1e-12)


def test_linear_schedule_endpoints_scale_with_steps():
    for steps in (1000, 250):
        betas = gd.get_named_beta_schedule("linear", steps)
        scale = 1000 / steps
        assert betas[0] == pytest.approx(1e-4 * scale) and betas[-1] == pytest.approx(0.02 * scale)
        assert (np.diff(betas) > 0).all()
    with pytest.raises(ConfigError, match="'cosine', 'linear'"):
        gd.get_named_beta_schedule("quadratic", 10)


def test_q_sample_moments_match_closed_form():
    d = make(100)
    x0 = torch.tensor([[0.9, -0.5, 0.0, 0.3]]).expand(20000, 4)
    g = torch.Generator().manual_seed(1)
    for step in (0, 30, 99):
        t = torch.full((20000,), step, dtype=torch.long)
        xt = d.q_sample(x0, t, noise=torch.randn(x0.shape, generator=g))
        abar = d.alphas_cumprod_f64[step]
        mean, var, log_var = d.q_mean_variance(x0[:1], t[:1])
        assert_close(mean[0], math.sqrt(abar) * x0[0])
        assert var.item() == pytest.approx(1 - abar, rel=1e-5) and log_var.item() == pytest.approx(math.log(1 - abar))
        std_err = math.sqrt((1 - abar) / 20000)
        assert (xt.mean(0) - math.sqrt(abar) * x0[0]).abs().max() < 5 * std_err
        assert (xt.var(0) / (1 - abar) - 1).abs().max() < 0.05  # the variance's relative std is 1%


def test_posterior_matches_direct_bayes_in_float64():
    """q(x_{t-1}|x_t,x_0) is proportional to q(x_t|x_{t-1}) q(x_{t-1}|x_0): a product of two Gaussians."""
    d = make(100)
    betas = gd.get_named_beta_schedule("cosine", 100)
    ac = np.cumprod(1 - betas)
    x0, xt = known_x0((2, 3, 4, 4), 1).double(), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for step in (1, 2, 10, 50, 98, 99):
        a_t, ac_prev = 1 - betas[step], ac[step - 1]
        # as a density of x_{t-1}: q(x_t|x_{t-1}) = N(x_t / sqrt(a_t), beta_t / a_t), q(x_{t-1}|x_0) = N(...)
        prec = a_t / betas[step] + 1 / (1 - ac_prev)
        mean = (math.sqrt(a_t) / betas[step] * xt + math.sqrt(ac_prev) / (1 - ac_prev) * x0) / prec
        t = torch.full((2,), step, dtype=torch.long)
        m, v, log_v = d.q_posterior_mean_variance(x0.float(), xt.float(), t)
        assert_close(m.double(), mean, rtol=1e-5, atol=1e-5)
        assert v[0].item() == pytest.approx(1 / prec, rel=1e-5)
        assert log_v[0].item() == pytest.approx(-math.log(prec), rel=1e-5)
    # t = 0: the posterior is the point mass at x0 (its log variance is clipped to t = 1's)
    m, v, _ = d.q_posterior_mean_variance(x0.float(), xt.float(), torch.zeros(2, dtype=torch.long))
    assert_close(m, x0.float()) and v.abs().max().item() == 0.0


def test_parameterisations_round_trip():
    d = make(100)
    x0, eps = known_x0(), torch.randn(SHAPE)
    t = torch.tensor([0, 10, 60, 99])
    xt = d.q_sample(x0, t, eps)
    v = d.predict_v(x0, t, eps)
    assert_close(d.predict_xstart_from_eps(xt, t, eps), x0, atol=2e-3, rtol=0)  # 1/sqrt(abar) amplifies at t=99
    assert_close(d.predict_eps_from_xstart(xt, t, x0), eps, atol=1e-4, rtol=1e-4)
    assert_close(d.predict_xstart_from_v(xt, t, v), x0, atol=1e-5, rtol=1e-5)
    assert_close(d.predict_eps_from_v(xt, t, v), eps, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# samplers with an oracle model
# ---------------------------------------------------------------------------------------------

def test_oracle_recovers_x0_with_ddpm_and_all_parameterisations_agree():
    x0 = known_x0()
    for mean_type in ("eps", "x0", "v"):
        d = make(100, mean_type=mean_type)
        g = torch.Generator().manual_seed(0)
        sample = d.p_sample_loop(oracle(d, x0, mean_type), SHAPE, generator=g)
        assert (sample - x0).abs().max() < 1e-4, mean_type
    # one step of p: the same mean from every parameterisation of the same oracle
    xt, t = torch.randn(SHAPE), torch.tensor([1, 20, 70, 99])
    base = make(100)
    means = [make(100, mean_type=m).p_mean_variance(oracle(base, x0, m), xt, t)["mean"] for m in ("eps", "x0", "v")]
    assert_close(means[1], means[0], atol=2e-4, rtol=0) and assert_close(means[2], means[0], atol=2e-4, rtol=0)


@pytest.mark.parametrize("steps,respacing,atol", [(1000, None, 1e-4), (1000, "ddim50", 1e-5), (10, None, 1e-5)])
def test_ddim_inversion_round_trip_with_oracle(steps, respacing, atol):
    base = make(steps)
    d = base if respacing is None else gd.respace(base, respacing)
    x0 = known_x0()
    model = oracle(base, x0)  # fed the original step indices through SpacedDiffusion's map
    x_T = d.ddim_reverse_sample_loop(model, x0)
    # the oracle's ODE path is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps0, eps0 the noise it reads off x0
    # at t = 0; inversion must stop on the chain's noisiest level, where sampling starts (not one past it:
    # alpha-bar = 0 would give eps0 alone, which the 10-step chain, abar_9 = 2.4e-5, tells apart)
    eps0 = model(x0, torch.zeros(SHAPE[0], dtype=torch.long))
    abar = d.alphas_cumprod[-1]
    assert_close(x_T, abar.sqrt() * x0 + (1 - abar).sqrt() * eps0, atol=atol, rtol=0)  # 999 steps: rounding
    x0_again = d.ddim_sample_loop(model, SHAPE, noise=x_T)
    err = (x0_again - x0).abs().max().item()
    assert err < 1e-5, err  # float32 rounding only


def test_ddim_inversion_of_an_x0_model_carries_the_image_up_noise_free():
    """An x0 model's implied eps at the chain's first level is its error over sqrt(1 - abar_0) ~ 0.016 here:
    inversion takes eps = 0 there, so a predictor 0.02 off everywhere gives x_T = sqrt(abar_T) x0_hat."""
    d = make(100, mean_type="x0", respacing="ddim10")
    x0 = known_x0()
    x0_hat = (x0 + 0.02 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    model = lambda x, t: x0_hat.clone()  # the same prediction at every level, whatever x_t
    first = d.ddim_reverse_sample(model, x0, torch.zeros(SHAPE[0], dtype=torch.long))["sample"]
    assert_close(first, d.alphas_cumprod[1].sqrt() * x0_hat)
    implied = d.predict_eps_from_xstart(x0, torch.zeros(SHAPE[0], dtype=torch.long), x0_hat)
    assert implied.std() > 0.5  # what the first step would carry up without the rule
    x_T = d.ddim_reverse_sample_loop(model, x0)
    assert_close(x_T, d.alphas_cumprod[-1].sqrt() * x0_hat)
    eps_model = make(100, respacing="ddim10")  # an eps model's first step keeps its own eps
    eps = 0.3 * torch.ones(SHAPE)
    out = eps_model.ddim_reverse_sample(lambda x, t: eps, x0, torch.zeros(SHAPE[0], dtype=torch.long))["sample"]
    ab0, ab1 = eps_model.alphas_cumprod[0], eps_model.alphas_cumprod[1]
    x0_eps = ((x0 - (1 - ab0).sqrt() * eps) / ab0.sqrt()).clamp(-1, 1)
    assert_close(out, ab1.sqrt() * x0_eps + (1 - ab1).sqrt() * eps)


def test_ddim_inversion_takes_one_step_fewer_than_the_chain():
    d = make(10)
    calls = []
    d.ddim_reverse_sample_loop(lambda x, t: calls.append(int(t[0])) or torch.zeros_like(x), known_x0())
    assert calls == list(range(9)), calls  # levels 0 .. 8 are carried up to 1 .. 9


def test_ddim_inversion_of_gaussian_data_reaches_scaled_data():
    """For data N(0, s^2 I) the exact eps-predictor is sqrt(1 - abar) x_t / (abar s^2 + 1 - abar), and the
    deterministic (probability-flow) map from data to noise is x_T = x_0 / s: DDIM inversion must find it."""
    base, s = make(1000), 0.5

    def model(x, t):
        abar = gd.extract(base.alphas_cumprod, t, x.shape)
        return (1 - abar).sqrt() * x / (abar * s ** 2 + 1 - abar)

    x0 = s * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x_T = base.ddim_reverse_sample_loop(model, x0, clip_denoised=False)
    assert (x_T - x0 / s).abs().max() < 0.02  # measured 6.6e-3: the ODE's discretisation error
    x0_again = base.ddim_sample_loop(model, SHAPE, noise=x_T, clip_denoised=False)
    assert (x0_again - x0).abs().max() < 0.02  # measured 6.6e-3


def test_ddim_eta0_is_deterministic_and_eta_positive_follows_the_generator():
    d = make(100, respacing="ddim10")
    x0, noise = known_x0(), torch.randn(SHAPE)
    model = lambda x, t: 0.5 * x + 0.1 * t.float().reshape(-1, 1, 1, 1) / 100  # an arbitrary eps net
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    a = d.ddim_sample_loop(model, SHAPE, noise=noise)
    assert torch.equal(state, torch.random.get_rng_state())  # eta = 0 draws no random numbers at all
    torch.manual_seed(2)
    assert torch.equal(a, d.ddim_sample_loop(model, SHAPE, noise=noise))
    run = lambda seed: d.ddim_sample_loop(model, SHAPE, eta=1.0, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    ddpm = lambda seed: d.p_sample_loop(oracle(make(100), x0), SHAPE, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(ddpm(5), ddpm(5))
    steps = list(d.ddim_sample_loop_progressive(model, SHAPE, noise=noise))
    assert len(steps) == 10 and torch.equal(steps[-1]["sample"], a)


def test_vectors_with_learned_range_sample_with_the_right_shape():
    d = make(100, var_type="learned_range", loss_type="hybrid", respacing="10")
    model = lambda x, t: torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)  # [B, 2D]
    out = d.p_sample_loop(model, (3, 16), clip_denoised=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    with pytest.raises(DataError, match="2\\*16"):
        d.p_sample_loop(lambda x, t: x, (3, 16))


# ---------------------------------------------------------------------------------------------
# training losses
# ---------------------------------------------------------------------------------------------

def test_training_losses_shapes_and_oracle_gets_zero_mse():
    x0 = known_x0()
    for mean_type in ("eps", "x0", "v"):
        d = make(100, mean_type=mean_type)
        t = d.sample_timesteps(4, torch.Generator().manual_seed(0))
        terms = d.training_losses(oracle(d, x0, mean_type), x0, t, noise=torch.randn(SHAPE))
        assert set(terms) == {"loss", "mse"} and terms["loss"].shape == (4,)
        assert terms["mse"].max() < 1e-8, mean_type
        bad = d.training_losses(lambda x, t: torch.zeros_like(x), x0, t)
        assert bad["mse"].min() > 1e-2


def test_hybrid_loss_has_finite_vb_zero_at_the_true_posterior():
    d = make(100, var_type="learned_range", loss_type="hybrid")
    x0 = known_x0()
    t = torch.tensor([0, 1, 50, 99])
    # var_values = -1 selects the posterior variance: with the true mean the KL terms vanish
    model, noise = oracle(d, x0, "eps", torch.full((1,), -1.0)), torch.randn(SHAPE)
    terms = d.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"} and torch.isfinite(terms["vb"]).all()
    # one sampled VLB term weighs T / 1000 (Improved DDPM's lambda = 0.001 on the sum over T terms)
    vb = d._vb_terms_bpd(model, x0, d.q_sample(x0, t, noise), t, clip_denoised=False)["output"]
    assert_close(terms["vb"], vb * 100 / 1000)
    assert terms["vb"][1:].abs().max() < 1e-4
    assert terms["vb"][0] > 0  # t = 0: the discretized decoder NLL, -log2 of a bin probability
    off = d.training_losses(oracle(d, x0, "eps", torch.full((1,), 1.0)), x0, t)  # beta_t instead
    assert off["vb"][1] > 1e-3  # at t = 1 beta_t and the posterior variance differ most
    assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_vlb_gradient_reaches_only_the_variance_part():
    d = make(100, var_type="learned_range", loss_type="hybrid")
    x0 = known_x0()
    out = torch.randn(4, 6, 8, 8, requires_grad=True)  # [B, 2C]: mean part, variance part
    terms = d.training_losses(lambda x, t: out, x0, torch.tensor([0, 5, 50, 99]))
    terms["vb"].sum().backward()
    assert out.grad[:, :3].abs().max() == 0 and out.grad[:, 3:].abs().max() > 0
    out.grad = None
    terms = d.training_losses(lambda x, t: out, x0, torch.tensor([0, 5, 50, 99]))
    terms["mse"].sum().backward()
    assert out.grad[:, 3:].abs().max() == 0 and out.grad[:, :3].abs().max() > 0


# ---------------------------------------------------------------------------------------------
# respacing
# ---------------------------------------------------------------------------------------------

def test_space_timesteps_matches_adm_examples():
    assert gd.space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    steps = gd.space_timesteps(300, [10, 15, 20])
    assert len(steps) == 45 and min(steps) == 0 and max(steps) == 299
    assert sorted(s for s in steps if s < 100) == list(range(0, 100, 11))
    assert len([s for s in steps if 100 <= s < 200]) == 15
    assert gd.space_timesteps(300, "10,15,20") == steps
    assert gd.space_timesteps(100, 100) == set(range(100))
    with pytest.raises(ConfigError, match="between 1 and 100"):
        gd.space_timesteps(300, [10, 150, 20])
    with pytest.raises(ConfigError, match="exactly 7"):
        gd.space_timesteps(10, "ddim7")


def test_spaced_chain_keeps_alphas_cumprod_and_feeds_original_steps():
    base = make(1000)
    d = gd.respace(base, "ddim50")
    kept = sorted(gd.space_timesteps(1000, "ddim50"))
    assert d.num_timesteps == 50 and d.timestep_map.tolist() == kept
    assert_close(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-6, atol=0)
    seen = []
    model = lambda x, t: (seen.append(t.tolist()), torch.zeros_like(x))[1]
    d.ddim_sample_loop(model, (2, 5), clip_denoised=False)
    assert [s[0] for s in seen] == kept[::-1] and all(s[0] == s[1] for s in seen)
    # respacing a respaced chain composes the maps
    d2 = gd.respace(d, 5)
    assert d2.timestep_map.tolist() == [kept[i] for i in sorted(gd.space_timesteps(50, 5))]
    assert_close(d2.alphas_cumprod, base.alphas_cumprod[d2.timestep_map], rtol=1e-6, atol=0)
    # rescale_timesteps feeds t * 1000 / original steps
    r = gd.create_diffusion(gd.DiffusionConfig(timesteps=200, rescale_timesteps=True), "ddim4")
    seen.clear()
    r.ddim_sample_loop(model, (1, 5), clip_denoised=False)
    assert [s[0] for s in seen] == [750.0, 500.0, 250.0, 0.0]


# ---------------------------------------------------------------------------------------------
# classifier-free guidance
# ---------------------------------------------------------------------------------------------

def test_guidance_scale_one_is_conditional_and_zero_unconditional():
    net = lambda x, t, y=None, mask=None: torch.cat([x * y.reshape(-1, 1, 1, 1), -x + y.reshape(-1, 1, 1, 1)], dim=1)
    x, t = torch.randn(SHAPE), torch.tensor([1, 2, 3, 4])
    y_cond, y_null = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4)
    kwargs = dict(y=torch.cat([y_cond, y_null]), mask=None)
    cond, uncond = net(x, t, y=y_cond), net(x, t, y=y_null)
    assert_close(gd.classifier_free_guidance(net, 1.0, guided_channels=3)(x, t, **kwargs), cond)
    assert_close(gd.classifier_free_guidance(net, 0.0, guided_channels=3)(x, t, **kwargs),
                 torch.cat([uncond[:, :3], cond[:, 3:]], dim=1))  # the variance part stays conditional
    out = gd.classifier_free_guidance(net, 3.0)(x, t, **kwargs)  # by default the image's channels: x has 3
    assert_close(out, torch.cat([(uncond + 3.0 * (cond - uncond))[:, :3], cond[:, 3:]], dim=1))
    out = gd.classifier_free_guidance(net, 3.0, guided_channels=6)(x, t, **kwargs)
    assert_close(out, uncond + 3.0 * (cond - uncond))
    with pytest.raises(DataError, match="null"):
        gd.classifier_free_guidance(net, 3.0)(x, t, y=y_cond)


def test_two_scales_guide_nested_conditions_apart():
    # rows: [both conditions; the first only; none]; the net's output is affine in its condition
    net = lambda x, t, a=None, b=None: torch.cat([x * a.reshape(-1, 1, 1, 1) + b.reshape(-1, 1, 1, 1), x], dim=1)
    x, t = torch.randn(SHAPE), torch.tensor([1, 2, 3, 4])
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, -1.0, 2.0, 0.0])
    zero = torch.zeros(4)
    kwargs = dict(a=torch.cat([a, a, zero]), b=torch.cat([b, zero, zero]))
    h0, h1, h2 = net(x, t, a, b)[:, :3], net(x, t, a, zero)[:, :3], net(x, t, zero, zero)[:, :3]
    out = gd.classifier_free_guidance(net, (5.0, 2.0))(x, t, **kwargs)
    assert_close(out[:, :3], h2 + 2.0 * (h1 - h2) + 5.0 * (h0 - h1))
    assert_close(out[:, 3:], x)                           # the unguided channels come from the full condition
    # equal scales are one scale over the outer pair: h2 + s (h0 - h2)
    assert_close(gd.classifier_free_guidance(net, (3.0, 3.0))(x, t, **kwargs)[:, :3], h2 + 3.0 * (h0 - h2))
    with pytest.raises(DataError, match="2 scale"):      # the doubled batch of one scale is too small
        gd.classifier_free_guidance(net, (3.0, 3.0))(x, t, a=torch.cat([a, a]), b=torch.cat([b, b]))
    with pytest.raises(ConfigError, match="empty"):
        gd.classifier_free_guidance(net, ())


def test_guidance_is_the_same_on_eps_x0_or_v():
    x0_cond, x0_uncond = known_x0(seed=1), known_x0(seed=2)
    base = make(100)
    net = lambda mean_type: (lambda x, t, c: torch.where(
        c.reshape(-1, 1, 1, 1) > 0, oracle(base, x0_cond.repeat(2, 1, 1, 1), mean_type)(x, t),
        oracle(base, x0_uncond.repeat(2, 1, 1, 1), mean_type)(x, t)))
    c = torch.cat([torch.ones(4), torch.zeros(4)])
    xt, t = torch.randn(SHAPE), torch.tensor([3, 30, 60, 90])
    preds = [make(100, mean_type=m).p_mean_variance(gd.classifier_free_guidance(net(m), 4.0), xt, t,
                                                    clip_denoised=False, model_kwargs=dict(c=c))["pred_xstart"]
             for m in ("eps", "x0", "v")]
    assert_close(preds[0], x0_uncond + 4.0 * (x0_cond - x0_uncond), atol=5e-3, rtol=0)
    assert_close(preds[1], preds[0], atol=5e-3, rtol=0) and assert_close(preds[2], preds[0], atol=5e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def test_presets_build_and_validation_names_the_fix():
    for name in ("smoke", "toy", "small", "paper"):
        cfg = gd.DiffusionConfig.preset(name)
        assert gd.DiffusionConfig.from_dict(cfg.to_dict()) == cfg
        assert gd.create_diffusion(cfg).num_timesteps == cfg.timesteps
    with pytest.raises(ConfigError, match="'cosine', 'linear'"):
        gd.DiffusionConfig(schedule="quadratic")
    with pytest.raises(ConfigError, match="learned_range"):
        gd.DiffusionConfig(loss_type="hybrid")
    with pytest.raises(ConfigError, match="hybrid"):
        gd.DiffusionConfig(var_type="learned_range")
    with pytest.raises(ConfigError, match="'eps', 'x0', 'v'"):
        gd.DiffusionConfig(mean_type="score")
    with pytest.raises(ConfigError, match="more than 20"):
        gd.DiffusionConfig(timesteps=10, schedule="linear")
    with pytest.raises(ConfigError, match="DiffusionConfig"):
        gd.create_diffusion({"timesteps": 10})


def test_timestep_sampling_uniform_and_logit_normal():
    n, T = 20_000, 1000
    uni = make(T).sample_timesteps(n, torch.Generator().manual_seed(0))
    cfg = gd.DiffusionConfig(timestep_sampling="logit_normal")
    ln = gd.create_diffusion(cfg)
    t = ln.sample_timesteps(n, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < T
    # sigmoid(u) < 0.1 for u < -2.197: 1.4% of draws, against 10% uniform; the median sits at T / 2
    assert abs((uni < T // 10).float().mean().item() - 0.10) < 0.01
    assert abs((t < T // 10).float().mean().item() - 0.014) < 0.004
    assert abs(t.float().median().item() - T / 2) < 15
    assert torch.equal(t, ln.sample_timesteps(n, torch.Generator().manual_seed(0)))      # same generator, same t
    spaced = gd.create_diffusion(cfg, "ddim10")
    assert spaced.timestep_sampling == "logit_normal"
    with pytest.raises(ConfigError, match="'uniform', 'logit_normal'"):
        gd.DiffusionConfig(timestep_sampling="beta")


def test_timestep_sampling_left_out_of_the_dict_at_its_default():
    # stage ids hash the config dicts: a field added later must not change the ids of stages at its default
    assert "timestep_sampling" not in gd.DiffusionConfig().to_dict()
    cfg = gd.DiffusionConfig(timestep_sampling="logit_normal")
    assert cfg.to_dict()["timestep_sampling"] == "logit_normal"
    assert gd.DiffusionConfig.from_dict(cfg.to_dict()) == cfg
    assert gd.DiffusionConfig.from_dict(gd.DiffusionConfig().to_dict()) == gd.DiffusionConfig()
