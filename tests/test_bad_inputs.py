"""Bad inputs and the error each gets.

Every error unclip_mini raises on purpose is an `UnclipError` subclass (unclip_mini/errors.py) whose
message names the problem and the fix. `CASES` below is the list: one row per bad input, with the
exact error class and the words the message must contain, split into what names the PROBLEM and what
names the FIX. `test_bad_input` runs each row (the test ids read as the list of bad inputs); a raw Python
error (KeyError, TypeError, a torch RuntimeError, a pickle error) leaking instead fails the row.

    bad input                               error            the message says: problem -> fix
    --------------------------------------  ---------------  -------------------------------------------------------
    images
    image size not a multiple of the U-Net  DataError        x is 15x15, not multiples of 2 -> crop or pad to 14x14
    upsampler input of unusable size        DataError        low_res is 5x5 -> crop or pad to a multiple of 2 px
    non-square image for CLIP               DataError        square images, got 16x12 -> centre-crop them first
    grey (1-channel) image for CLIP         DataError        got (2, 1, 16, 16) -> convert to RGB
    RGBA (4-channel) image for decoder      DataError        x has 4 channels -> pass x as [B, 3, H, W]
    one image without batch dimension       DataError        got (3, 16, 16) -> add the batch dimension (x[None])
    uint8 image for the upsampler           DataError        low_res are torch.uint8 -> convert with data.to_float
    data
    non-image file in an image folder       DataError        cannot read image a.png -> replace it / remove its line
    captions file names a missing image     DataError        names 'b.png', does not exist -> fix the name or add it
    image folder without captions file      DataError        no captions file -> create captions.jsonl (or .csv)
    captions file line that is not JSON     DataError        line 1 is not valid JSON -> write one object per line
    empty caption in a captions file        DataError        empty caption at ... line 2 -> write one or remove it
    empty caption to the text encoder       DataError        empty caption '' -> needs at least one word
    over-long caption                       CaptionTooLong   has 32 tokens, reads at most 24 -> shorten it
    configuration
    unknown preset (Run)                    ConfigError      unknown preset 'tiny' -> valid presets: smoke, toy, ...
    unknown preset (a component config)     ConfigError      unknown preset 'huge' for DecoderConfig -> valid presets
    invalid field value (a choice)          ConfigError      lr_schedule = 'linear' -> valid choices: 'constant', ...
    invalid field value (out of range)      ConfigError      p_drop_text = 1.5 -> valid: 0.0 <= value <= 1.0
    unknown field                           ConfigError      has no field 'widht' -> valid fields: ...
    unknown field in a config dict          ConfigError      Config has no field 'sead' -> valid fields: preset, ...
    CLIP and data resolutions disagree      ConfigError      clip.image_size = 32, data.resolution = 16 -> make equal
    papermill parameter of wrong type       ConfigError      steps='100' has type str -> pass it as `-p steps 500`
    stages and run folders
    unknown stage                           ConfigError      unknown stage 'vae' -> valid stages: clip, ...
    loading a stage never trained           ArtifactError    no trained 'decoder' -> stages.load_or_train(run, ...)
    loading a CLIP never trained            ArtifactError    no trained 'clip' -> load_or_train / python -m unclip_mini
    training before its prerequisite        ArtifactError    needs a trained 'clip' -> load_or_train(run, 'clip') first
    prerequisite deleted after training     ArtifactError    clip is now missing -> delete <run>/decoder to retrain
    stage trained on another CLIP           ArtifactError    clip is now clip-0000000000 -> delete <run>/decoder ...
    embeddings cache of another CLIP        ArtifactError    made from clip <id> -> delete <run>/clip, retrain it
    missing CLIP embeddings cache           CheckpointError  no clip artifact at ... -> delete <run>/clip, retrain it
    unreadable stage record                 ArtifactError    stage.json is unreadable -> delete it to retrain
    run folder not writable                 ArtifactError    not writable -> pass another folder / fix permissions
    checkpoints
    checkpoint of random bytes              CheckpointError  corrupt, truncated or not a checkpoint -> delete, retrain
    truncated checkpoint (first half)       CheckpointError  corrupt, truncated (zip archive) -> delete, retrain
    checkpoint of another stage             CheckpointError  holds a 'diffusion_prior' one -> pass the decoder's
    torch file that is not a checkpoint     CheckpointError  not an unclip_mini checkpoint -> pass one it wrote
    checkpoint without its provenance       CheckpointError  no provenance record ('meta') -> retrain the stage
    checkpoint holding pickled objects      CheckpointError  not a checkpoint (UnpicklingError) -> retrain the stage
    resume a checkpoint of another config   CheckpointError  config.train.lr: 0.001 -> 0.002 -> same preset or delete
    corrupt exported CLIP (open_clip dir)   CheckpointError  could not load the CLIP -> delete the folder, retrain
    named CLIP weights file missing         CheckpointError  does not exist -> fix clip.pretrained or set it to None
    devices and training
    "cuda" on a machine without a GPU       DeviceError      no CUDA GPU -> use device='cpu' or 'auto'
    unknown device name                     DeviceError      unknown device 'banana' -> use 'auto', 'cpu', 'cuda'
    NaN loss                                TrainingDiverged nan at step 4, last good step 2 -> lower the lr, resume
    models and sampling
    AR prior: more components than dims     ConfigError      n_components = 20, 16 dims -> ask for at most 16
    AR prior: fewer than 2 buckets          ConfigError      n_buckets = 1 -> needs at least 2 buckets
    AR prior: PCA on too few samples        DataError        3 embeddings for 4 components -> fit on more / fewer
    negative guidance scale (prior)         ConfigError      guidance_scale = -1.0 -> must be >= 0
    negative guidance scale (decoder)       ConfigError      guidance_scale = -2.0 -> must be >= 0
    sampling steps > trained (decoder)      ConfigError      steps = 1000 -> must be in 2..100 (the training chain)
    decoder config: 1 sampling step         ConfigError      sample_steps = 1 -> valid: 2 <= value <= 100
    sampling steps > trained (prior)        ConfigError      steps = 5000 -> must be an int in 2..100
    z_i of another CLIP (wrong dims)        DataError        (2, 8) must be [B, 16] -> use the decoder's CLIP
    FID of features of different dims       DataError        feature dims differ (4 vs 5) -> embed both with one CLIP
    generate (text -> image)
    generate: empty caption                 DataError        empty caption '' -> needs at least one word
    generate: caption over the context      CaptionTooLong   has 32 tokens, reads at most 24 -> shorten it
    generate: no trained run in the folder  ArtifactError    no trained unCLIP in ... -> python -m unclip_mini course
    generate: one stage missing             ArtifactError    no trained upsampler2 stage -> python -m ... train it
    generate: unknown prior                 ConfigError      unknown prior 'gan' -> valid priors: diffusion, ar
    generate: a size no stage makes         ConfigError      size 100: makes 16, 64, 256 px -> pick one of those
    generate: fewer than one image          ConfigError      n_per_caption = 0 -> at least 1 image per caption
    generate: output that cannot be written ArtifactError    folder ... does not exist -> create it / another --out
    generate: output not a PNG              ArtifactError    must be a .png file -> pass e.g. --out samples.png

The trained-stage rows work on a copy of one smoke run (CLIP, both priors, decoder and upsamplers, trained once
for the module in a few seconds). Run with `OMP_NUM_THREADS=1 python -m pytest -q tests/test_bad_inputs.py`.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from unclip_mini import ar_prior, clip_model, metrics, notebook, real_data, stages, train, upsampler
from unclip_mini import decoder as D
from unclip_mini import diffusion_prior as dp
from unclip_mini.errors import (ArtifactError, CaptionTooLong, CheckpointError, ConfigError, DataError,
                                DeviceError, TrainingDiverged, UnclipError)
from unclip_mini.artifacts import check_output_path
from unclip_mini.unet import UNetModel

torch.set_num_threads(1)  # smoke models are tiny; the machine is shared


# ---------------------------------------------------------------------------------------------
# what the cases work with
# ---------------------------------------------------------------------------------------------

class Ctx:
    """Handed to every case: a fresh folder, and runs (empty, or a copy of the trained smoke run)."""

    def __init__(self, tmp: Path, request):
        self.tmp, self._request = tmp, request

    def empty_run(self) -> stages.Run:
        return stages.Run("smoke", run_dir=self.tmp / "empty_run", device="cpu")

    def trained_run(self) -> stages.Run:
        """A private copy of the module's trained smoke run (clip, diffusion_prior, decoder)."""
        src = self._request.getfixturevalue("trained_dir")
        dst = self.tmp / "run"
        shutil.copytree(src, dst)
        return stages.Run("smoke", run_dir=dst, device="cpu")


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained_smoke_run")
    run = stages.Run("smoke", run_dir=root, device="cpu")
    for name in ("clip", "diffusion_prior", "ar_prior", "decoder", "upsampler1", "upsampler2"):
        stages.load_or_train(run, name, verbose=False)
    return root


