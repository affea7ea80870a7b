"""Tests of unclip_mini/upsampler.py: conv-only crops vs full images, training pairs, config errors, and
one smoke train -> load -> upsample round trip (with a variant)."""

import pytest
import torch
import torch.nn.functional as F

from unclip_mini import degradations
from unclip_mini import upsampler as up
from unclip_mini.data import DataConfig, ToyWorld, to_float
from unclip_mini.errors import ArtifactError, ConfigError, DataError
from unclip_mini.unet import AttentionBlock, UNetModel

from _helpers import gen, images, perturb_

torch.set_num_threads(1)  # tiny models: extra threads only wait on a shared machine


def perturbed(cfg, seed=0):
    torch.manual_seed(seed)
    return perturb_(UNetModel(cfg), seed + 1).eval()


def test_conv_only_model_runs_on_crops_and_on_the_whole_image():
    cfg = up.UpsamplerConfig.stage1("smoke")
    model = perturbed(cfg.unet)
    assert not any(isinstance(m, AttentionBlock) for m in model.modules())
    crop, full = cfg.crop_size, 4 * cfg.crop_size
    for side in (crop, full):
        x = torch.randn(2, 3, side, side, generator=gen(side))
        out = model(x, torch.tensor([5, 50]), cond=torch.randn(2, 3, side, side, generator=gen(1)))
        assert out.shape == (2, 3, side, side) and torch.isfinite(out).all()
    # locality: changing one corner of a 4x-size input moves the far corner far less than the near one
    # (only GroupNorm's statistics reach across the image; attention would mix everything)
    x, c = torch.randn(1, 3, full, full, generator=gen(3)), torch.randn(1, 3, full, full, generator=gen(4))
    y = x.clone()
    y[..., :8, :8] += 1.0
    with torch.no_grad():
        d = (model(y, 10, cond=c) - model(x, 10, cond=c)).abs()
    assert d[..., -16:, -16:].mean() < 0.05 * d[..., :8, :8].mean()


