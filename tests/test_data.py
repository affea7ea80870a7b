"""Tests for unclip_mini.data: the toy world (determinism, splits, captions, semantics) and its datasets."""
import json
import re

import pytest
import torch

from unclip_mini import data as D
from unclip_mini import render
from unclip_mini.errors import ConfigError, DataError



# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["smoke", "toy", "small", "paper"])
def test_presets_valid_and_round_trip(name):
    cfg = D.DataConfig.preset(name)
    assert D.DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert all(isinstance(p, tuple) for p in cfg.heldout_pairs)


def test_toy_heldout_covers_every_colour_and_shape():
    cfg = D.DataConfig.toy()
    assert len(cfg.colours) == 8 and len(cfg.shapes) == 6 and len(cfg.heldout_pairs) == 8
    assert {c for c, _ in cfg.heldout_pairs} == set(cfg.colours)
    assert {s for _, s in cfg.heldout_pairs} == set(cfg.shapes)


def test_config_errors():
    cfg = D.DataConfig.smoke()
    with pytest.raises(ConfigError, match=r"unknown name 'mauve'.*valid names: red, orange"):
        cfg.replace(colours=("red", "mauve"))
    with pytest.raises(ConfigError, match=r"unknown name 'blob'.*circle, square"):
        cfg.replace(shapes=("circle", "blob"))
    with pytest.raises(ConfigError, match=r"p_text = 1.5 is out of range; valid: 0.0 <= value <= 1.0"):
        cfg.replace(p_text=1.5)
    with pytest.raises(ConfigError, match="p_two_objects"):
        cfg.replace(p_two_objects=-0.1)
    with pytest.raises(ConfigError, match="multiple of 8"):
        cfg.replace(resolution=20)
    with pytest.raises(ConfigError, match="resolution"):
        cfg.replace(resolution=8)
    with pytest.raises(ConfigError, match=r"heldout_pairs.*'brown' .* is not in colours"):
        cfg.replace(heldout_pairs=(("brown", "circle"),))
    with pytest.raises(ConfigError, match="holds out every shape of colour 'red'"):
        cfg.replace(heldout_pairs=tuple(("red", s) for s in cfg.shapes))
    with pytest.raises(ConfigError, match="must be a non-empty tuple"):
        cfg.replace(colours=["red", "blue"])
    with pytest.raises(ConfigError, match="heldout_size=0"):
        cfg.replace(heldout_pairs=())
    assert cfg.replace(heldout_pairs=(), heldout_size=0).heldout_pairs == ()


# ---------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------

def test_determinism(world):
    other = D.ToyWorld(D.DataConfig.smoke())
    a, b = world.scene(17), other.scene(17)
    assert a == b
    assert torch.equal(world.render([a]), other.render([b]))
    # independent of which other indices are drawn with it
    assert world.scenes([3, 17, 40])[1] == a
    # another index, split or seed gives another scene
    imgs = world.render([world.scene(i) for i in range(8)])
    assert len({s.caption for s in world.scenes(range(8))}) > 1
    assert all(not torch.equal(imgs[0], imgs[i]) for i in range(1, 8))
    assert world.scene(17, "val") != a
    assert D.ToyWorld(world.cfg.replace(seed=1)).scene(17) != a


def test_split_discipline(world):
    held = set(world.cfg.heldout_pairs)
    for split in ("train", "val"):
        for s in world.scenes(range(400), split):
            assert not {(o.colour, o.shape) for o in s.objects} & held, s
    heldout = world.scenes(range(200), "heldout")
    assert all(sum((o.colour, o.shape) in held for o in s.objects) == 1 for s in heldout)
    assert any(len(s.objects) == 2 for s in heldout) and any(len(s.objects) == 1 for s in heldout)
    # every held-out pair is reachable
    assert {(o.colour, o.shape) for s in heldout for o in s.objects} >= held


def test_scene_statistics(world):
    scenes = world.scenes(range(1000))
    two = sum(len(s.objects) == 2 for s in scenes) / len(scenes)
    singles = [s for s in scenes if len(s.objects) == 1]
    text = sum(s.text is not None for s in singles) / len(singles)
    assert abs(two - world.cfg.p_two_objects) < 0.06 and abs(text - world.cfg.p_text) < 0.06
    assert all(s.text is None for s in scenes if len(s.objects) == 2)     # words go on single objects only
    assert len({s.template for s in scenes if len(s.objects) == 1}) == len(D.SINGLE_TEMPLATES)
    assert len({s.template for s in scenes if len(s.objects) == 2}) == len(D.PAIR_TEMPLATES)
    assert {o.cell for s in scenes for o in s.objects} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_captions_describe_the_scene(world):
    for s in world.scenes(range(300)):
        c = s.caption
        assert c == c.lower() and c.isascii() and len(c.split()) <= 16 and "a o" not in c
        for o in s.objects:
            assert re.search(rf"\b{o.colour} {o.shape}\b", c), (c, o)
        a = s.objects[0]
        if len(s.objects) == 1:
            assert s.relation is None
            if "the " in c:  # templates with a position name the right cell
                assert D.CELLS[world.cell_index(a.cell)] in c
        else:
            b = s.objects[1]
            drow, dcol = b.cell[0] - a.cell[0], b.cell[1] - a.cell[1]
            want = {(0, 1): "left of", (0, -1): "right of", (1, 0): "above", (-1, 0): "below"}[(drow, dcol)]
            assert s.relation == want
            said = re.search(r"(left of|right of|above|below)", c)
            if said:  # "X rel Y" with X and Y in either order
                first = a if c.index(f"{a.colour} {a.shape}") < c.index(f"{b.colour} {b.shape}") else b
                assert said.group(1) == (want if first is a else D.RELATIONS[want]), c