def pipeline(ctx):
    return stages.load_pipeline(ctx.trained_run())


def pipeline_missing_a_stage(ctx):
    run = ctx.trained_run()
    shutil.rmtree(run.folder.root / "upsampler2")
    stages.load_pipeline(run)


@functools.cache
def smoke_decoder() -> D.Decoder:
    torch.manual_seed(0)
    return D.Decoder(D.DecoderConfig.smoke()).eval()


@functools.cache
def smoke_clip() -> clip_model.ClipEncoder:
    cfg = clip_model.ClipConfig.smoke()
    torch.manual_seed(0)
    return clip_model.ClipEncoder(*clip_model.create_clip(cfg), cfg)


@functools.cache
def smoke_prior() -> dp.DiffusionPrior:
    cfg = dp.DiffusionPriorConfig.smoke()
    torch.manual_seed(0)
    return dp.DiffusionPrior(dp.DiffusionPriorNetwork(cfg, 16, 32, 24), cfg)


def prior_inputs(b=2, length=5):
    g = torch.Generator().manual_seed(0)
    return (torch.nn.functional.normalize(torch.randn(b, 16, generator=g), dim=-1),
            torch.randn(b, length, 32, generator=g), torch.ones(b, length, dtype=torch.bool))


def decoder_inputs(b=2):
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(b, 16, generator=g), dim=-1)
    tokens = torch.zeros(b, 6, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, 320, 49407   # start, "a a a", end
    return torch.randn(b, 3, 16, 16, generator=g), torch.tensor([3, 7][:b]), z, tokens


def image_folder(ctx, lines, files=("a.png",), image_bytes=b"this is text, not a PNG") -> Path:
    root = ctx.tmp / "images"
    root.mkdir()
    for f in files:
        (root / f).write_bytes(image_bytes)
    if lines is not None:
        (root / "captions.jsonl").write_text("".join(
            (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return root


class Pickled:
    """An arbitrary object: a file holding one is refused by weights_only loading."""


# ---------------------------------------------------------------------------------------------
# the triggers that need more than one line
# ---------------------------------------------------------------------------------------------

def upsample_5px(ctx):
    cfg = upsampler.UpsamplerConfig.stage2("smoke")       # U-Net factor 8: inputs must be multiples of 2 px
    up = upsampler.Upsampler(cfg, UNetModel(cfg.unet), "cpu")
    up.upsample(torch.zeros(1, 3, 5, 5), steps=2)


def folder_non_image(ctx):
    root = image_folder(ctx, [{"file": "a.png", "caption": "a red circle"}])
    real_data.ImageCaptionFolder(root, resolution=16).images()  # the images are read lazily


def set_clip_id(run, new_id="clip-0000000000"):
    """Pretend the CLIP was retrained since (its record now has another id)."""
    path = run.folder.root / "clip" / "stage.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "id": new_id}))
    return run


def damage(run, stage, how):
    path = run.folder.root / stage / "checkpoint.pt"
    blob = path.read_bytes()
    path.write_bytes(how(blob))
    return run


def other_stage_checkpoint(ctx):
    run = ctx.trained_run()
    root = run.folder.root
    shutil.copyfile(root / "diffusion_prior" / "checkpoint.pt", root / "decoder" / "checkpoint.pt")
    stages.load_or_train(run, "decoder", verbose=False)


def resume_with_other_config(ctx):
    """Training was interrupted (checkpoint, no stage.json), then the config changed before resuming."""
    run = ctx.trained_run()
    (run.folder.root / "decoder" / "stage.json").unlink()
    dec = run.cfg.decoder
    run.cfg = run.cfg.replace(decoder=dec.replace(train=dec.train.replace(lr=2e-3)))
    stages.load_or_train(run, "decoder", verbose=False)


def prerequisite_deleted(ctx):
    run = ctx.trained_run()
    shutil.rmtree(run.folder.root / "clip")
    stages.load_or_train(run, "decoder", verbose=False)


def embeddings_cache_missing(ctx):
    run = ctx.trained_run()
    (run.folder.root / "clip" / "embeddings.pt").unlink()
    run.embeddings("train")


def corrupt_clip_weights(ctx):
    run = ctx.trained_run()
    (run.folder.root / "clip" / "open_clip" / "open_clip_pytorch_model.bin").write_bytes(b"garbage")
    clip_model.load_local_dir(run.folder.root / "clip" / "open_clip")  # the exported open_clip folder


def unreadable_record(ctx):
    run = ctx.empty_run()
    run.folder.path("clip", "stage.json").write_text("{not json")
    stages.load_or_train(run, "clip", verbose=False)


def run_folder_not_writable(ctx):
    ro = ctx.tmp / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        target = ro / "run"
        if os.access(ro, os.W_OK):  # root ignores permissions; a path under a regular file fails for anyone
            blocker = ctx.tmp / "a_file"
            blocker.write_text("not a folder")
            target = blocker / "run"
        stages.Run("smoke", run_dir=target, device="cpu")
    finally:
        ro.chmod(0o700)


def checkpoint_file(ctx, obj, name="file.pt"):
    path = ctx.tmp / name
    torch.save(obj, path)
    return path


def nan_loss(ctx):
    calls = {"n": 0}

    def loss_fn(model, x, g):
        calls["n"] += 1
        loss = (model(x) ** 2).mean()
        return (loss * float("nan") if calls["n"] == 4 else loss), {}

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    cfg = train.TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, ckpt_every=2, log_every=1)
    torch.manual_seed(0)
    train.Trainer(torch.nn.Linear(4, 4), loss_fn, lambda i: x[i], len(x), cfg, ctx.tmp / "ckpt.pt",
                  stage="tiny", config={"a": 1}, progress=False, device="cpu").fit()


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    trigger: Callable[[Ctx], object]
    error: type
    problem: list      # substrings (or compiled regexes) naming the problem
    fix: list          # ... naming the fix
    skip: str | None = None  # a reason to skip on this machine


NO_GPU = "this machine has a CUDA GPU" if torch.cuda.is_available() else None
R = re.compile

CASES = [
    # -- images ---------------------------------------------------------------------------------
    Case("image_size_not_multiple_of_unet",
         lambda c: smoke_decoder()(torch.zeros(2, 3, 15, 15), *decoder_inputs()[1:]),
         DataError, ["x is 15x15", "multiples of 2"], ["crop or pad to 14x14"]),
    Case("upsampler_input_of_unusable_size", upsample_5px,
         DataError, ["low_res is 5x5", "(20x20) must be a multiple of the U-Net's factor 8"],
         ["crop or pad the input to a multiple of 2 px"]),
    Case("non_square_image_for_clip",
         lambda c: smoke_clip().encode_image(torch.zeros(2, 3, 16, 12, dtype=torch.uint8)),
         DataError, ["CLIP expects square images, got 16x12"], ["centre-crop them first"]),
    Case("grey_image_for_clip",
         lambda c: smoke_clip().encode_image(torch.zeros(2, 1, 16, 16, dtype=torch.uint8)),
         DataError, ["CLIP expects images [B, 3, H, W], got (2, 1, 16, 16)"], ["convert to RGB"]),
    Case("rgba_image_for_decoder",
         lambda c: smoke_decoder()(torch.zeros(2, 4, 16, 16), *decoder_inputs()[1:]),
         DataError, ["x has 4 channels", "expects in_channels=3"], ["pass x as [B, 3, H, W]"]),
    Case("image_without_batch_dimension",
         lambda c: smoke_decoder()(torch.zeros(3, 16, 16), *decoder_inputs()[1:]),
         DataError, ["[B, 3, H, W], got (3, 16, 16)"], ["add the batch dimension (x[None])"]),
    Case("uint8_image_for_upsampler",
         lambda c: upsampler.Upsampler(upsampler.UpsamplerConfig.stage1("smoke"),
                                       UNetModel(upsampler.UpsamplerConfig.stage1("smoke").unet), "cpu")
         .upsample(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)),
         DataError, ["low_res are torch.uint8"], ["convert with data.to_float(images)"]),

    # -- data -----------------------------------------------------------------------------------
    Case("non_image_file_in_image_folder", folder_non_image,
         DataError, ["cannot read image", "a.png", "UnidentifiedImageError"],
         ["replace it with a valid PNG/JPEG", "remove its line from the captions file"]),
    Case("captions_name_a_missing_image",
         lambda c: real_data.ImageCaptionFolder(image_folder(c, [{"file": "b.png", "caption": "a red circle"}])),
         DataError, ["line 1 names 'b.png'", "does not exist"], ["fix the name or add the image"]),
    Case("image_folder_without_captions_file",
         lambda c: real_data.ImageCaptionFolder(image_folder(c, None)),
         DataError, ["no captions file in"], ['create captions.jsonl with lines like {"file": "a.png"']),
    Case("captions_line_not_json",
         lambda c: real_data.ImageCaptionFolder(image_folder(c, ["{'file': 'a.png'}"])),
         DataError, ["captions.jsonl line 1 is not valid JSON"], ["write one object per line"]),
    Case("empty_caption_in_captions_file",
         lambda c: real_data.ImageCaptionFolder(image_folder(c, [{"file": "a.png", "caption": "a red circle"},
                                                            {"file": "a.png", "caption": "   "}])),
         DataError, ["empty caption at", "captions.jsonl line 2"], ["write a caption or remove the line"]),
    Case("empty_caption", lambda c: smoke_clip().tokenize(["a red circle", ""]),
         DataError, ["empty caption ''"], ["every caption needs at least one word"]),
    Case("over_long_caption", lambda c: smoke_clip().tokenize(["a red circle " * 10]),
         CaptionTooLong, ["has 32 tokens but the text encoder reads at most 24"], ["shorten it"]),

    # -- configuration --------------------------------------------------------------------------
    Case("unknown_preset", lambda c: stages.Run("tiny", run_dir=c.tmp / "run"),
         ConfigError, ["unknown preset 'tiny'"], ["valid presets: smoke, toy, small, paper"]),
    Case("unknown_preset_of_a_component", lambda c: D.DecoderConfig.preset("huge"),
         ConfigError, ["unknown preset 'huge' for DecoderConfig"], ["valid presets: smoke, toy, small, paper"]),
    Case("invalid_choice", lambda c: train.TrainConfig(lr_schedule="linear"),
         ConfigError, ["TrainConfig.lr_schedule = 'linear' is not a valid choice"],
         ["valid choices: 'constant', 'cosine'"]),
    Case("value_out_of_range", lambda c: D.DecoderConfig.smoke().replace(p_drop_text=1.5),
         ConfigError, ["DecoderConfig.p_drop_text = 1.5 is out of range"], ["valid: 0.0 <= value <= 1.0"]),
    Case("unknown_field", lambda c: clip_model.ClipConfig.smoke().replace(widht=3),
         ConfigError, ["ClipConfig has no field 'widht'"], ["valid fields: arch, pretrained, embed_dim"]),
    Case("unknown_field_in_config_dict", lambda c: stages.Config.from_dict({"preset": "smoke", "sead": 1}),
         ConfigError, ["Config has no field 'sead'"], ["valid fields: preset, seed, data, clip"]),
    Case("clip_and_data_resolution_differ",
         lambda c: stages.Config(preset="smoke", clip=clip_model.ClipConfig.smoke().replace(image_size=32)),
         ConfigError, ["clip.image_size = 32 but data.resolution = 16"], ["make them equal"]),
    Case("papermill_parameter_of_wrong_type", lambda c: notebook.setup(steps="100", run_dir=str(c.tmp / "run")),
         ConfigError, ["notebook parameter steps='100' has type str but must be int or None"],
         ["pass it as `-p steps 500` to papermill"]),

    # -- stages and run folders -----------------------------------------------------------------
    Case("unknown_stage", lambda c: stages.load_or_train(c.empty_run(), "vae", verbose=False),
         ConfigError, ["unknown stage 'vae'"], ["valid stages: clip, diffusion_prior, ar_prior"]),
    Case("load_stage_never_trained", lambda c: stages.load_stage(c.empty_run(), "decoder"),
         ArtifactError, ["no trained 'decoder' stage in"], ["call stages.load_or_train(run, 'decoder')"]),
    Case("load_clip_never_trained", lambda c: stages.load_stage(c.empty_run(), "clip"),
         ArtifactError, ["no trained 'clip' stage in"],
         ["stages.load_or_train(run, 'clip')", "python -m unclip_mini train clip --preset smoke"]),
    Case("train_stage_without_its_prerequisite", lambda c: stages.train_stage(c.empty_run(), "decoder"),
         ArtifactError, ["stage 'decoder' needs a trained 'clip' stage"],
         ["call stages.load_or_train(run, 'clip') first"]),
    Case("prerequisite_deleted_after_training", prerequisite_deleted,
         ArtifactError, [R(r"stage 'decoder' .* was trained from clip clip-\w{10}, but the clip there is now missing")],
         [R(r"delete \S+/decoder to retrain decoder on the current clip")]),
    Case("stage_trained_on_another_clip",
         lambda c: stages.load_or_train(set_clip_id(c.trained_run()), "decoder", verbose=False),
         ArtifactError, [R(r"was trained from clip clip-\w{10}, but the clip there is now clip-0000000000")],
         [R(r"delete \S+/decoder to retrain decoder on the current clip")]),
    Case("embeddings_cache_of_another_clip",
         lambda c: set_clip_id(c.trained_run()).embeddings("train"),
         ArtifactError, [R(r"embeddings\.pt was made from clip 'clip-\w{10}', but the current clip is "
                           r"'clip-0000000000'")],
         [R(r"Rebuild it: delete \S+/clip and retrain the clip stage")]),
    Case("embeddings_cache_missing", embeddings_cache_missing,
         CheckpointError, [R(r"no clip artifact at \S+/clip/embeddings\.pt")],
         [R(r"delete \S+/clip and retrain the clip stage")]),
    Case("stage_record_unreadable", unreadable_record,
         ArtifactError, [R(r"clip/stage\.json is unreadable")], ["delete it to retrain stage 'clip'"]),
    Case("run_folder_not_writable", run_folder_not_writable,
         ArtifactError, [R(r"run folder \S+ is not writable")],
         ["pass another folder (--out / run_dir=...) or fix its permissions"]),

    # -- checkpoints ----------------------------------------------------------------------------
    Case("checkpoint_of_random_bytes",
         lambda c: stages.load_or_train(damage(c.trained_run(), "decoder", lambda b: os.urandom(len(b) // 2)),
                                        "decoder", verbose=False),
         CheckpointError, [R(r"decoder/checkpoint\.pt is corrupt, truncated or not a checkpoint")],
         [R(r"delete \S+/decoder and retrain the decoder stage")]),
    Case("checkpoint_truncated",
         lambda c: stages.load_or_train(damage(c.trained_run(), "decoder", lambda b: b[: len(b) // 2]),
                                        "decoder", verbose=False),
         CheckpointError, [R(r"decoder/checkpoint\.pt is corrupt, truncated or not a checkpoint"), "zip archive"],
         [R(r"delete \S+/decoder and retrain the decoder stage")]),
    Case("checkpoint_of_another_stage", other_stage_checkpoint,
         CheckpointError, ["holds a 'diffusion_prior' checkpoint, not a 'decoder' one"],
         ["pass the decoder checkpoint (runs/<preset>/decoder/checkpoint.pt)"]),
    Case("torch_file_that_is_not_a_checkpoint",
         lambda c: train.load_checkpoint(checkpoint_file(c, {"weights": torch.zeros(2)})),
         CheckpointError, ["is not an unclip_mini training checkpoint"], ["pass a checkpoint this library wrote"]),
    Case("checkpoint_without_provenance",
         lambda c: train.load_checkpoint(checkpoint_file(c, {"format": train.CHECKPOINT_FORMAT, "step": 3}),
                                         stage="decoder", fix="retrain the decoder stage"),
         CheckpointError, ["has no provenance record ('meta')"], ["retrain the decoder stage"]),
    Case("checkpoint_with_pickled_objects",
         lambda c: train.load_checkpoint(checkpoint_file(c, {"model": Pickled()}), fix="retrain the stage"),
         CheckpointError, ["is corrupt, truncated or not a checkpoint", "UnpicklingError"], ["retrain the stage"]),
    Case("resume_checkpoint_of_another_config", resume_with_other_config,
         CheckpointError, [R(r"decoder/checkpoint\.pt was trained with another config "
                             r"\(config\.train\.lr: 0\.001 -> 0\.002\)")],
         [R(r"use the matching preset, or delete the folder \S+/decoder to retrain")]),
    Case("clip_weights_corrupt", corrupt_clip_weights,
         CheckpointError, ["open_clip could not load the CLIP in"], ["delete the folder and retrain the clip stage"]),
    Case("clip_weights_file_missing",
         lambda c: clip_model.create_clip(clip_model.ClipConfig.paper().replace(pretrained="/nowhere/vit_h.pt")),
         CheckpointError, ["CLIP weights file /nowhere/vit_h.pt does not exist"],
         ["fix clip.pretrained or set it to None to train a CLIP here"]),

    # -- devices and training -------------------------------------------------------------------
    Case("device_cuda_not_available", lambda c: stages.Run("smoke", run_dir=c.tmp / "run", device="cuda"),
         DeviceError, ["device 'cuda' was requested but this machine has no CUDA GPU"],
         ["use device='cpu' or 'auto'"], skip=NO_GPU),
    Case("device_unknown", lambda c: stages.Run("smoke", run_dir=c.tmp / "run", device="banana"),
         DeviceError, ["unknown device 'banana'"], ["use 'auto', 'cpu', 'cuda' or 'cuda:N'"]),
    Case("nan_loss", nan_loss,
         TrainingDiverged,
         ["tiny: the loss is nan at step 4", R(r"the last good checkpoint is \S+ckpt\.pt \(step 2\)")],
         ["Lower the learning rate (train.lr = 0.01)", "then resume or retrain"]),

    # -- models and sampling --------------------------------------------------------------------
    Case("ar_prior_more_components_than_dims",
         lambda c: ar_prior.PCAQuantizer.fit(torch.randn(50, 16), n_components=20),
         ConfigError, ["n_components = 20 but the image embedding has only 16 dimensions"],
         ["ask for at most 16 components"]),
    Case("ar_prior_fewer_than_two_buckets",
         lambda c: ar_prior.PCAQuantizer.fit(torch.randn(50, 16), n_components=4, n_buckets=1),
         ConfigError, ["n_buckets = 1"], ["a quantizer needs at least 2 buckets"]),
    Case("ar_prior_pca_on_too_few_samples",
         lambda c: ar_prior.PCAQuantizer.fit(torch.randn(3, 16), n_components=4),
         DataError, ["PCA was given 3 image embeddings but must find 4 components"],
         ["fit it on more than 4 embeddings", "keep fewer components"]),
    Case("prior_negative_guidance_scale", lambda c: smoke_prior().sample(*prior_inputs(), guidance_scale=-1.0),
         ConfigError, ["guidance_scale = -1.0"], ["must be >= 0 (1 = no guidance, 0 = unconditional)"]),
    Case("decoder_negative_guidance_scale",
         lambda c: smoke_decoder().sample(*decoder_inputs()[2:], guidance_scale=-2.0, steps=2),
         ConfigError, ["guidance_scale = -2.0"], ["must be >= 0 (1 = no guidance, 0 = unconditional)"]),
    Case("decoder_more_sampling_steps_than_trained",
         lambda c: smoke_decoder().sample(*decoder_inputs()[2:], steps=1000),
         ConfigError, ["steps = 1000"], ["must be in 2..100 (the training chain)"]),
    Case("decoder_config_one_sampling_step", lambda c: D.DecoderConfig.smoke().replace(sample_steps=1),
         ConfigError, ["DecoderConfig.sample_steps = 1 is out of range"], ["valid: 2 <= value <= 100"]),
    Case("prior_more_sampling_steps_than_trained", lambda c: smoke_prior().sample(*prior_inputs(), steps=5000),
         ConfigError, ["steps = 5000"], ["must be an int in 2..100"]),
    Case("image_embedding_of_another_clip",
         lambda c: smoke_decoder().sample(decoder_inputs()[2][:, :8], decoder_inputs()[3]),
         DataError, ["image_embed has shape (2, 8) but must be [B, 16]"],
         ["use the embeddings of the CLIP this decoder was trained with"]),
    Case("fid_features_of_different_dims",
         lambda c: metrics.frechet_distance(torch.randn(10, 4), torch.randn(10, 5)),
         DataError, ["feature dims differ (4 vs 5)"], ["embed both sets with the same CLIP"]),

    # -- generate (text -> image) ---------------------------------------------------------------
    Case("generate_empty_caption", lambda c: pipeline(c).generate(["a red circle", " "]),
         DataError, ["empty caption ' '"], ["every caption needs at least one word"]),
    Case("generate_caption_too_long", lambda c: pipeline(c).generate(["a red circle " * 10]),
         CaptionTooLong, ["has 32 tokens but the text encoder reads at most 24"], ["shorten it"]),
    Case("generate_no_trained_run", lambda c: stages.load_pipeline(c.empty_run()),
         ArtifactError, [R(r"no trained unCLIP in \S+empty_run")],
         ["python -m unclip_mini course --preset smoke", "python -m unclip_mini train STAGE"]),
    Case("generate_one_stage_missing", pipeline_missing_a_stage,
         ArtifactError, [R(r"the run folder \S+ has no trained upsampler2 stage")],
         ["`python -m unclip_mini train upsampler2 --preset smoke --run-dir"]),
    Case("generate_unknown_prior", lambda c: pipeline(c).generate(["a red circle"], prior="gan"),
         ConfigError, ["unknown prior 'gan'"], ["valid priors: diffusion, ar"]),
    Case("generate_size_no_stage_makes", lambda c: pipeline(c).generate(["a red circle"], size=100),
         ConfigError, ["size 100: this stack makes 16, 64, 256 px"], ["pick one of those"]),
    Case("generate_fewer_than_one_image", lambda c: pipeline(c).generate(["a red circle"], n_per_caption=0),
         ConfigError, ["n_per_caption = 0"], ["ask for at least 1 image per caption"]),
    Case("generate_output_cannot_be_written",
         lambda c: check_output_path(c.tmp / "no_such_folder" / "samples.png", ".png"),
         ArtifactError, [R(r"cannot write \S+samples\.png: the folder \S+no_such_folder does not exist")],
         ["create it or pass another --out"]),
    Case("generate_output_not_a_png", lambda c: check_output_path(c.tmp / "samples.jpg", ".png"),
         ArtifactError, [R(r"output \S+samples\.jpg must be a \.png file")], ["pass e.g. --out samples.png"]),
]


def _found(pattern, message: str) -> bool:
    return bool(pattern.search(message)) if isinstance(pattern, re.Pattern) else pattern in message


def _params():
    return [pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=c.skip)] if c.skip else [])
            for c in CASES]


@pytest.fixture
def ctx(tmp_path, request):
    return Ctx(tmp_path, request)


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, ctx):
    try:
        case.trigger(ctx)
    except UnclipError as e:
        err = e
    except Exception as e:  # noqa: BLE001 - a raw error is exactly what this test is for
        pytest.fail(f"{case.id}: a raw {type(e).__name__} leaked instead of an unclip_mini error: {e}")
    else:
        pytest.fail(f"{case.id}: no error was raised")
    msg = str(err)
    assert type(err) is case.error, f"{case.id}: got {type(err).__name__}, expected {case.error.__name__}: {msg}"
    missing = [p.pattern if isinstance(p, re.Pattern) else p for p in case.problem if not _found(p, msg)]
    assert not missing, f"{case.id}: the message does not name the problem {missing}: {msg}"
    missing = [p.pattern if isinstance(p, re.Pattern) else p for p in case.fix if not _found(p, msg)]
    assert not missing, f"{case.id}: the message does not name the fix {missing}: {msg}"


# ---------------------------------------------------------------------------------------------
# the table itself
# ---------------------------------------------------------------------------------------------

GENERIC = ["invalid input", "ValueError: bad value", "error: something went wrong, please fix your input",
           "RuntimeError: failed", "cannot load file: corrupt", "the stage failed; retrain it", ""]


def test_the_table_covers_every_category_and_its_expectations_are_specific():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 20
    for c in CASES:
        assert issubclass(c.error, UnclipError), c.id
        assert c.problem and c.fix, f"{c.id}: needs words for both the problem and the fix"
        for p in c.problem + c.fix:  # a generic message would fail every row
            assert not any(_found(p, g) for g in GENERIC), f"{c.id}: {p!r} would pass on a generic message"
        assert max(len(p.pattern if isinstance(p, re.Pattern) else p) for p in c.problem) >= 12, c.id
    for kind in ("size", "grey", "non_image", "empty_caption", "long_caption", "unknown_preset", "invalid_choice",
                 "unknown_stage", "never_trained", "random_bytes", "truncated", "another_stage", "another_config",
                 "another_clip", "cuda", "papermill", "not_writable", "nan_loss", "ar_prior", "guidance",
                 "sampling_steps", "embeddings_cache_missing", "generate_"):
        assert any(kind in i for i in ids), f"no case for {kind}"
    rows = re.findall(r"^    .{40}(?:\w+Error|CaptionTooLong|TrainingDiverged) ", __doc__, re.M)
    assert len(rows) == len(CASES), f"the docstring's table has {len(rows)} rows for {len(CASES)} cases"
