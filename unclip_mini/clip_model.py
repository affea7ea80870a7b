"""CLIP: the joint text-image embedding that unCLIP generates from (unCLIP §2, Radford et al. 2021).

Everything here goes through open_clip: the model classes, the tokenizer, the contrastive loss and the
loading code. Two ways to get a CLIP:

- **Train one** (the `toy` and `small` presets): a tiny custom open_clip architecture (small ViT + small
  text transformer) is registered with `open_clip.add_model_config` and trained contrastively on the
  toy world. The result is exported as an open_clip `local-dir:` folder and loaded back through
  `open_clip.create_model`, so the same path serves a CLIP someone else trained. With `hard_negatives`
  two-object captions also bring a copy with one binding swapped (colours, shapes or the relation) as a
  negative of their image (`hard_negative_loss`). Without them the toy CLIP barely tells a relation from
  its reverse; with them it does, but at toy the decoder and the text diffs came out worse, so it is off
  there (the README's recipes table has the measurements).
- **Name pretrained weights** (`ClipConfig.paper()`): an open_clip architecture and a pretrained tag or
  a local weights file, used frozen. Tags need the network once; offline they fail with a clear error.

Later stages use one interface, `ClipEncoder`: `encode_text` gives the pooled, normalized text embedding
z_t (`text_embed [B, D]`) plus the per-token features the priors and the decoder read (`text_tokens
[B, L, W]`, `text_mask [B, L]`); `encode_image` gives the normalized image embedding z_i
(`image_embed [B, D]`). Both are batched, no_grad and device-aware.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from .progress import tqdm

from .artifacts import atomic_torch_save, atomic_write_json
from .config import PresetConfig, check, check_positive, check_range
from .errors import CaptionTooLong, CheckpointError, ConfigError, DataError
from .train import StageSpec, TrainConfig

VOCAB_SIZE = 49408  # open_clip's BPE vocabulary (the tokenizer is shared by every architecture here)


@dataclass(frozen=True)
class ClipConfig(PresetConfig):
    """Which CLIP, and how to train it when it is ours."""
    arch: str = "custom"            # 'custom' = the architecture below; else an open_clip name (paper: 'ViT-H-14')
    pretrained: str | None = None   # open_clip tag or weights file (paper: laion2b ViT-H); None = train here
    embed_dim: int = 64             # dim of z_i and z_t (paper: 1024)
    image_size: int = 32            # input resolution (= the data's base resolution; paper: 224)
    patch_size: int = 8             # ViT patch (paper: 14); 8 px = a quarter of a toy cell, 16 tokens
    vision_width: int = 128         # ViT width (paper: 1280)
    vision_layers: int = 3          # ViT depth (paper: 32)
    vision_head_width: int = 32     # channels per attention head (paper: 80)
    text_width: int = 128           # text transformer width = per-token feature width (paper: 1024)
    text_layers: int = 3            # (paper: 24)
    text_heads: int = 4             # (paper: 16)
    context_length: int = 24        # max caption tokens incl. start/end (paper: 77)
    hard_negatives: float = 0.0     # slots per batch (fraction of it) for two-object captions with one binding
                                    # swapped, as negatives of their images (NegCLIP); 0 = none (paper: none)
    # bf16: ~10% faster on a CPU with bf16 kernels (fp32 elsewhere; README, measurements)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2000, batch_size=128, lr=2e-3, warmup_steps=100, lr_schedule="cosine", weight_decay=0.1,
        betas=(0.9, 0.98), ema_decay=0.99, ckpt_every=500, precision="bf16"))

    def __post_init__(self):
        check_range(self, "hard_negatives", 0.0, 1.0)
        check_positive(self, "embed_dim", "image_size", "patch_size", "vision_width", "vision_layers",
                       "vision_head_width", "text_width", "text_layers", "text_heads", "context_length")
        if self.arch == "custom":
            check(self.image_size % self.patch_size == 0, self, "patch_size",
                  f"must divide image_size {self.image_size}")
            check(self.vision_width % self.vision_head_width == 0, self, "vision_head_width",
                  f"must divide vision_width {self.vision_width}")
            check(self.text_width % self.text_heads == 0, self, "text_heads",
                  f"must divide text_width {self.text_width}")

    @classmethod
    def smoke(cls):
        return cls(image_size=16, patch_size=4, vision_width=32, vision_layers=1, vision_head_width=16,
                   text_width=32, text_layers=1, text_heads=2, embed_dim=16, context_length=24,
                   train=TrainConfig(steps=20, batch_size=32, lr=2e-3, warmup_steps=5, ckpt_every=10,
                                     log_every=5, ema_decay=0.9))

    @classmethod
    def toy(cls):
        return cls()

    @classmethod
    def small(cls):
        return cls(image_size=64, patch_size=8, vision_width=384, vision_layers=6, vision_head_width=64,
                   text_width=384, text_layers=6, text_heads=6, embed_dim=256,
                   train=TrainConfig(steps=10000, batch_size=1024, lr=1e-3, warmup_steps=500,
                                     lr_schedule="cosine", weight_decay=0.1, betas=(0.9, 0.98),
                                     ema_decay=0.999, ckpt_every=1000, precision="bf16"))

    @classmethod
    def paper(cls):
        # unCLIP used OpenAI's ViT-H/16 CLIP (not public); open_clip's laion2b ViT-H-14 is the closest.
        return cls(arch="ViT-H-14", pretrained="laion2b_s32b_b79k", embed_dim=1024, image_size=224,
                   patch_size=14, vision_width=1280, vision_layers=32, vision_head_width=80,
                   text_width=1024, text_layers=24, text_heads=16, context_length=77)

    @property
    def trainable(self) -> bool:
        """True when this CLIP is trained here (no pretrained weights named)."""
        return self.pretrained is None

    def open_clip_config(self) -> dict:
        """The open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`) of the custom architecture."""
        return {"embed_dim": self.embed_dim,
                "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers,
                               "width": self.vision_width, "patch_size": self.patch_size,
                               "head_width": self.vision_head_width},
                "text_cfg": {"context_length": self.context_length, "vocab_size": VOCAB_SIZE,
                             "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers}}

    def model_name(self) -> str:
        """The name under which open_clip knows this architecture."""
        if self.arch != "custom":
            return self.arch
        blob = json.dumps(self.open_clip_config(), sort_keys=True).encode()
        return "unclip-mini-" + hashlib.sha256(blob).hexdigest()[:10]


# Our toy CLIP sees images in [-1, 1]: open_clip's normalisation with mean = std = 0.5 is exactly that.
CUSTOM_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs "No pretrained weights loaded" through the root logger when it builds a model we
    are about to train; that is expected here, so keep it out of notebook outputs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def register_architecture(cfg: ClipConfig) -> str:
    """Register the custom architecture with open_clip (a JSON config file) and return its name."""
    import open_clip
    name = cfg.model_name()
    if cfg.arch == "custom" and name not in open_clip.list_models():
        folder = Path(tempfile.gettempdir()) / "unclip_mini_open_clip_configs"
        atomic_write_json(cfg.open_clip_config(), folder / f"{name}.json")
        open_clip.add_model_config(folder / f"{name}.json")
    if name not in open_clip.list_models():
        raise ConfigError(f"open_clip has no architecture {name!r}: use ClipConfig.arch='custom' or one of "
                          f"open_clip.list_models() (e.g. 'ViT-B-32', 'ViT-H-14')")
    return name


def create_clip(cfg: ClipConfig, device="cpu"):
    """A fresh (random) custom CLIP, or open_clip's model with the named pretrained weights.

    Returns (model, tokenizer, preprocess dict with mean/std).
    """
    import open_clip
    name = register_architecture(cfg)
    pretrained = cfg.pretrained
    if pretrained is not None and not os.path.isfile(pretrained) and \
            (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".pth", ".safetensors"))):
        raise CheckpointError(f"CLIP weights file {pretrained} does not exist: fix clip.pretrained or set it "
                              f"to None to train a CLIP here")
    try:
        with _quiet_open_clip():
            model = open_clip.create_model(name, pretrained=pretrained, device=device)
    except RuntimeError as e:
        if pretrained and not os.path.isfile(pretrained):
            raise CheckpointError(
                f"open_clip could not load pretrained weights {pretrained!r} for {name} ({e}). This machine "
                f"may be offline: download them where there is network (open_clip.create_model('{name}', "
                f"pretrained='{pretrained}')) and set clip.pretrained to the local file") from e
        raise CheckpointError(f"open_clip could not load {pretrained!r} into {name}: {e}. Is it a "
                              f"checkpoint of this architecture?") from e
    if cfg.arch == "custom":
        pre = CUSTOM_PREPROCESS
    else:
        pre = {"mean": list(model.visual.image_mean or open_clip.OPENAI_DATASET_MEAN),
               "std": list(model.visual.image_std or open_clip.OPENAI_DATASET_STD)}
    return model, open_clip.get_tokenizer(name), pre


def export_local_dir(model, cfg: ClipConfig, folder) -> Path:
    """Write `model` as an open_clip `local-dir:` folder (open_clip_config.json + weights)."""
    folder = Path(folder)
    pre = {**CUSTOM_PREPROCESS, "size": [cfg.image_size, cfg.image_size]}
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                      folder / "open_clip_pytorch_model.bin")
    atomic_write_json({"model_cfg": cfg.open_clip_config(), "preprocess_cfg": pre},
                      folder / "open_clip_config.json")
    return folder


def load_local_dir(folder, device="cpu"):
    """Load a CLIP through open_clip's own `local-dir:` loading code. Returns (model, tokenizer, preprocess)."""
    import open_clip
    folder = Path(folder)
    if not (folder / "open_clip_config.json").is_file():
        raise CheckpointError(f"{folder} is not an open_clip model folder (no open_clip_config.json): "
                              f"train the CLIP stage first (`python -m unclip_mini train clip`)")
    try:
        with _quiet_open_clip():
            model = open_clip.create_model(f"local-dir:{folder}", device=device)
    except Exception as e:
        raise CheckpointError(f"open_clip could not load the CLIP in {folder} ({type(e).__name__}: "
                              f"{str(e)[:200]}): delete the folder and retrain the clip stage") from e
    with open(folder / "open_clip_config.json") as f:
        pre = json.load(f).get("preprocess_cfg", CUSTOM_PREPROCESS)
    return model, open_clip.get_tokenizer(f"local-dir:{folder}"), {"mean": pre["mean"], "std": pre["std"]}


# ---------------------------------------------------------------------------------------------
# the interface later stages use
# ---------------------------------------------------------------------------------------------

class ClipEncoder:
    """A frozen CLIP: captions -> (z_t, token features), images -> z_i. Batched, no_grad, device-aware."""

    def __init__(self, model, tokenizer, preprocess: dict, cfg: ClipConfig, device="cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer, self.cfg, self.device = tokenizer, cfg, torch.device(device)
        self.record = None  # the stage record, when it came from a run folder (stages.load_or_train)
        self.mean = torch.tensor(preprocess["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess["std"], device=device).view(1, 3, 1, 1)
        self.image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) \
            else model.visual.image_size
        self.context_length = model.context_length
        self.embed_dim = model.text_projection.shape[1] if isinstance(model.text_projection, torch.Tensor) \
            else model.text_projection.out_features
        self.text_width = model.ln_final.normalized_shape[0]

    # -- text ------------------------------------------------------------------------------
    def tokenize(self, captions) -> torch.Tensor:
        """Token ids `[B, context_length]`; an empty or over-long caption is an error, not a truncation."""
        return tokenize(self.tokenizer, captions, self.context_length)

    @torch.no_grad()
    def encode_text(self, captions_or_tokens, batch_size: int = 1024) -> dict:
        """{'text_embed' [B, D] (z_t, unit norm), 'text_tokens' [B, L, W], 'text_mask' [B, L], 'tokens'}."""
        tokens = captions_or_tokens if isinstance(captions_or_tokens, torch.Tensor) \
            else self.tokenize(captions_or_tokens)
        outs = [text_features(self.model, t.to(self.device)) for t in tokens.split(batch_size)]
        return {"text_embed": torch.cat([o[0] for o in outs]), "text_tokens": torch.cat([o[1] for o in outs]),
                "text_mask": torch.cat([o[2] for o in outs]), "tokens": tokens.cpu()}

    # -- images ----------------------------------------------------------------------------
    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B,3,H,W]` or float in [-1, 1] -> the model's normalised input at its resolution."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(f"CLIP expects images [B, 3, H, W], got {shape}: convert to RGB and batch them")
        if images.shape[2] != images.shape[3]:
            raise DataError(f"CLIP expects square images, got {images.shape[2]}x{images.shape[3]}: "
                            f"centre-crop them first")
        x = images.to(self.device)
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
        x = (x + 1) / 2  # [0, 1], then the model's own normalisation
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, batch_size: int = 1024, progress: bool = False) -> torch.Tensor:
        """z_i: unit-norm image embeddings `[B, D]`."""
        outs = []
        for chunk in tqdm(images.split(batch_size), desc="encode images", disable=not progress):
            outs.append(F.normalize(self.model.encode_image(self.prepare_images(chunk)).float(), dim=-1))
        return torch.cat(outs)