def test_pairs_do_not_overlap_and_stay_near_the_frame(world):
    for s in world.scenes(range(500)):
        ext = [render.EXTENT[o.shape] * o.radius for o in s.objects]
        for o, e in zip(s.objects, ext):
            assert -0.04 < o.centre[0] - e and o.centre[0] + e < 1.04
        if len(s.objects) == 2:
            (ax, ay), (bx, by) = s.objects[0].centre, s.objects[1].centre
            assert ((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5 > sum(ext)


def test_scene_dict_round_trip_and_bad_split(world):
    s = world.scene(5)
    assert D.Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(DataError, match="valid splits: train, val, heldout"):
        world.scene(0, "test")
    with pytest.raises(DataError, match="index"):
        world.scene(-1)


# ---------------------------------------------------------------------------------------------
# datasets and helpers
# ---------------------------------------------------------------------------------------------

def test_dataset(world):
    ds = world.dataset("val")
    assert len(ds) == world.cfg.val_size
    item = ds[3]
    assert set(item) == {"image", "caption", "scene"} and item["image"].shape == (3, 16, 16)
    assert item["caption"] == ds.captions()[3] == item["scene"].caption
    images = ds.images(batch_size=10)
    assert images.shape == (len(ds), 3, 16, 16) and torch.equal(images[3], item["image"])
    assert torch.equal(images[-1], ds[-1]["image"])
    assert ds.images(resolution=32, batch_size=50).shape == (len(ds), 3, 32, 32)
    assert len(world.dataset("train", size=7)) == 7
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_labels_and_prompts(world):
    prompts = world.class_prompts()
    assert len(prompts) == len(world.cfg.colours) * len(world.cfg.shapes)
    assert prompts[0] == "a red circle" and "an orange circle" in prompts
    scenes = world.scenes(range(50), "heldout")
    lab = world.labels(scenes)
    for k, s in enumerate(scenes):
        o = s.objects[0]
        assert world.class_pairs()[lab["pair"][k]] == (o.colour, o.shape)
        assert D.CELLS[lab["cell"][k]] in D.CELLS and lab["n_objects"][k] == len(s.objects)
    assert lab["heldout"].sum() > 0
    with pytest.raises(DataError, match="this world's colours: red"):
        world.colour_index("brown")


def test_float_conversion():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    f = D.to_float(x)
    assert f.dtype == torch.float32 and f.min() >= -1 and f.max() <= 1
    assert torch.equal(D.to_uint8(f), x)
    assert D.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]
    with pytest.raises(DataError, match="expects uint8"):
        D.to_float(f)


def test_caption_match_reads_only_what_the_caption_says():
    o = lambda colour, shape, size="small", cell=(0, 0): D.SceneObject(colour, shape, size, cell, (0.3, 0.3), 0.2, 0.0)
    t_plain = D.SINGLE_TEMPLATES.index("a {colour} {shape}")
    t_full = D.SINGLE_TEMPLATES.index("a {size} {colour} {shape} in the {cell}")
    t_rel = D.PAIR_TEMPLATES.index("a {colour_a} {shape_a} {rel} a {colour_b} {shape_b}")
    t_and = D.PAIR_TEMPLATES.index("a {colour_a} {shape_a} and a {colour_b} {shape_b}")
    scene = lambda objs, tpl, rel=None: D.Scene(tuple(objs), rel, None, "", tpl)
    scenes = [scene([o("red", "circle")], t_plain),                      # 0: "a red circle"
              scene([o("red", "circle", "large", (1, 1))], t_full),      # 1: "a large red circle in the bottom right"
              scene([o("red", "circle", "small", (1, 1))], t_full),      # 2
              scene([o("red", "circle", cell=(0, 0)), o("blue", "star", cell=(0, 1))], t_rel, "left of"),
              scene([o("blue", "star", cell=(1, 0)), o("red", "circle", cell=(1, 1))], t_rel, "right of"),
              scene([o("blue", "star", cell=(0, 0)), o("red", "circle", cell=(0, 1))], t_and, "left of")]
    m = D.caption_match_matrix(scenes)
    assert m[0].tolist() == [True, True, True, False, False, False]     # any single red circle
    assert m[1].tolist() == [False, True, False, False, False, False]   # size and cell must match
    assert m[3].tolist() == [False, False, False, True, True, False]    # "A left of B" == "B right of A", any row
    assert m[5].tolist() == [False, False, False, True, True, True]     # "A and B": any arrangement
    assert D.same_scene_matrix(scenes).sum().item() == 6               # every scene differs
    for i, s in enumerate(scenes):                                      # one algorithm: describes == the matrix
        assert D.describes(s, scenes).tolist() == m[i].tolist()
