"""The attribute checker: what it reads, how accuracies are counted, its stage."""
import math

import pytest
import torch

from unclip_mini import checker as C
from unclip_mini import data, stages
from unclip_mini.errors import DataError


def make_checker(world):
    torch.manual_seed(0)
    c = world.cfg
    return C.Checker(C.CheckerConfig.smoke(), c.colours, c.shapes, c.sizes).eval()


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
    perfect = C.attribute_accuracy(checker, images, scenes)
    assert all(perfect[k] == 1.0 for k in ("colour", "shape", "size", "position", "count", "all"))
    # move every object to the next cell: colour/shape/size still right, position and scene wrong
    moved = {k: v.roll(1, dims=1) for k, v in truth.items()}
    monkeypatch.setattr(checker, "predict", lambda images: moved)
    acc = C.attribute_accuracy(checker, images, scenes)
    assert (acc["colour"], acc["shape"], acc["position"], acc["count"], acc["all"]) == (1.0, 1.0, 0.0, 1.0, 0.0)
    # wrong colour in the first image only
    wrong = {k: v.clone() for k, v in truth.items()}
    cell = int(wrong["colour"][0].argmax())
    wrong["colour"][0, cell] = wrong["colour"][0, cell] % len(world.cfg.colours) + 1
    monkeypatch.setattr(checker, "predict", lambda images: wrong)
    acc = C.attribute_accuracy(checker, images, scenes)
    assert acc["colour"] == pytest.approx(0.9) and acc["shape"] == 1.0 and acc["all"] == pytest.approx(0.9)
    with pytest.raises(DataError, match="one scene per image"):
        C.attribute_accuracy(checker, images[:3], scenes)


def test_checker_stage_round_trip(tmp_path):
    run = stages.Run("smoke", run_dir=tmp_path)
    trained = stages.load_or_train(run, "checker", verbose=False)
    record = stages.read_record(run, "checker")
    accuracy = record["results"]["accuracy"]
    assert set(accuracy) == {"val", "heldout"} and 0 <= accuracy["val"]["all"] <= 1
    assert record["dims"]["shapes"] == list(run.cfg.data.shapes)
    loaded = stages.load_stage(run, "checker")
    images = run.dataset("val").images()[:8]
    torch.testing.assert_close(loaded(images)["shape"], trained(images)["shape"])


def test_caption_accuracy_scores_what_the_caption_states(world, monkeypatch):
    checker = make_checker(world)
    o = lambda colour, shape, cell, size="small": data.SceneObject(colour, shape, size, cell, (0.3, 0.3), 0.2, 0.0)
    t_plain = data.SINGLE_TEMPLATES.index("a {colour} {shape}")
    t_cell = data.SINGLE_TEMPLATES.index("a {colour} {shape} in the {cell}")
    t_rel = data.PAIR_TEMPLATES.index("a {colour_a} {shape_a} {rel} a {colour_b} {shape_b}")
    t_and = data.PAIR_TEMPLATES.index("a {colour_a} {shape_a} and a {colour_b} {shape_b}")
    scene = lambda objs, tpl, rel=None: data.Scene(tuple(objs), rel, None, "", tpl)
    c0, c1 = world.cfg.colours[:2]
    s0, s1 = world.cfg.shapes[:2]
    captions = [scene([o(c0, s0, (0, 0))], t_plain), scene([o(c0, s0, (0, 0))], t_cell),
                scene([o(c0, s0, (0, 0)), o(c1, s1, (0, 1))], t_rel, "left of"),
                scene([o(c0, s0, (0, 0)), o(c1, s1, (0, 1))], t_and, "left of")]
    drawn = [scene([o(c0, s0, (1, 1))], 0),                                 # another cell: "a red circle" fits
             scene([o(c0, s0, (1, 1))], 0),                                 # ... "in the top left" does not
             scene([o(c1, s0, (0, 0)), o(c0, s1, (0, 1))], 0, "left of"),   # colours swapped between the two
             scene([o(c1, s1, (1, 0)), o(c0, s0, (1, 1))], 0, "left of")]   # "A and B" in any arrangement

    def reads(scenes):
        """The checker now reads `scenes` out of whatever images it is given."""
        truth = checker.targets(scenes)
        monkeypatch.setattr(checker, "predict", lambda images: {k: v.clone() for k, v in truth.items()})

    reads(drawn)
    acc = C.caption_accuracy(checker, torch.zeros(4, 3, 16, 16), captions)
    assert acc["all"] == 0.5 and acc["count"] == 1.0 and acc["n_images"] == 4
    assert acc["colour"] == 1.0 and acc["shape"] == 1.0                     # as multisets, per object
    assert acc["relation"] == 0.0                                            # the one relation caption failed
    assert acc["colour_leak"] == 0.0 and acc["shape_leak"] == 0.0          # swapped, but each pair still differs
    leaked = [scene([o(c0, s0, (0, 0)), o(c1, s0, (0, 1))], 0, "left of"),   # s0 drawn for both objects
              scene([o(c0, s1, (1, 0)), o(c0, s1, (1, 1))], 0, "left of")]   # c0 and s1 for both
    reads(leaked)
    two = C.caption_accuracy(checker, torch.zeros(2, 3, 16, 16), captions[2:])
    assert two["shape_leak"] == 1.0 and two["colour_leak"] == 0.5 and two["all"] == 0.0
    assert two["shape_leak_n"] == 2 and two["colour_leak_n"] == 2                # the images each rate is out of
    reads(drawn[:1])
    one = C.caption_accuracy(checker, torch.zeros(1, 3, 16, 16), captions[:1])
    assert math.isnan(one["shape_leak"]) and math.isnan(one["colour_leak"])   # no two-object caption to leak in
    assert one["shape_leak_n"] == 0 and one["colour_leak_n"] == 0
    assert C.compare_binding(two, one) == {"colour": None, "shape": None}      # nothing to compare against
    reads(drawn)
    seen = C.read_scenes(checker, torch.zeros(4, 3, 16, 16), [s.template for s in captions])
    assert [len(s.objects) for s in seen] == [1, 1, 2, 2] and seen[2].relation == "left of"


def test_compare_binding_counts_leaks_beyond_the_noise():
    rates = lambda colour, shape, n: {"colour_leak": colour, "colour_leak_n": n, "shape_leak": shape, "shape_leak_n": n}
    assert C.compare_binding(rates(0.09, 0.45, 80), rates(0.18, 0.46, 80)) == {"colour": 0, "shape": 0}
    assert C.compare_binding(rates(0.10, 0.70, 400), rates(0.30, 0.40, 400)) == {"colour": -1, "shape": 1}


def test_binding_verdict_reads_the_comparison():
    assert C.binding_verdict({"colour": 1, "shape": 0}) == ("yes", "")
    assert C.binding_verdict({"colour": 1, "shape": None}, "unCLIP", "GLIDE") == ("yes", "")
    verdict, why = C.binding_verdict({"colour": -1, "shape": 1}, "unCLIP", "GLIDE")
    assert verdict == "partly" and why.startswith("unCLIP leaks one attribute more often than GLIDE")
    assert C.binding_verdict({"colour": -1, "shape": 0}, "unCLIP", "GLIDE")[0] == "no"
    verdict, why = C.binding_verdict({"colour": 0, "shape": 0}, "unCLIP", "GLIDE")
    assert verdict == "no" and "within the sampling noise" in why
    assert C.binding_verdict({"colour": None, "shape": None})[0] == "no"