def tokenize(tokenizer, captions, context_length: int) -> torch.Tensor:
    """open_clip tokens `[B, L]`, refusing empty captions and captions that would be truncated."""
    if isinstance(captions, str):
        captions = [captions]
    for c in captions:
        if not isinstance(c, str) or not c.strip():
            raise DataError(f"empty caption {c!r}: every caption needs at least one word")
        n = len(tokenizer.encode(c)) + 2  # + start and end tokens
        if n > context_length:
            raise CaptionTooLong(f"caption {c[:60]!r}... has {n} tokens but the text encoder reads at most "
                                 f"{context_length}: shorten it")
    return tokenizer(list(captions))


def tokenizer_for(cfg: ClipConfig):
    """open_clip's tokenizer of the CLIP of config `cfg`: fixed by the config, trained or pretrained alike."""
    import open_clip
    return open_clip.get_tokenizer(register_architecture(cfg))


def caption_length(tokens: torch.Tensor) -> int:
    """The longest row's length of `tokens` `[N, L]`: start, words, end-of-text, then padding (id 0)."""
    return int((tokens != 0).sum(1).max())


def caption_tokens(cfg: ClipConfig, captions) -> torch.Tensor:
    """The token ids `[N, L]` int32 that the CLIP stage of config `cfg` caches for `captions` (`embed_dataset`:
    the same tokenizer, trimmed to the longest caption), made without a trained CLIP. A stage that reads captions
    but no embeddings (the GLIDE-style baseline) trains on these."""
    tokens = tokenize(tokenizer_for(cfg), captions, cfg.context_length)
    return tokens[:, :caption_length(tokens)].to(torch.int32)


