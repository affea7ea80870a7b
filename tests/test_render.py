"""Tests for unclip_mini.render: the analytic renderer (crops, resolutions, fine detail, text, shapes)."""
import pytest
import torch
import torch.nn.functional as F

from unclip_mini import data as D
from unclip_mini import render as R
from unclip_mini.errors import DataError



# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------

def test_render_shape_dtype(world):
    scenes = world.scenes(range(5))
    img = world.render(scenes)
    assert img.dtype == torch.uint8 and img.shape == (5, 3, 16, 16)
    assert world.render(scenes, 64).shape == (5, 3, 64, 64)
    assert world.render(scenes[0]).shape == (1, 3, 16, 16)
    assert world.render([]).shape == (0, 3, 16, 16)
    # the background is the light neutral; an object changes pixels
    assert tuple(img[0, :, 0, 0].tolist()) == R.BACKGROUND or tuple(img[0, :, -1, -1].tolist()) == R.BACKGROUND
    assert (img.float().std(dim=(2, 3)) > 5).all()


def test_crop_equals_slice_of_full_render(toy):
    scenes = toy.scenes(range(12))
    full = toy.render(scenes, 128)
    one = toy.render(scenes, 128, crop=(40, 8, 64))
    assert torch.equal(one, full[:, :, 40:104, 8:72])
    crops = [(i * 5, 64 - i * 4, 32) for i in range(12)]
    each = toy.render(scenes, 128, crop=crops)
    for i, (t, l, s) in enumerate(crops):
        assert torch.equal(each[i], full[i, :, t:t + s, l:l + s])
    with pytest.raises(DataError, match="outside the 128x128 frame"):
        toy.render(scenes, 128, crop=(100, 0, 64))
    with pytest.raises(DataError, match="one per scene"):
        toy.render(scenes, 128, crop=crops[:3])


@pytest.mark.parametrize("factor", [4, 16])
def test_high_resolution_area_downsamples_to_base(toy, factor):
    """The base render is band-limited: area-averaging the x4/x16 render of the same scenes gives it back.

    Measured mean |diff| (in 1/255): 0.32 (x4 and x16, toy, 32 px); what remains is the SDF coverage
    approximation at sharp corners and the sub-pixel outline. The bound 1/255 fails if the hatch is
    point-sampled at base (1.7/255) or edges are not anti-aliased (4.0/255).
    """
    cfg = toy.cfg.replace(p_text=0.5)  # include written text
    world = D.ToyWorld(cfg)
    scenes = world.scenes(range(32))
    base = world.render(scenes).float()
    high = world.render(scenes, factor * cfg.resolution).float()
    diff = (F.avg_pool2d(high, factor) - base).abs()
    assert diff.mean() < 1.0, diff.mean()
    assert (diff > 40).float().mean() < 1e-3  # large errors only at a few corner pixels


def test_hatch_is_fine_detail(toy):
    """The hatch fades to a flat tone at base and shows as stripes at x16."""
    o = D.SceneObject("blue", "square", "large", (0, 0), (0.5, 0.5), 0.3, 0.0)
    scene = D.Scene((o,), None, None, "a blue square", 0)
    plain = D.ToyWorld(toy.cfg.replace(hatch=False, shading=False))
    hatched = D.ToyWorld(toy.cfg.replace(shading=False))

    def inner_std(w, res):  # pixel spread in the middle of the square
        img = w.render([scene], res).float()[0]
        c = res // 2
        return img[:, c - res // 8:c + res // 8, c - res // 8:c + res // 8].flatten(1).std(1).max().item()
    assert inner_std(plain, 32) < 1 and inner_std(hatched, 32) < 1
    assert inner_std(hatched, 512) > 20
    # the flat tone at base is the stripes' mean: darker than the unhatched square
    assert hatched.render([scene]).float().mean() < plain.render([scene]).float().mean() - 2


def test_words_are_legible_at_the_base_resolution(toy):
    """A written word is the font's bitmap, one base pixel per font cell, on a paper label: at 32 px its box holds
    exactly the ink of the letters and the label around them; at x4 every base pixel becomes a 4x4 block."""
    scene = toy.with_text(toy.scene(0), None)
    written = toy.with_text(scene, "star")
    assert written.text == "star" and scene.text is None and written.caption == scene.caption
    left, top, width = R.word_box(toy.cfg, written)
    assert width == 4 * 4 - 1
    base = toy.render([written])[0]                                           # [3, 32, 32]
    box = base[:, top:top + R.FONT_ROWS, left:left + width]
    bits = R._word_bitmap("star").bool()
    ink, label = torch.tensor(R.INK).view(3, 1), torch.tensor(R.LABEL).view(3, 1)
    assert torch.equal(box[:, bits], ink.expand(3, int(bits.sum())).to(torch.uint8))
    assert torch.equal(box[:, ~bits], label.expand(3, int((~bits).sum())).to(torch.uint8))
    x4 = toy.render([written], 128)[0].float()
    blocks = F.avg_pool2d(x4[None], 4)[0]
    assert (blocks[:, top:top + R.FONT_ROWS, left:left + width] - box.float()).abs().max() < 1
    other = toy.with_text(scene, "circle")
    assert (toy.render([other]) != toy.render([written])).any()
    with pytest.raises(DataError, match="lowercase a-z"):
        toy.with_text(scene, "Star!")
    captioned = D.ToyWorld(toy.cfg.replace(text_in_caption=True))
    assert "with the word star" in captioned.with_text(scene, "star").caption


def test_shapes_are_distinct_at_base(toy):
    """Every pair of toy shapes differs clearly at 32 px (same colour, place, size, no rotation)."""
    scenes = [D.Scene((D.SceneObject("red", s, "small", (0, 0), (0.5, 0.5), 0.18, 0.0),), None, None, s, 0)
              for s in toy.cfg.shapes]
    img = toy.render(scenes).float()
    for i in range(len(scenes)):
        for j in range(i):  # measured: at least 35 of 1024 pixels (circle vs hexagon, not in toy: 19)
            differ = ((img[i] - img[j]).abs().amax(0) > 40).sum()
            assert differ >= 30, (toy.cfg.shapes[i], toy.cfg.shapes[j], differ)


def test_extent_table_bounds_each_shape():
    g = torch.linspace(-1.5, 1.5, 601)
    y, x = torch.meshgrid(g, g, indexing="ij")
    for name, sdf in R._SDF.items():
        inside = sdf(x, y) < 0
        r = torch.sqrt(x * x + y * y)[inside]
        assert r.max() <= R.EXTENT[name] + 0.01 and r.max() > R.EXTENT[name] - 0.03, name
        assert inside.float().mean() * 9 > 1.2  # every shape has a sizeable area
