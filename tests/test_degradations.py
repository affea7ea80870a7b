"""Tests of unclip_mini/degradations.py: the BSR components and the stage-1 blur (shapes, ranges, seeds)."""
import math

import pytest
import torch

from unclip_mini import degradations as dg
from unclip_mini.errors import ConfigError

from _helpers import gen, images

RANDOM_OPS = {"random_blur": dg.random_blur, "random_resize": dg.random_resize,
              "gaussian_noise": dg.gaussian_noise, "camera_noise": dg.camera_noise, "jpeg": dg.jpeg,
              "bsr_degrade": dg.bsr_degrade}


torch.set_num_threads(1)  # tiny models: extra threads only wait on a shared machine


@pytest.mark.parametrize("name", list(RANDOM_OPS))
def test_degradations_shape_range_determinism(name):
    op, x = RANDOM_OPS[name], images()
    a, b, c = op(x, gen(1)), op(x, gen(1)), op(x, gen(2))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)          # same seed -> same result
    assert not torch.equal(a, c)                               # another seed -> another draw
    assert not torch.equal(a, x)                               # it changes the images


def test_bsr_draws_per_image_and_leaves_input_alone():
    x = images(b=1).repeat(6, 1, 1, 1)
    before = x.clone()
    y = dg.bsr_degrade(x, gen(0))
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    assert len({tuple(row.flatten()[:50].tolist()) for row in y}) > 1   # a mixture per image, not per batch


def test_gaussian_noise_level_and_jpeg_quality():
    flat = torch.zeros(8, 3, 32, 32)
    std = (dg.gaussian_noise(flat, gen(0), level_range=(10, 10)) - flat).std(dim=(1, 2, 3))
    # 10 levels of 255 is 10/127.5 in [-1, 1] units (grey, colour or correlated noise all stay near it)
    assert std.max() < 10 / 127.5 * 1.3 and std.min() > 10 / 127.5 * 0.2
    x = images(b=2, side=32)
    err = {q: (dg.jpeg(x, quality=q) - x).abs().mean().item() for q in (20, 95)}
    assert err[20] > err[95] > 0


def test_blur_kernel_sums_to_one_and_matches_sigma():
    k = dg.gaussian_kernel(3, 0.6)
    torch.testing.assert_close(k.sum(), torch.tensor(1.0))
    torch.testing.assert_close(k[0] / k[1], torch.tensor(math.exp(-1 / (2 * 0.36))))
    big = dg.gaussian_kernel(41, 2.5)                          # untruncated: variance = sigma^2
    x = torch.arange(41.0) - 20
    torch.testing.assert_close((big * x ** 2).sum(), torch.tensor(2.5 ** 2), rtol=1e-4, atol=1e-4)
    delta = torch.zeros(1, 3, 9, 9)
    delta[..., 4, 4] = 1.0
    out = dg.gaussian_blur(delta, 3, 0.6)
    torch.testing.assert_close(out[0, 0, 3:6, 3:6], torch.outer(k, k))
    const = torch.full((2, 3, 5, 5), 0.3)
    torch.testing.assert_close(dg.gaussian_blur(const), const)  # edges replicated: no darkening
    for size, sigma in ((4, 0.6), (0, 0.6), (3, 0.0)):
        with pytest.raises(ConfigError):
            dg.gaussian_kernel(size, sigma)




def test_degrade_by_name():
    x = images()
    torch.testing.assert_close(dg.degrade(x, "blur"), dg.gaussian_blur(x, 3, 0.6))
    assert torch.equal(dg.degrade(x, "none"), x)
    with pytest.raises(ConfigError, match="valid choices: 'blur', 'bsr', 'none'"):
        dg.degrade(x, "sharpen")