def text_features(model, tokens: torch.Tensor):
    """Pooled z_t, per-token features and mask of open_clip's text tower (mirrors `CLIP.encode_text`).

    The per-token features are `ln_final`'s output `[B, L, W]`; z_t is the feature at the end-of-text
    token (the largest id in each row) through `text_projection`, normalised. Padding (id 0) follows
    the end-of-text token, so the mask is `position <= eot`.
    """
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))  # [B, L, W]
    eot = tokens.argmax(dim=-1)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]
    proj = model.text_projection
    pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
    mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot[:, None]
    return F.normalize(pooled.float(), dim=-1), x.float(), mask


# ---------------------------------------------------------------------------------------------
# contrastive training and evaluation
# ---------------------------------------------------------------------------------------------

def contrastive_loss_fn():
    """loss_fn for `train.Trainer`: open_clip's symmetric InfoNCE over a batch of (image, caption) pairs.

    The model is called through its forward (so a DistributedDataParallel wrapper averages the gradients),
    and under torchrun the loss sees the negatives of every process (`ClipLoss(gather_with_grad=True)`).
    """
    import open_clip
    from .train import dist_info
    rank, world = dist_info()
    loss = open_clip.ClipLoss(gather_with_grad=True, rank=rank, world_size=world)

    def fn(model, batch, generator):
        images, tokens = batch[:2]
        if len(batch) == 2:
            img, txt, scale = model(images, tokens)[:3]    # unit-norm features [b, D], exp(logit scale)
            value = loss(img, txt, scale)
        else:  # hard negatives: encoded in the same forward (the text tower takes more rows than images)
            img, both, scale = model(images, torch.cat([tokens, batch[2]]))[:3]
            txt, neg = both[:len(tokens)], both[len(tokens):]
            value = hard_negative_loss(img, txt, neg, batch[3], scale, rank, world)
        m = model.module if hasattr(model, "module") else model
        with torch.no_grad():  # keep the temperature in CLIP's range (logit scale <= 100)
            m.logit_scale.clamp_(0, 4.6052)
        return value, {"scale": scale.item()}
    return fn


