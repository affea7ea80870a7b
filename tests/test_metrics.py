"""Tests of unclip_mini/metrics.py: analytic cases of FD, CLIP score, PSNR, SSIM; embedding metrics of the priors."""
import math

import pytest
import torch

from unclip_mini import metrics
from unclip_mini.errors import DataError

torch.set_num_threads(1)  # tiny models and a shared machine: extra threads only wait


def feats(n=400, d=6, seed=0):
    """Correlated features [n, d]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)


# ---- Frechet distance --------------------------------------------------------------------------

def test_fd_of_identical_sets_is_zero():
    a = feats()
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fd_of_shifted_set_is_squared_shift():
    a = feats()
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-6)


def test_fd_of_scaled_set_is_analytic():
    # b = 2a: |mu_a - 2 mu_a|^2 + tr(C + 4C - 2 (C^1/2 4C C^1/2)^1/2) = |mu_a|^2 + tr(C)
    a = feats() + 1.0
    want = a.mean(0).pow(2).sum() + torch.trace(torch.cov(a.T))
    assert metrics.frechet_distance(a, 2 * a) == pytest.approx(float(want), rel=1e-6)
    assert metrics.frechet_distance(2 * a, a) == pytest.approx(float(want), rel=1e-6)  # symmetric


def test_fd_of_gaussians_with_diagonal_covariances():
    # diagonal C_a, C_b: sum_i (sqrt(a_i) - sqrt(b_i))^2 for the trace term
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    got = metrics.frechet_distance(x * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), x)
    assert got == pytest.approx((0 ** 2 + 1 ** 2 + 2 ** 2), rel=0.05)  # whitening only approximates C = I


def test_fd_errors():
    with pytest.raises(DataError, match="same CLIP"):
        metrics.frechet_distance(feats(d=4), feats(d=6))
    with pytest.raises(DataError, match="N >= 2"):
        metrics.frechet_distance(feats(n=1), feats())


# ---- CLIP score, PSNR, SSIM --------------------------------------------------------------------

def test_clip_score():
    z = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    assert metrics.clip_score(z, z) == pytest.approx(1.0, abs=1e-6)
    assert metrics.clip_score(z, 3 * z, scale=100) == pytest.approx(100.0, abs=1e-4)
    e = torch.eye(4)
    assert metrics.clip_score(e[:2], e[2:]) == pytest.approx(0.0)
    with pytest.raises(DataError, match="one caption per image"):
        metrics.clip_score(z, z[:3])


def test_psnr_of_known_mse():
    a = torch.zeros(2, 3, 8, 8)
    b = a + 0.1                                     # MSE 0.01 in [-1, 1] images: range 2
    torch.testing.assert_close(metrics.psnr(a, b), torch.full((2,), 10 * math.log10(4 / 0.01)))
    u = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    assert float(metrics.psnr(u, u + 5)) == pytest.approx(10 * math.log10(255 ** 2 / 25), rel=1e-5)
    assert math.isinf(float(metrics.psnr(a, a)[0]))


def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g) * 2 - 1
    torch.testing.assert_close(metrics.ssim(x, x), torch.ones(2))
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    s = metrics.ssim(x, noisy)
    assert (s < 0.9).all() and (s > 0).all()
    torch.testing.assert_close(s, metrics.ssim(noisy, x))                       # symmetric
    assert (metrics.ssim(x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)) > s).all()
    w = metrics.gaussian_window()
    assert w.shape == (11, 11) and float(w.sum()) == pytest.approx(1.0)
    with pytest.raises(DataError, match="window"):
        metrics.ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(DataError, match="same shape"):
        metrics.psnr(x, x[:1])


def test_high_frequency_band_outside_the_inputs_nyquist():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    low = torch.nn.functional.avg_pool2d(truth, 4)                                  # an 8-px input
    m = metrics.high_frequency(truth, truth, 8)
    assert m["hf_ratio"] == pytest.approx(1.0) and m["hf_corr"] == pytest.approx(1.0)
    # a pure interpolation of the input is near empty in the band (bilinear leaks a little above Nyquist)
    up = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
    assert metrics.high_frequency(up, truth, 8)["hf_ratio"] < 0.1
    # a frequency below the input's Nyquist (8 / 2 = 4 cycles per frame) is outside the band: no energy
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    wave = lambda k: torch.cos(2 * math.pi * k * xx / 32).expand(1, 3, 32, 32)
    assert metrics.high_frequency(up[:1] * 0 + wave(3), truth[:1], 8)["hf_ratio"] == pytest.approx(0.0, abs=1e-9)
    # twice the truth's detail: ratio 4 (energy), correlation still 1; the detail negated: correlation -1
    assert metrics.high_frequency(2 * truth, truth, 8)["hf_ratio"] == pytest.approx(4.0)
    assert metrics.high_frequency(2 * truth, truth, 8)["hf_corr"] == pytest.approx(1.0)
    hf = wave(9)
    assert metrics.high_frequency(-hf, hf, 8)["hf_corr"] == pytest.approx(-1.0)
    # independent noise has the energy but not the place
    noise = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    m = metrics.high_frequency(noise, truth, 8)
    assert 0.5 < m["hf_ratio"] < 2 and abs(m["hf_corr"]) < 0.1
    with pytest.raises(DataError, match="low_res_side"):
        metrics.high_frequency(truth, truth, 32)
    with pytest.raises(DataError, match="no energy above"):
        metrics.high_frequency(truth[:1], wave(2), 8)


def test_high_frequency_spectrum_distance_ignores_where_the_detail_is():
    g = torch.Generator().manual_seed(1)
    truth = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert metrics.high_frequency(truth, truth, 8)["hf_spectrum_db"] == pytest.approx(0.0, abs=1e-5)
    # twice the detail: 10 log10(4) dB at every ring
    assert metrics.high_frequency(2 * truth, truth, 8)["hf_spectrum_db"] == pytest.approx(10 * math.log10(4), rel=1e-4)
    # the same image moved by a few pixels: the same spectrum (0 dB) but the detail is no longer in place
    moved = metrics.high_frequency(torch.roll(truth, (3, 5), dims=(-2, -1)), truth, 8)
    assert moved["hf_spectrum_db"] == pytest.approx(0.0, abs=1e-4) and moved["hf_corr"] < 0.2
    # interpolation of the input lies far below the truth at every ring; independent noise of the same kind near it
    up = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(truth, 4), size=32, mode="bicubic",
                                         align_corners=False)
    assert metrics.high_frequency(up, truth, 8)["hf_spectrum_db"] > 10
    noise = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert metrics.high_frequency(noise, truth, 8)["hf_spectrum_db"] < 1.5
    # one ring: a wave drawn at a quarter of the truth's amplitude, -12 dB there, 0 dB at the empty rings
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    wave = torch.cos(2 * math.pi * 9 * xx / 32).expand(1, 3, 32, 32)
    n_rings = 16 - 4                                                   # k = 5 .. 16 lie above 8 / 2
    assert metrics.high_frequency(wave / 4, wave, 8)["hf_spectrum_db"] == pytest.approx(
        10 * math.log10(16) / n_rings, rel=1e-4)


# ---- the attribute checker ---------------------------------------------------------------------


def test_metrics_on_known_embeddings():
    z = torch.eye(4)
    m = metrics.embedding_metrics(z, z, z.roll(1, 0), matches={"scene": torch.eye(4, dtype=torch.bool)})
    assert m == {"cos_image": 1.0, "cos_text": 0.0, "top1": 1.0, "top1_scene": 1.0}
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    zi = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    assert metrics.pair_cosine(zi, same) == pytest.approx(0.6)
    assert math.isnan(metrics.pair_cosine(zi, torch.eye(3, dtype=torch.bool)))


def test_modality_probe_and_candidate_diversity():
    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(16)
    shift[0] = 2.0
    zi = torch.nn.functional.normalize(torch.randn(200, 16, generator=g) + shift, dim=-1)   # two separated clouds
    zt = torch.nn.functional.normalize(torch.randn(200, 16, generator=g) - shift, dim=-1)
    probe = metrics.ModalityProbe(zi, zt)
    assert probe.p_image(zi).mean() > 0.9 and probe.p_image(zt).mean() < 0.1
    c = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])   # orthogonal pair, identical pair
    assert metrics.candidate_diversity(c) == pytest.approx(0.5)


# ---- rates -------------------------------------------------------------------------------------

def test_compare_rates_against_the_two_proportion_standard_error():
    # 45% vs 46% of 80: far inside the noise; 9% vs 18% of 80: se = sqrt(.09*.91/80 + .18*.82/80) = 0.0537, 1.7 se
    assert metrics.compare_rates(0.45, 80, 0.46, 80) == 0
    assert metrics.compare_rates(0.09, 80, 0.18, 80) == 0
    assert metrics.compare_rates(0.09, 80, 0.18, 80, z=1.5) == -1
    assert metrics.compare_rates(0.60, 400, 0.40, 400) == 1 and metrics.compare_rates(0.40, 400, 0.60, 400) == -1
    assert metrics.compare_rates(1.0, 5, 0.0, 5) == 1 and metrics.compare_rates(0.0, 5, 0.0, 9) == 0   # se 0
    with pytest.raises(DataError, match="rates in"):
        metrics.compare_rates(float("nan"), 10, 0.5, 10)
    with pytest.raises(DataError, match="at least one trial"):
        metrics.compare_rates(0.5, 0, 0.5, 10)


def test_compare_paired_is_an_exact_sign_test_on_the_discordant_items():
    # 10 discordant items, 9 to 1: two-sided p = 2 * 11 / 1024 = 2.1% < 4.6% (z = 2); 8 to 2: p = 11% -> noise
    assert metrics.compare_paired(9, 1) == 1 and metrics.compare_paired(1, 9) == -1
    assert metrics.compare_paired(8, 2) == 0 and metrics.compare_paired(0, 0) == 0 and metrics.compare_paired(5, 5) == 0
    assert metrics.compare_paired(8, 2, z=1.5) == 1      # p 11% < erfc(1.5 / sqrt 2) = 13.4%
    assert metrics.paired_p(9, 1) == pytest.approx(22 / 1024) and metrics.paired_p(2, 8) == pytest.approx(112 / 1024)
    assert metrics.paired_p(4, 4) == 1.0 and metrics.paired_p(0, 0) == 1.0 and metrics.paired_p(3, 2) == 1.0
    # 4 of 96 captions apart, unpaired, is within the noise; paired, 5 to 0 discordant is not (p = 6.25%: noise),
    # 7 to 0 is (p = 1.6%)
    assert metrics.compare_rates(0.94, 96, 0.90, 96) == 0
    assert metrics.compare_paired(5, 0) == 0 and metrics.compare_paired(7, 0) == 1
    assert metrics.discordant([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == (2, 1)
    with pytest.raises(DataError, match="same items, in the same order"):
        metrics.discordant([1, 0], [1])
    with pytest.raises(DataError, match="counts of items"):
        metrics.compare_paired(-1, 3)
