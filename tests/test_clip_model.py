"""CLIP through open_clip: the interface, the loading paths, the stage, and its errors."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from unclip_mini import clip_model, stages
from unclip_mini.errors import ArtifactError, CaptionTooLong, CheckpointError, ConfigError, DataError


@pytest.fixture(scope="module")
def encoder():
    cfg = clip_model.ClipConfig.smoke()
    torch.manual_seed(0)
    return clip_model.ClipEncoder(*clip_model.create_clip(cfg), cfg)


def test_text_interface_matches_open_clip(encoder):
    out = encoder.encode_text(["a red circle", "a large green star left of a blue square"])
    ref = F.normalize(encoder.model.encode_text(out["tokens"]), dim=-1)
    torch.testing.assert_close(out["text_embed"], ref)
    assert out["text_tokens"].shape == (2, encoder.context_length, encoder.text_width)
    # the mask covers start, words, end: 3 words + 2 and 9 words + 2
    assert out["text_mask"].sum(1).tolist() == [5, 11]
    assert torch.allclose(out["text_embed"].norm(dim=-1), torch.ones(2))


def test_image_interface(encoder):
    u8 = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    z = encoder.encode_image(u8)
    assert z.shape == (3, encoder.embed_dim) and torch.allclose(z.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(z, encoder.encode_image(u8.float() / 127.5 - 1))
    assert encoder.encode_image(F.interpolate(u8.float() / 127.5 - 1, size=32)).shape == z.shape  # resized
    with pytest.raises(DataError, match=r"images \[B, 3, H, W\], got \(3, 1, 16, 16\)"):
        encoder.encode_image(u8[:, :1])
    with pytest.raises(DataError, match="square images, got 16x12"):
        encoder.encode_image(u8[..., :12])


def test_caption_errors(encoder):
    with pytest.raises(DataError, match="empty caption"):
        encoder.tokenize(["a red circle", "   "])
    with pytest.raises(CaptionTooLong, match=r"has \d+ tokens but the text encoder reads at most 24: shorten it"):
        encoder.tokenize(["a red circle " * 10])


def test_local_dir_and_file_loading_go_through_open_clip(encoder, tmp_path):
    cfg = clip_model.ClipConfig.smoke()
    clip_model.export_local_dir(encoder.model, cfg, tmp_path / "m")
    model, tok, pre = clip_model.load_local_dir(tmp_path / "m")
    x = encoder.tokenize(["a blue star"])
    torch.testing.assert_close(model.encode_text(x), encoder.model.encode_text(x))
    by_file = open_clip.create_model(cfg.model_name(), pretrained=str(tmp_path / "m" / "open_clip_pytorch_model.bin"))
    torch.testing.assert_close(by_file.encode_text(x), encoder.model.encode_text(x))
    with pytest.raises(CheckpointError, match="not an open_clip model folder"):
        clip_model.load_local_dir(tmp_path)
    (tmp_path / "m" / "open_clip_pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="could not load the CLIP"):
        clip_model.load_local_dir(tmp_path / "m")


def test_pretrained_errors_say_what_to_do(monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        clip_model.create_clip(clip_model.ClipConfig.smoke().replace(pretrained="/nowhere/weights.bin"))

    def offline(*a, **k):
        raise RuntimeError("network unreachable")
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    cfg = clip_model.ClipConfig.paper().replace(arch="ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(CheckpointError, match="may be offline.*local file"):
        clip_model.create_clip(cfg)
    with pytest.raises(ConfigError, match="open_clip has no architecture 'ViT-Nope'"):
        clip_model.create_clip(cfg.replace(arch="ViT-Nope", pretrained=None))


def test_zero_shot_and_recall(encoder):
    classes = ["a red circle", "a blue square", "a green star"]
    w = clip_model.class_embeddings(encoder, classes, ("{}", "a picture of {}"))
    assert w.shape == (3, encoder.embed_dim)
    assert clip_model.zero_shot_classify(encoder, w, classes, ("{}", "a picture of {}")).tolist() == [0, 1, 2]
    e = F.normalize(torch.randn(5, 4), dim=-1)
    assert clip_model.recall_at_1(e, e) == 1.0
    same = torch.ones(5, 5, dtype=torch.bool)
    assert clip_model.recall_at_1(e, e.flip(0), same=same) == 1.0


def test_stage_round_trip_and_cache_provenance(tmp_path):
    run = stages.Run("smoke", run_dir=tmp_path)
    trained = stages.load_or_train(run, "clip", verbose=False)
    loaded = stages.load_or_train(run, "clip", verbose=False)
    x = trained.tokenize(["a red circle"])
    torch.testing.assert_close(trained.encode_text(x)["text_embed"], loaded.encode_text(x)["text_embed"])
    emb = run.embeddings("heldout")
    assert len(emb["image_embed"]) == len(run.dataset("heldout"))
    torch.testing.assert_close(emb["image_embed"][:4], loaded.encode_image(run.dataset("heldout").images()[:4]))
    assert trained.record["id"] == loaded.record["id"] == stages.read_record(run, "clip")["id"]
    # the exported open_clip folder loads through open_clip's own `local-dir:` code, to the same CLIP
    model, tokenizer, pre = clip_model.load_local_dir(tmp_path / "clip" / "open_clip")
    exported = clip_model.ClipEncoder(model, tokenizer, pre, loaded.cfg)
    torch.testing.assert_close(exported.encode_text(x)["text_embed"], loaded.encode_text(x)["text_embed"])
    # a CLIP retrained since: the cached embeddings are refused
    record = stages.read_record(run, "clip")
    stages.write_record(run, "clip", {**record["config"], "embed_dim": 99})
    fresh = stages.Run("smoke", run_dir=tmp_path)
    with pytest.raises(ArtifactError, match="was made from clip .* but the current clip is"):
        fresh.embeddings("train")


def test_hard_negative_loss_is_clip_loss_plus_each_images_own_negative():
    g = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(2))
    scale = torch.tensor(10.0)
    ref = open_clip.ClipLoss()(img, txt, scale)
    # with every slot empty it is CLIP's loss
    empty = torch.full((3,), -1)
    torch.testing.assert_close(clip_model.hard_negative_loss(img, txt, txt[:3], empty, scale), ref)
    # images 4 and 1 get a negative that equals their own caption: one more logit equal to the right one
    owner = torch.tensor([4, -1, 1])
    neg = txt[owner.clamp(min=0)]
    got = clip_model.hard_negative_loss(img, txt, neg, owner, scale)
    logits = scale * img @ txt.T
    extra = torch.full((6,), float("-inf"))
    extra[[4, 1]] = logits.diag()[[4, 1]]
    i2t = (torch.logsumexp(torch.cat([logits, extra[:, None]], 1), 1) - logits.diag()).mean()
    torch.testing.assert_close(got, (i2t + F.cross_entropy(logits.T, torch.arange(6))) / 2)
    assert got > ref
    far = clip_model.hard_negative_loss(img, txt, -img[:2], torch.tensor([0, 1]), scale)
    assert ref < far < ref + 1e-3          # a negative opposite its image costs almost nothing
    neg = neg.clone().requires_grad_()
    clip_model.hard_negative_loss(img, txt, neg, owner, scale).backward()
    assert neg.grad[[0, 2]].abs().sum() > 0 and neg.grad[1].abs().sum() == 0   # an empty slot learns nothing


def test_clip_batches_carry_hard_negatives_of_two_object_scenes(tmp_path):
    run = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    spec, ctx = stages.get_stage("clip"), stages.StageContext(run, "clip", {})
    assert run.cfg.clip.hard_negatives == 0          # off unless asked for
    cfg = run.cfg.clip.replace(hard_negatives=0.375)
    get_batch, n = spec.batches(cfg, {}, ctx)
    scenes = run.dataset("train").scenes()
    idx = torch.arange(cfg.train.batch_size)
    images, tokens, neg, owner = get_batch(idx)
    slots = math.ceil(cfg.hard_negatives * clip_model.NEG_BLOCK) * (cfg.train.batch_size // clip_model.NEG_BLOCK)
    assert neg.shape == (slots, tokens.shape[1]) and owner.shape == (slots,)
    live = owner[owner >= 0]
    assert len(live) > 0 and len(set(live.tolist())) == len(live)
    assert all(len(scenes[i].objects) == 2 for i in live.tolist())
    assert not (neg[owner >= 0] == tokens[live]).all(1).any()          # each differs from its image's caption
    assert tokens.shape[0] == cfg.train.batch_size and images.shape[0] == cfg.train.batch_size
    assert len(spec.batches(run.cfg.clip, {}, ctx)[0](idx)) == 2


def test_hard_negative_caption_swaps_one_binding_of_the_same_words():
    from unclip_mini.data import ToyWorld, hard_negative_caption
    world = ToyWorld()
    allowed = set(world.train_pairs)
    kinds = set()
    for scene in world.scenes(range(300)):
        for choice in (0.1, 0.5, 0.9):
            neg = hard_negative_caption(scene, allowed, choice)
            if len(scene.objects) == 1:
                assert neg is None
                continue
            if neg is None:   # only a template that states no relation, when the swap is not allowed
                assert " and " in scene.caption
                continue
            # the same words, bar the articles and which relation: a bag of words cannot tell them apart
            bag = lambda c: sorted("REL" if w in ("left", "right", "above", "below") else w
                                   for w in c.split() if w not in ("a", "an"))
            assert neg != scene.caption and bag(neg) == bag(scene.caption)
            for colour in world.cfg.colours:   # never a held-out (colour, shape) pair
                for shape in world.cfg.shapes:
                    if (colour, shape) not in allowed:
                        assert f"{colour} {shape}" not in neg
            kinds.add("relation" if neg.split()[:3] == scene.caption.split()[:3] else "swap")
    assert kinds == {"relation", "swap"}