def hard_negative_loss(img, txt, neg, owner, scale, rank: int = 0, world: int = 1):
    """Symmetric InfoNCE whose image -> text side also ranks each image's own hard negative caption.

    img, txt: unit-norm `[b, D]`; neg: unit-norm `[k, D]`, captions each false of one image in one binding
    (`data.hard_negative_caption`); owner `[k]` long: the row of img that neg[j] belongs to, -1 for an empty
    slot (at most one negative per image). Under torchrun every process's features are gathered (with
    gradients, `torch.distributed.nn.all_gather`), as `open_clip.ClipLoss(gather_with_grad=True)` does. The
    text -> image side is CLIP's own: a negative caption has no image.
    """
    if world > 1:
        from torch.distributed.nn import all_gather
        owner = torch.where(owner >= 0, owner + rank * len(img), owner)
        img, txt, neg = (torch.cat(all_gather(x)) for x in (img, txt, neg))
        owners = [torch.empty_like(owner) for _ in range(world)]
        torch.distributed.all_gather(owners, owner)
        owner = torch.cat(owners)
    labels = torch.arange(len(img), device=img.device)
    per_image = scale * img @ txt.T                                            # [B, B]
    live = owner >= 0
    rows = owner[live]
    own_neg = torch.full((len(img),), float("-inf"), device=img.device, dtype=per_image.dtype).index_put(
        (rows,), scale * (img[rows] * neg[live]).sum(-1))                      # [B]: -inf where an image has none
    i2t = F.cross_entropy(torch.cat([per_image, own_neg[:, None]], dim=1), labels)
    t2i = F.cross_entropy(per_image.T, labels)
    return (i2t + t2i) / 2