def test_training_pairs_are_avgpooled_crops_then_corrupted():
    world = ToyWorld(DataConfig.smoke())
    scenes = world.scenes(range(3))
    clean = up.UpsamplerConfig.stage1("smoke").replace(degradation="none")
    pair = up.training_pairs(world, scenes, clean, 64, gen(0))
    c = clean.crop_size
    assert pair["high_res"].shape == (3, 3, c, c) and pair["cond"].shape == (3, 3, c // 4, c // 4)
    torch.testing.assert_close(pair["low_res"], F.avg_pool2d(pair["high_res"], 4))
    torch.testing.assert_close(pair["cond"], pair["low_res"])
    full = to_float(world.render(scenes, 64))
    low_full = F.avg_pool2d(full, 4)
    for i, (top, left, size) in enumerate(pair["crops"]):
        assert size == c and top % 4 == 0 and left % 4 == 0 and top + c <= 64 and left + c <= 64
        torch.testing.assert_close(pair["high_res"][i], full[i, :, top:top + c, left:left + c])
        # the low-res window is exactly a window of the whole low-res image
        torch.testing.assert_close(pair["low_res"][i], low_full[i, :, top // 4:(top + c) // 4,
                                                                 left // 4:(left + c) // 4])
    blur_cfg = up.UpsamplerConfig.stage1("smoke")
    blur = up.training_pairs(world, scenes, blur_cfg, 64, gen(0))
    torch.testing.assert_close(blur["high_res"], pair["high_res"])        # same generator, same crops
    torch.testing.assert_close(blur["cond"], degradations.gaussian_blur(blur["low_res"], 3, blur_cfg.blur_sigma))
    assert blur_cfg.blur_sigma == 0.4 and up.UpsamplerConfig.stage1("paper").blur_sigma == 0.6   # paper: 0.6
    focus = up.training_pairs(world, world.scenes(range(8)), clean.replace(crop_focus=1.0), 64, gen(0))
    for scene, (top, left, size) in zip(world.scenes(range(8)), focus["crops"]):
        if len(scene.objects) == 1:   # the window holds the object's centre
            cx, cy = scene.objects[0].centre
            assert top <= cy * 64 < top + size and left <= cx * 64 < left + size
    bsr_cfg = up.UpsamplerConfig.stage2("smoke")
    a = up.training_pairs(world, scenes, bsr_cfg, 256, gen(5))
    b = up.training_pairs(world, scenes, bsr_cfg, 256, gen(5))
    torch.testing.assert_close(a["cond"], b["cond"], rtol=0, atol=0)
    assert not torch.equal(a["cond"], a["low_res"])


def test_config_errors_name_the_fix():
    cfg = up.UpsamplerConfig.stage1("smoke")
    with pytest.raises(ConfigError, match="valid choices: 'blur', 'bsr', 'none'"):
        cfg.replace(degradation="sharpen")
    with pytest.raises(ConfigError, match="valid choices: 'blur', 'bsr', 'none'"):
        degradations.degrade(images(), "sharpen")
    with pytest.raises(ConfigError, match="conv-only"):
        cfg.replace(unet=cfg.unet.replace(attention_resolutions=(16,), num_head_channels=8))
    with pytest.raises(ConfigError, match="multiple of"):
        cfg.replace(crop_fraction=0.2)
    with pytest.raises(ConfigError, match="mean_type='x0'"):
        cfg.replace(diffusion=cfg.diffusion.replace(mean_type="eps"))
    with pytest.raises(ConfigError, match="odd"):
        cfg.replace(blur_kernel=4)
    with pytest.raises(ConfigError, match="crop_focus"):
        cfg.replace(crop_focus=1.5)
    with pytest.raises(ConfigError, match="valid presets"):
        up.UpsamplerConfig.stage2("huge")
    for preset in ("smoke", "toy", "small", "paper"):
        for c in (up.UpsamplerConfig.stage1(preset), up.UpsamplerConfig.stage2(preset)):
            assert up.UpsamplerConfig.from_dict(c.to_dict()) == c
    assert up.UpsamplerConfig.stage2("paper").diffusion.schedule == "linear"
    assert up.UpsamplerConfig.stage1("paper").sample_steps == 27 and up.UpsamplerConfig.stage2("small").sample_steps == 15 \
        and up.UpsamplerConfig.stage2("toy").sample_steps == 5


def test_untrained_upsampler_returns_the_bilinear_upsample_and_checks_inputs():
    cfg = up.UpsamplerConfig.stage1("smoke")
    torch.manual_seed(0)
    u = up.Upsampler(cfg, UNetModel(cfg.unet), "cpu")   # zero output layer: x0 = up(cond) exactly
    low = images(b=2, side=8) * 0.9
    out = u.upsample(low, steps=3, generator=gen(0))
    torch.testing.assert_close(out, up.resize_cond(low, (32, 32)))
    with pytest.raises(DataError, match="multiple of"):
        up.Upsampler(up.UpsamplerConfig.stage2("smoke"), UNetModel(up.UpsamplerConfig.stage2("smoke").unet),
                     "cpu").upsample(torch.zeros(1, 3, 15, 15))
    with pytest.raises(DataError, match="to_float"):
        u.upsample(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="steps"):
        u.upsample(low, steps=0)


def test_smoke_train_load_upsample_round_trip(tmp_path):
    from unclip_mini import stages
    run = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    with pytest.raises(ArtifactError, match="no trained 'upsampler1'"):
        stages.load_stage(run, "upsampler1")
    bad = run.cfg.upsampler1.replace(unet=run.cfg.upsampler1.unet.replace(image_size=128))
    with pytest.raises(ConfigError, match="unet.image_size"):
        stages.train_stage(run, "upsampler1", config=bad, variant="big")
    trained = stages.train_stage(run, "upsampler1")
    assert stages.read_record(run, "upsampler1")["id"] == trained.record["id"]
    loaded = stages.load_or_train(run, "upsampler1", verbose=False)
    for a, b in zip(trained.model.state_dict().values(), loaded.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    low = to_float(run.world.render(run.world.scenes(range(2), "val")))     # whole 16-px images
    out = loaded.upsample(low, generator=gen(0), batch_size=1)
    assert out.shape == (2, 3, 64, 64) and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, trained.upsample(low, generator=gen(0)))
    # a variant (no corruption) trains through the same code into its own folder
    none = run.cfg.upsampler1.replace(degradation="none")
    clean = stages.load_or_train(run, "upsampler1", config=none, variant="clean", verbose=False)
    again = stages.load_or_train(run, "upsampler1", config=none, variant="clean", verbose=False)
    assert again.cfg.degradation == "none" and again.record["id"] == clean.record["id"] != trained.record["id"]
    assert (tmp_path / "upsampler1-clean" / "stage.json").exists()
    # the run's own upsampler1 was trained with blur: a run asking for 'none' is refused, naming the field
    run.cfg = run.cfg.replace(upsampler1=none)
    with pytest.raises(ArtifactError, match=r"upsampler1\.degradation: 'blur' -> 'none'"):
        stages.load_stage(run, "upsampler1")
