"""Tests of unclip_mini/metrics.py: analytic cases of FD, CLIP score, PSNR, SSIM; the attribute checker."""
import math

import pytest
import torch

from unclip_mini import data, metrics, stages
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


# ---- the attribute checker ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def world():
    return data.ToyWorld(data.DataConfig.smoke())


def make_checker(world):
    torch.manual_seed(0)
    c = world.cfg
    return metrics.Checker(metrics.CheckerConfig.smoke(), c.colours, c.shapes, c.sizes).eval()


def test_checker_shapes_and_targets(world):
    checker = make_checker(world)
    scenes = world.scenes(range(20))
    images = world.render(scenes)
    out = checker(images)                                       # uint8 accepted
    assert out["colour"].shape == (20, 4, len(world.cfg.colours) + 1)
    assert out["shape"].shape == (20, 4, len(world.cfg.shapes) + 1)
    assert checker(data.to_float(world.render(scenes, 32)))["size"].shape == (20, 4, 3)  # any resolution
    t = checker.targets(scenes)
    for s, colour, shape in zip(scenes, t["colour"], t["shape"]):
        assert int((colour > 0).sum()) == len(s.objects) == int((shape > 0).sum())
        o = s.objects[0]
        cell = 2 * o.cell[0] + o.cell[1]
        assert world.cfg.colours[int(colour[cell]) - 1] == o.colour
        assert world.cfg.shapes[int(shape[cell]) - 1] == o.shape


def test_attribute_accuracy_semantics(world, monkeypatch):
    checker = make_checker(world)
    scenes = [s for s in world.scenes(range(40)) if len(s.objects) == 1][:10]
    images = torch.zeros(len(scenes), 3, 16, 16)
    truth = checker.targets(scenes)
    monkeypatch.setattr(checker, "predict", lambda images: {k: v.clone() for k, v in truth.items()})
    perfect = metrics.attribute_accuracy(checker, images, scenes)
    assert all(perfect[k] == 1.0 for k in ("colour", "shape", "size", "position", "count", "all"))
    # move every object to the next cell: colour/shape/size still right, position and scene wrong
    moved = {k: v.roll(1, dims=1) for k, v in truth.items()}
    monkeypatch.setattr(checker, "predict", lambda images: moved)
    acc = metrics.attribute_accuracy(checker, images, scenes)
    assert (acc["colour"], acc["shape"], acc["position"], acc["count"], acc["all"]) == (1.0, 1.0, 0.0, 1.0, 0.0)
    # wrong colour in the first image only
    wrong = {k: v.clone() for k, v in truth.items()}
    cell = int(wrong["colour"][0].argmax())
    wrong["colour"][0, cell] = wrong["colour"][0, cell] % len(world.cfg.colours) + 1
    monkeypatch.setattr(checker, "predict", lambda images: wrong)
    acc = metrics.attribute_accuracy(checker, images, scenes)
    assert acc["colour"] == pytest.approx(0.9) and acc["shape"] == 1.0 and acc["all"] == pytest.approx(0.9)
    with pytest.raises(DataError, match="one scene per image"):
        metrics.attribute_accuracy(checker, images[:3], scenes)


def test_checker_stage_round_trip(tmp_path):
    run = stages.Run("smoke", run_dir=tmp_path)
    trained = metrics.train_checker(run)
    record = stages.read_record(run, "checker")
    assert set(record["accuracy"]) == {"val", "heldout"} and 0 <= record["accuracy"]["val"]["all"] <= 1
    loaded = metrics.load_checker(run)
    images = run.dataset("val").images()[:8]
    torch.testing.assert_close(loaded(images)["shape"], trained(images)["shape"])