@torch.no_grad()
def class_embeddings(encoder: ClipEncoder, classes, templates=("{}",)) -> torch.Tensor:
    """"Create a dataset classifier from label text" (CLIP §3.1.2): one unit vector per class `[K, D]`.

    Each class name is put into every template and the text embeddings are averaged (CLIP's prompt
    ensembling), then renormalised.
    """
    per_template = [encoder.encode_text([t.format(c) for c in classes])["text_embed"] for t in templates]
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


@torch.no_grad()
def zero_shot_classify(encoder: ClipEncoder, image_embed: torch.Tensor, classes, templates=("{}",)):
    """Zero-shot classification: index of the most similar class embedding for each image `[B]`."""
    weights = class_embeddings(encoder, classes, templates).to(image_embed.device)
    return (image_embed @ weights.T).argmax(dim=-1)


def recall_at_1(text_embed: torch.Tensor, image_embed: torch.Tensor, same=None) -> float:
    """Text -> image retrieval: fraction of captions whose most similar image is their own.

    `same` (optional `[B, B]` bool) marks image j as an acceptable answer for caption i too (a toy-world
    caption like "a red circle" describes many images).
    """
    best = (text_embed @ image_embed.T).argmax(dim=-1)
    idx = torch.arange(len(best), device=best.device)
    hit = best == idx if same is None else same[idx, best]
    return hit.float().mean().item()


# ---------------------------------------------------------------------------------------------
# the stage: train (or name) a CLIP, export it for open_clip, cache the embeddings
# ---------------------------------------------------------------------------------------------

SPLITS = ("train", "val", "heldout")


NEG_BLOCK = 8  # hard-negative slots are counted per block of this many rows of a batch (see _batches)


