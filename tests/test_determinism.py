"""Determinism: the same seed and preset give the same images twice in a row on CPU.

Two fresh run folders train the `smoke` CLIP, diffusion prior and decoder through `stages.load_or_train`,
then turn a few held-out captions into images (caption -> z_i by the prior -> image by the decoder, with a
seeded generator). Everything must agree bit for bit: the trained weights, the training losses, the
embeddings, the images. A third run with another seed, and another sampling seed, must give other images
(so the comparison can fail). Takes ~15 s with OMP_NUM_THREADS=1.
"""
import pytest
import torch

from unclip_mini import stages

torch.set_num_threads(1)  # the same thread count in every run; smoke models are tiny anyway

STAGES = ("clip", "diffusion_prior", "decoder")
N_CAPTIONS = 4


def train_run(run_dir, seed=0):
    """A fresh smoke run with its CLIP, diffusion prior and decoder trained: (run, {stage: model})."""
    run = stages.Run("smoke", run_dir=run_dir, device="cpu", seed=seed)
    assert all(stages.read_record(run, s) is None for s in STAGES), "the run folder must be fresh"
    return run, {s: stages.load_or_train(run, s, verbose=False) for s in STAGES}


def generate(run, models, sample_seed=0):
    """Held-out captions -> z_i (diffusion prior) -> images (decoder), all noise from one seeded generator."""
    e = run.embeddings("heldout")
    n = slice(0, N_CAPTIONS)
    g = torch.Generator().manual_seed(sample_seed)
    z = models["diffusion_prior"].sample(e["text_embed"][n], e["text_tokens"][n], e["text_mask"][n], generator=g)
    images = models["decoder"].sample(image_embed=z, tokens=e["tokens"][n], generator=g)
    return z, images


def weights(run, models) -> dict:
    """Every trained tensor: the returned (EMA) models and each checkpoint's raw model and optimizer state."""
    out = {"clip.ema": models["clip"].model.state_dict(),
           "diffusion_prior.ema": models["diffusion_prior"].model.state_dict(),
           "decoder.ema": models["decoder"].state_dict()}
    for s in STAGES:
        ckpt = torch.load(run.folder.checkpoint_path(s), map_location="cpu", weights_only=True)
        out[f"{s}.model"] = ckpt["model"]
        out[f"{s}.adam_exp_avg"] = {str(k): v["exp_avg"] for k, v in ckpt["optimizer"]["state"].items()}
    return out


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for part in a:
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs between two runs of the same seed"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    return [train_run(root / name) for name in ("a", "b")]


def test_same_seed_and_preset_give_the_same_images_twice(two_runs):
    (run_a, models_a), (run_b, models_b) = two_runs
    assert_same_weights(weights(run_a, models_a), weights(run_b, models_b))
    for s in STAGES:
        rec_a, rec_b = stages.read_record(run_a, s), stages.read_record(run_b, s)
        assert rec_a["id"] == rec_b["id"]
        assert rec_a["history"]["loss"] == rec_b["history"]["loss"], f"{s}: training losses differ"
    emb_a, emb_b = run_a.embeddings("heldout"), run_b.embeddings("heldout")
    for k in emb_a:
        assert torch.equal(emb_a[k], emb_b[k]), f"cached CLIP embeddings {k} differ"

    z_a, images_a = generate(run_a, models_a)
    z_b, images_b = generate(run_b, models_b)
    assert images_a.shape == (N_CAPTIONS, 3, 16, 16) and images_a.dtype == torch.float32
    assert torch.isfinite(images_a).all() and images_a.std() > 0.01, "the images are not trivially constant"
    assert torch.equal(z_a, z_b), "the prior's z_i differ between two runs of the same seed"
    assert torch.equal(images_a, images_b), "the images differ between two runs of the same seed"
    # and twice in a row from the same models
    assert torch.equal(generate(run_a, models_a)[1], images_a)


def test_another_seed_gives_other_images(two_runs, tmp_path):
    (run_a, models_a), _ = two_runs
    z_a, images_a = generate(run_a, models_a)
    # another sampling seed, same models
    z_s, images_s = generate(run_a, models_a, sample_seed=1)
    assert not torch.equal(z_s, z_a) and not torch.equal(images_s, images_a)
    assert (images_s - images_a).abs().mean() > 1e-3
    # another training seed, same preset
    run_c, models_c = train_run(tmp_path / "c", seed=1)
    ema_a, ema_c = models_a["decoder"].state_dict(), models_c["decoder"].state_dict()
    assert any(not torch.equal(ema_a[k], ema_c[k]) for k in ema_a), "another seed trained the same decoder"
    z_c, images_c = generate(run_c, models_c)
    assert not torch.equal(images_c, images_a)
    assert (images_c - images_a).abs().mean() > 1e-3