def _batches(cfg: ClipConfig, dims, ctx):
    import math

    import numpy as np
    from .data import hard_negative_caption, to_float
    ds = ctx.dataset("train")
    images = ds.images(progress=False)
    tokenizer = tokenizer_for(cfg)
    tokens = tokenize(tokenizer, ds.captions(), cfg.context_length)
    device = ctx.device
    negatives = None
    if cfg.hard_negatives > 0:
        scenes, allowed = ds.scenes(), set(getattr(ctx.world, "train_pairs", ()))
        choice = np.random.default_rng([ctx.seed, 7]).random(len(scenes))
        captions = [hard_negative_caption(s, allowed, c) for s, c in zip(scenes, choice)]
        has_neg = torch.tensor([c is not None for c in captions])
        if has_neg.any():  # a scene without a negative keeps its caption there (never used)
            negatives = (tokenize(tokenizer, [c or s.caption for c, s in zip(captions, scenes)], cfg.context_length),
                         has_neg)

    def get_batch(idx):
        idx = torch.as_tensor(idx)
        batch = (to_float(images[idx]).to(device), tokens[idx].to(device))
        if negatives is None:
            return batch
        # a fixed number of slots per block of NEG_BLOCK rows, filled by the block's first rows that have a
        # negative (empty slots: owner -1). Fixed shapes on every step, and, as torchrun splits a batch into
        # whole blocks (when its share is a multiple of NEG_BLOCK), the same negatives whatever the number of
        # processes.
        owner, neg = [], []
        for start in range(0, len(idx), NEG_BLOCK):
            block = idx[start:start + NEG_BLOCK]
            n_slots = math.ceil(cfg.hard_negatives * len(block))
            rows = negatives[1][block].nonzero().flatten()[:n_slots]
            owner += (rows + start).tolist() + [-1] * (n_slots - len(rows))
            neg += [negatives[0][block[rows]], tokens[block[:1]].repeat(n_slots - len(rows), 1)]
        return batch + (torch.cat(neg).to(device), torch.tensor(owner, dtype=torch.long, device=device))
    return get_batch, len(images)


def _build(cfg: ClipConfig, dims):
    return create_clip(cfg)[0]  # random weights (seeded by the caller): same seed -> same CLIP


def _pretrained(cfg: ClipConfig, ctx):
    return None if cfg.trainable else create_clip(cfg, ctx.device)[0]


def _wrap(model, cfg: ClipConfig, dims, ctx) -> ClipEncoder:
    import open_clip
    pre = CUSTOM_PREPROCESS if cfg.arch == "custom" else \
        {"mean": list(model.visual.image_mean or open_clip.OPENAI_DATASET_MEAN),
         "std": list(model.visual.image_std or open_clip.OPENAI_DATASET_STD)}
    return ClipEncoder(model, tokenizer_for(cfg), pre, cfg, ctx.device)


def _finish(encoder: ClipEncoder, cfg: ClipConfig, dims, ctx) -> dict:
    """Export a CLIP trained here as an open_clip `local-dir:` folder, and cache every split's embeddings."""
    if cfg.trainable:
        export_local_dir(encoder.model, cfg, ctx.folder / "open_clip")
    present = [s for s in SPLITS if len(ctx.dataset(s)) > 0 or s == "train"]
    embeddings = {split: embed_dataset(encoder, ctx.dataset(split)) for split in present}
    ctx.save("embeddings", embeddings, config={}, requires={"clip": ctx.id})
    return {}


SPEC = StageSpec(
    name="clip", needs=(), notebook="02_clip", about="contrastive text-image encoder + cached embeddings",
    build=_build, batches=_batches, loss=lambda cfg, dims, ctx: contrastive_loss_fn(), wrap=_wrap,
    finish=_finish, pretrained=_pretrained)


def embed_dataset(encoder: ClipEncoder, dataset, batch_size: int = 1024) -> dict:
    """z_t, z_i and the token features of a whole dataset (trimmed to its longest caption).

    Returns {'text_embed' [N, D], 'image_embed' [N, D], 'tokens' [N, L] int32, 'text_tokens' [N, L, W]
    float16, 'text_mask' [N, L] bool}; L = the longest caption's length.
    """
    text = encoder.encode_text(dataset.captions(), batch_size=batch_size)
    length = caption_length(text["tokens"])
    image_embed = encoder.encode_image(dataset.images(progress=False), batch_size=batch_size)
    return {"text_embed": text["text_embed"].cpu(), "image_embed": image_embed.cpu(),
            "tokens": text["tokens"][:, :length].to(torch.int32),
            "text_tokens": text["text_tokens"][:, :length].half().cpu(),
            "text_mask": text["text_mask"][:, :length].cpu()}
