"""The decoder: CLIP image embedding (+ caption) -> base image, and the GLIDE-style baseline (unCLIP §2.1).

unCLIP §2.1: "We use diffusion models to produce images conditioned on CLIP image embeddings (and
optionally text captions). Specifically, we modify the architecture described in Nichol et al. (2021)
by projecting and adding CLIP embeddings to the existing timestep embedding, and by projecting CLIP
embeddings into four extra tokens of context that are concatenated to the sequence of outputs from the
GLIDE text encoder. [...] we enable classifier-free guidance by randomly setting the CLIP embeddings to
zero (or a learned embedding) 10% of the time, and randomly dropping the text caption 50% of the time
during training."

So a `Decoder` is three pieces around the ADM U-Net of `unet.py`:

    tokens [B, L] --TextEncoder (GLIDE, Nichol et al. 2021)--> text_tokens [B, L, W], pooled [B, W]
    pooled  --Linear--> added to the timestep embedding (`emb=`)
    z_i [B, D] --Linear--> added to the timestep embedding
    z_i     --Linear--> 4 context tokens [B, 4, W], concatenated to text_tokens (`context=`)

The GLIDE-style baseline is the same network without the z_i paths (`use_image_embed=False`): the
paper's comparison "GLIDE" (a caption-only decoder). Both are stages: "decoder" and "glide".

Recipe per preset. `paper` is Table 3's 64 px decoder: eps-prediction with a learned variance and the
hybrid loss (Improved DDPM), 1000 cosine steps, 250 sampling steps. Below `paper` the variance is fixed and
sampling uses DDIM with few steps, and the toy decoder predicts x0: on two CPU cores eps-prediction leaves
coloured noise after the few thousand steps a CPU affords. The toy decoder also draws its training steps t
logit-normally (Esser et al. 2024: the middle of the chain more often than its ends), which reaches the
uniform draw's reconstructions in two thirds of the steps; the GLIDE-style baseline keeps the uniform draw,
under which it places its objects better. The measured curves behind the toy recipe are in the README's
measurements table.

What we change for the CPU: below `paper` the 49k-row token table is factorised (a narrow table and a
Linear, `token_dim`), because its dense gradient, optimizer and EMA updates cost more than the text
encoder itself. What is left out: GLIDE's inpainting channels, fp16 code inside the model, the paper's
text context of 256 (the caption here is the CLIP's own token ids, so it has the CLIP's context length).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import distributed
from . import gaussian_diffusion as gd
from .config import PresetConfig, check, check_choice, check_positive, check_range
from .errors import ArtifactError, ConfigError, DataError
from .gaussian_diffusion import DiffusionConfig, create_diffusion
from .train import StageSpec, TrainConfig
from .transformer import Transformer
from .unet import UNetConfig, UNetModel, count_parameters

CLIP_VOCAB_SIZE = 49408  # open_clip's BPE vocabulary: the token ids the CLIP embeddings cache holds


@dataclass(frozen=True)
class DecoderConfig(PresetConfig):
    """The decoder (or, with use_image_embed=False, the GLIDE-style baseline). Defaults = toy."""
    unet: UNetConfig = field(default_factory=UNetConfig.toy)            # paper: Table 3, 64 px decoder
    diffusion: DiffusionConfig = field(  # toy: x0, logit-normal t (see above); paper: eps, learned_range, hybrid
        default_factory=lambda: DiffusionConfig.toy().replace(mean_type="x0", timestep_sampling="logit_normal"))
    clip_dim: int = 64               # dim of z_i (the CLIP's embed_dim; paper: 1024)
    text_ctx: int = 24               # positions of the caption encoder (= the CLIP's context length; paper: 256)
    vocab_size: int = CLIP_VOCAB_SIZE  # token ids: open_clip's BPE (paper: GLIDE's 50257-token BPE)
    token_dim: int | None = 16       # token-table width, then a Linear to text_width (None: no factorisation)
    text_width: int = 64             # GLIDE text encoder width = unet.context_dim (paper: 2048)
    text_layers: int = 2             # (paper: 24)
    text_heads: int = 4              # (paper: 32)
    text_checkpoint: bool = False    # activation checkpointing of the text encoder's blocks (paper: not stated; on at
                                     # `paper`, as the U-Net's: recomputing it costs a few % of a step)
    use_image_embed: bool = True     # False: the GLIDE-style baseline (caption only)
    n_image_tokens: int = 4          # context tokens projected from z_i (paper: 4)
    p_drop_image: float = 0.1        # P(z_i zeroed) in training, for guidance (paper: 0.1)
    p_drop_text: float = 0.5         # P(caption dropped) in training (paper: 0.5; GLIDE: 0.2)
    guidance_scale: float = 3.0      # classifier-free guidance at sampling; 1 = none (paper: swept, §5)
    sampler: str = "ddim"            # 'ddim' (eta=0 by default) | 'ddpm' (ancestral; paper: 'ddpm')
    sample_steps: int = 25           # respaced sampling steps (paper: 250)
    # 9,000 steps: single objects of unseen images then read right 93% of the time from z_i, against 88% at
    # 6,000 (README, measurements); the GLIDE-style baseline trains as many
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=9000, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999, ckpt_every=250,
        precision="bf16"))  # bf16: 10-20% faster on a CPU with bf16 kernels (fp32 elsewhere; README, measurements)

    def __post_init__(self):
        for name in ("unet", "diffusion", "train"):
            want = {"unet": UNetConfig, "diffusion": DiffusionConfig, "train": TrainConfig}[name]
            check(isinstance(getattr(self, name), want), self, name, f"must be a {want.__name__}")
        check_positive(self, "clip_dim", "text_ctx", "vocab_size", "text_width", "text_layers", "text_heads",
                       "n_image_tokens")
        if self.token_dim is not None:
            check_positive(self, "token_dim")
        check_choice(self, "text_checkpoint", (True, False))
        check(self.text_width % self.text_heads == 0, self, "text_heads",
              f"must divide text_width {self.text_width}")
        check(self.unet.context_dim == self.text_width, self, "text_width",
              f"the U-Net's attention reads the caption tokens, so unet.context_dim "
              f"({self.unet.context_dim}) must equal text_width: set both to the same value")
        check(self.unet.in_channels == 3 and self.unet.cond_channels == 0, self, "unet",
              "the decoder generates RGB from noise alone: in_channels=3, cond_channels=0")
        learned = self.diffusion.var_type == "learned_range"
        check(self.unet.learn_sigma == learned, self, "unet",
              f"unet.learn_sigma={self.unet.learn_sigma} but diffusion.var_type="
              f"{self.diffusion.var_type!r}: a learned variance needs learn_sigma=True, a fixed one False")
        check_choice(self, "use_image_embed", (True, False))
        for name in ("p_drop_image", "p_drop_text"):
            check_range(self, name, 0.0, 1.0)
        check_range(self, "guidance_scale", 0.0)
        check_choice(self, "sampler", ("ddim", "ddpm"))
        # a respaced chain needs a first and a last step, and no more than the training chain has
        check_range(self, "sample_steps", 2, self.diffusion.timesteps, integer=True)

    @property
    def image_size(self) -> int:
        return self.unet.image_size

    @classmethod
    def smoke(cls):
        return cls(unet=UNetConfig.smoke(), diffusion=DiffusionConfig.smoke(), clip_dim=16, text_width=16,
                   token_dim=8, text_layers=1, text_heads=2, sample_steps=5,
                   train=TrainConfig(steps=12, batch_size=8, lr=1e-3, warmup_steps=2, ckpt_every=6,
                                     log_every=2, ema_decay=0.9))

    @classmethod
    def toy(cls):
        return cls()  # ~2 M-param U-Net on 32 px (16 px after the pixel unshuffle); see 06_decoder

    @classmethod
    def small(cls):
        return cls(unet=UNetConfig.small(), diffusion=DiffusionConfig.small(), clip_dim=256, text_width=512,
                   token_dim=128, text_layers=6, text_heads=8, sample_steps=50,
                   train=TrainConfig(steps=30000, batch_size=256, lr=3e-4, warmup_steps=1000,
                                     ema_decay=0.9999, ckpt_every=2000, log_every=50, precision="bf16"))

    @classmethod
    def paper(cls):
        # Table 3: 3.5B params incl. GLIDE's 1.2B text encoder; batch 2048, 800K steps, lr 1.2e-4, EMA 0.9999
        return cls(unet=UNetConfig.paper(), diffusion=DiffusionConfig.paper(), clip_dim=1024, text_ctx=77,
                   token_dim=None, text_width=2048, text_layers=24, text_heads=32, text_checkpoint=True,
                   sampler="ddpm", sample_steps=250,
                   train=TrainConfig(steps=800_000, batch_size=2048, lr=1.2e-4, warmup_steps=10000,
                                     ema_decay=0.9999, ckpt_every=5000, log_every=100, precision="bf16",
                                     grad_clip=0.0, decay_1d=False, parallel="fsdp"))

    @classmethod
    def glide(cls, preset: str = "toy"):
        """The GLIDE-style baseline of `preset`: the same decoder with no z_i, captions dropped 20% (GLIDE),
        trained as many steps as the decoder: at toy a shorter budget compares an undertrained baseline (the
        README's measurements table has the curve)."""
        cfg = cls.preset(preset)
        # uniform t: a caption-only model settles where the object goes near t = T, which logit-normal rarely draws
        return cfg.replace(use_image_embed=False, p_drop_image=0.0, p_drop_text=0.2,
                           diffusion=cfg.diffusion.replace(timestep_sampling="uniform"))


# ---------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------

class TextEncoder(nn.Module):
    """GLIDE's caption encoder: token + position embeddings, a bidirectional transformer.

    tokens [B, L] (open_clip ids; 0 = padding) -> text_tokens [B, L, W], text_mask [B, L] (True = real
    token), pooled [B, W] (the end-of-text position's feature). A row of zeros is the empty caption: it
    is fully masked and its pooled feature is a learned constant (the "null caption" of guidance).
    With `token_dim` < W the token table is [vocab, token_dim] followed by a Linear up to W (ALBERT's
    factorised embedding, arXiv:1909.11942): the 49k-row table then costs the optimizer, the EMA and the
    gradient a few times less, which matters on a CPU where a toy caption uses ~40 of those rows.
    """

    def __init__(self, vocab_size: int, text_ctx: int, width: int, layers: int, heads: int,
                 token_dim: int | None = None, checkpoint: bool = False):
        super().__init__()
        d = token_dim or width
        self.token_embedding = nn.Embedding(vocab_size, d)
        self.token_proj = nn.Linear(d, width, bias=False) if d != width else nn.Identity()
        self.positional_embedding = nn.Parameter(torch.randn(text_ctx, width) * 0.01)
        self.transformer = Transformer(width, layers, heads, causal=False, checkpoint=checkpoint)

    def forward(self, tokens: torch.Tensor):
        mask = tokens != 0                                             # [B, L]; SOT .. EOT are non-zero
        x = self.token_proj(self.token_embedding(tokens)) + self.positional_embedding[: tokens.shape[1]]  # [B, L, W]
        x = self.transformer(x, key_padding_mask=mask)                 # [B, L, W] (ln_f applied)
        eot = tokens.argmax(dim=-1)                                    # the end-of-text id is the largest
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]     # [B, W]
        return x, mask, pooled


class Decoder(nn.Module):
    """unCLIP's decoder (or the GLIDE-style baseline): (x_t, t, z_i, caption tokens) -> U-Net output.

    Call as `model(x [B, 3, H, W], t [B], image_embed=[B, D] or None, tokens=[B, L] or None)`; None is
    the null condition (z_i = 0; the empty caption). `sample(...)` generates images.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if not isinstance(cfg, DecoderConfig):
            raise ConfigError(f"Decoder needs a DecoderConfig, got {type(cfg).__name__}: "
                              f"use DecoderConfig.toy() or DecoderConfig.glide('toy')")
        self.cfg = cfg
        emb_dim, width = cfg.unet.time_embed_dim, cfg.text_width
        self.unet = UNetModel(cfg.unet)
        self.text = TextEncoder(cfg.vocab_size, cfg.text_ctx, width, cfg.text_layers, cfg.text_heads, cfg.token_dim,
                                cfg.text_checkpoint)
        self.text_to_emb = nn.Linear(width, emb_dim)                    # GLIDE's transformer_proj
        if cfg.use_image_embed:
            self.image_to_emb = nn.Linear(cfg.clip_dim, emb_dim)          # z_i -> the timestep embedding
            self.image_to_tokens = nn.Linear(cfg.clip_dim, cfg.n_image_tokens * width)  # z_i -> 4 tokens
        self.diffusion = create_diffusion(cfg.diffusion)                 # the training chain (no weights)
        self.record = None  # the stage record, when it came from a run folder (stages.load_or_train)

    # -- conditioning ------------------------------------------------------------------------
    def check_condition(self, image_embed, tokens, batch: int | None = None) -> int:
        """Validate the conditioning inputs; returns the batch size they imply."""
        cfg = self.cfg
        sizes = set() if batch is None else {batch}
        if image_embed is not None:
            if not cfg.use_image_embed:
                raise ConfigError("this is the GLIDE-style baseline (use_image_embed=False): it reads no CLIP "
                                  "image embedding; pass tokens= only, or use the 'decoder' stage")
            if not torch.is_tensor(image_embed) or image_embed.ndim != 2 or image_embed.shape[1] != cfg.clip_dim:
                shape = tuple(image_embed.shape) if torch.is_tensor(image_embed) else type(image_embed).__name__
                raise DataError(f"image_embed has shape {shape} but must be [B, {cfg.clip_dim}] (CLIP z_i): "
                                f"use the embeddings of the CLIP this decoder was trained with")
            sizes.add(image_embed.shape[0])
        if tokens is not None:
            if not torch.is_tensor(tokens) or tokens.ndim != 2 or tokens.is_floating_point():
                raise DataError("tokens must be an integer tensor [B, L] of caption token ids: use "
                                "clip.tokenize(captions) or the 'tokens' of the CLIP embeddings cache")
            if tokens.shape[1] > cfg.text_ctx:
                raise DataError(f"tokens has {tokens.shape[1]} positions but the caption encoder has "
                                f"{cfg.text_ctx}: trim the padding (tokens[:, :{cfg.text_ctx}])")
            sizes.add(tokens.shape[0])
        if len(sizes) > 1:
            raise DataError(f"the inputs disagree on the batch size ({sorted(sizes)}): give one z_i and one "
                            f"caption per image")
        return sizes.pop() if sizes else 0

    def condition(self, image_embed=None, tokens=None, batch: int | None = None, drop=None) -> dict:
        """The U-Net's conditioning: dict(emb [B, E], context [B, L(+4), W], context_mask [B, L(+4)]).

        `drop` [B] bool (classifier-free guidance's null rows): those rows get the empty caption and z_i = 0,
        the null condition the decoder was trained with.
        """
        b = self.check_condition(image_embed, tokens, batch)
        device = self.text_to_emb.weight.device
        if tokens is None:
            tokens = torch.zeros(b, 1, dtype=torch.long, device=device)  # the empty caption
        tokens = tokens.to(device).long()
        if drop is not None:
            tokens = tokens.masked_fill(drop.to(device)[:, None], 0)
        text_tokens, text_mask, pooled = self.text(tokens)
        emb = self.text_to_emb(pooled)                                   # [B, E]
        context, mask = text_tokens, text_mask
        if self.cfg.use_image_embed:
            z = torch.zeros(b, self.cfg.clip_dim, device=device) if image_embed is None \
                else image_embed.to(device).float()
            if drop is not None:
                z = z * (~drop.to(device))[:, None]
            # z_i is unit-norm, so its entries are ~1/sqrt(D): scale them to unit size, as a Linear expects
            z = z * math.sqrt(self.cfg.clip_dim)
            emb = emb + self.image_to_emb(z)
            z_tokens = self.image_to_tokens(z).reshape(b, self.cfg.n_image_tokens, -1)  # [B, 4, W]
            context = torch.cat([context, z_tokens], dim=1)
            mask = torch.cat([mask, mask.new_ones(b, self.cfg.n_image_tokens)], dim=1)
        return {"emb": emb, "context": context, "context_mask": mask}

    def forward(self, x, timesteps, image_embed=None, tokens=None):
        """U-Net output [B, 3 (x2 if learned variance), H, W] for x_t [B, 3, H, W] at steps [B]."""
        if not torch.is_tensor(x) or x.ndim != 4:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise DataError(f"x must be a batch of images [B, 3, H, W], got {shape}: add the batch dimension "
                            f"(x[None]) for a single image")
        return self.unet(x, timesteps, **self.condition(image_embed, tokens, x.shape[0]))

    # -- training ------------------------------------------------------------------------------
    def training_losses(self, x_start, image_embed, tokens, generator=None) -> dict:
        """Per-example losses [B] with guidance dropout (see `training_losses` below)."""
        return training_losses(self, x_start, image_embed, tokens, generator)

    # -- sampling ------------------------------------------------------------------------------
    def guided_model(self, image_embed=None, tokens=None, guidance_scale=None, batch: int | None = None,
                     text_guidance_scale=None):
        """(model_fn(x_t, t), b): the U-Net under a fixed condition, guided when the scale is not 1.

        One scale s (the paper's): u + s (c(z_i, y) - u), u the null condition. With `text_guidance_scale`
        s_t too, z_i and the caption are guided apart (`gaussian_diffusion.classifier_free_guidance` with
        two scales): u + s (c(z_i, none) - u) + s_t (c(z_i, y) - c(z_i, none)), one more U-Net pass per
        step; s_t = s is the one-scale guidance again. The caption encoder and the z_i projections run once
        here, not at every sampling step (as GLIDE does): the condition does not change along the chain.
        """
        cfg = self.cfg
        b = self.check_condition(image_embed, tokens, batch)
        if b == 0:
            raise DataError("sample() needs image_embed=, tokens= or noise= to know how many images to make")
        scale = cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
        if scale < 0:
            raise ConfigError(f"guidance_scale = {scale} must be >= 0 (1 = no guidance, 0 = unconditional)")
        device = self.text_to_emb.weight.device
        tokens = torch.zeros(b, 1, dtype=torch.long, device=device) if tokens is None else tokens.to(device).long()
        z = None
        if cfg.use_image_embed:
            z = torch.zeros(b, cfg.clip_dim, device=device) if image_embed is None else image_embed.to(device).float()
        if text_guidance_scale is not None:
            s_t = float(text_guidance_scale)
            if not cfg.use_image_embed:
                raise ConfigError("text_guidance_scale guides the caption apart from z_i, but this model has no "
                                  "z_i (the GLIDE-style baseline): use guidance_scale alone")
            if s_t < 0:
                raise ConfigError(f"text_guidance_scale = {s_t} must be >= 0 (0: the caption is ignored)")
            # row blocks [z_i and caption; z_i, empty caption; null]: each block drops one more condition
            zero = torch.zeros_like(tokens)
            cond = self.condition(torch.cat([z, z, torch.zeros_like(z)]), torch.cat([tokens, zero, zero]))
            fn = lambda x, t: self.unet(x, t, **cond)
            return gd.classifier_free_guidance(fn, (s_t, scale)), b
        if scale == 1.0:
            cond = self.condition(z, tokens)
            return (lambda x, t: self.unet(x, t, **cond)), b
        rows = (z, tokens) if z is not None else (tokens,)
        *rows, drop = gd.with_null_rows(*rows)            # [conditional rows; null rows]
        z2, tok2 = (rows[0], rows[1]) if z is not None else (None, rows[0])
        cond = self.condition(z2, tok2, drop=drop)
        fn = lambda x, t: self.unet(x, t, **cond)
        return gd.classifier_free_guidance(fn, scale), b   # the image channels; a learned variance is not guided

    def sampling_chain(self, steps=None):
        """The diffusion respaced to `steps` sampling steps (None: the config's), on the decoder's device."""
        steps = self.cfg.sample_steps if steps is None else int(steps)
        if not 2 <= steps <= self.cfg.diffusion.timesteps:  # a respaced chain needs 2 steps (gaussian_diffusion.respace)
            raise ConfigError(f"steps = {steps} must be in 2..{self.cfg.diffusion.timesteps} (the training chain)")
        return create_diffusion(self.cfg.diffusion, respacing=str(steps)).to(self.text_to_emb.weight.device)

    @torch.no_grad()
    def sample(self, image_embed=None, tokens=None, guidance_scale=None, steps=None, generator=None,
               noise=None, eta: float = 0.0, progress: bool = False, text_guidance_scale=None) -> torch.Tensor:
        """Generate images [B, 3, H, W] in [-1, 1] from z_i [B, D] and/or caption tokens [B, L].

        guidance_scale: classifier-free guidance (None: the config's; 1: none); the unconditional branch
        is the null z_i and the empty caption. text_guidance_scale: the caption's own scale, guided apart
        from z_i's (see `guided_model`; None: one scale for both). steps: respaced sampling steps (None:
        the config's).
        noise: x_T [B, 3, H, W] (fixes the sample); else drawn from `generator`. eta: DDIM's eta.
        """
        cfg = self.cfg
        model, b = self.guided_model(image_embed, tokens, guidance_scale, None if noise is None else noise.shape[0],
                                     text_guidance_scale)
        diffusion = self.sampling_chain(steps)
        device = self.text_to_emb.weight.device
        shape = (b, 3, cfg.image_size, cfg.image_size)
        was_training = self.training
        self.eval()
        try:
            if cfg.sampler == "ddim":
                out = diffusion.ddim_sample_loop(model, shape, noise=noise, progress=progress, generator=generator,
                                                 device=device, eta=eta)
            else:
                out = diffusion.p_sample_loop(model, shape, noise=noise, progress=progress, generator=generator,
                                              device=device)
        finally:
            self.train(was_training)
        return out.clamp(-1, 1)

    @torch.no_grad()
    def invert(self, images, image_embed=None, tokens=None, steps=None, guidance_scale=None,
               progress: bool = False) -> torch.Tensor:
        """DDIM inversion: the x_T [B, 3, H, W] that DDIM (eta = 0) decodes back into `images` [B, 3, H, W].

        It runs the same guided model under the same condition (z_i, caption, scale) as `sample`, on the
        same respaced chain, so `sample(image_embed, tokens, noise=invert(images, image_embed, tokens))`
        reconstructs `images` up to the ODE's discretisation error: the x_T of unCLIP's bipartite latent
        (z_i, x_T), §3.
        """
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3 \
                or tuple(images.shape[2:]) != (self.cfg.image_size,) * 2:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise DataError(f"images must be float [B, 3, {self.cfg.image_size}, {self.cfg.image_size}] in [-1, 1] "
                            f"(the decoder's resolution), got {shape}: resize them first")
        if not images.is_floating_point():
            raise DataError("images are integers; invert() takes float images in [-1, 1]: use data.to_float")
        model, _ = self.guided_model(image_embed, tokens, guidance_scale, images.shape[0])
        diffusion = self.sampling_chain(steps)
        was_training = self.training
        self.eval()
        try:
            return diffusion.ddim_reverse_sample_loop(model, images.to(self.text_to_emb.weight.device).float(),
                                                      progress=progress)
        finally:
            self.train(was_training)

    def num_parameters(self, embeddings: bool = True) -> int:
        """Parameter count (optionally without the token-embedding table, which costs a lookup only)."""
        n = count_parameters(self)
        return n if embeddings else n - self.text.token_embedding.weight.numel()


def training_losses(model, x_start, image_embed, tokens, generator=None) -> dict:
    """Per-example losses [B] of the decoder with guidance dropout (unCLIP §2.1): z_i zeroed w.p.
    p_drop_image, the caption dropped w.p. p_drop_text (independently); all randomness (steps, noise,
    dropout) from `generator`.

    `model` is a Decoder or a wrapper whose forward is the decoder's (DistributedDataParallel): the loss
    calls its forward, so a wrapper sees (and synchronises) every gradient.
    """
    dec = model.module if hasattr(model, "module") else model
    cfg, b, dev = dec.cfg, x_start.shape[0], x_start.device
    t = dec.diffusion.sample_timesteps(b, generator, dev)
    noise = gd.randn(x_start.shape, generator, dev)
    drop_text = distributed.rand(b, generator, dev) < cfg.p_drop_text
    kwargs = {"tokens": tokens.masked_fill(drop_text[:, None], 0)}    # dropped = the empty caption
    if cfg.use_image_embed:
        drop_image = distributed.rand(b, generator, dev) < cfg.p_drop_image
        kwargs["image_embed"] = image_embed * (~drop_image)[:, None]  # dropped = z_i set to zero
    return dec.diffusion.training_losses(model, x_start, t, model_kwargs=kwargs, noise=noise)


def loss_fn(model, batch, generator):
    """loss_fn for `train.Trainer`: the diffusion loss with guidance dropout, averaged over the batch."""
    x, image_embed, tokens = batch
    terms = training_losses(model, x, image_embed, tokens, generator)
    logs = {"mse": terms["mse"].mean().item()}
    if "vb" in terms:
        logs["vb"] = terms["vb"].mean().item()
    return terms["loss"].mean(), logs


# ---------------------------------------------------------------------------------------------
# the stages: "decoder" (z_i + caption) and "glide" (caption only)
# ---------------------------------------------------------------------------------------------

def _prepare(cfg: DecoderConfig, ctx) -> dict:
    if cfg.use_image_embed and (emb := ctx.embeddings("train"))["image_embed"].shape[1] != cfg.clip_dim:
        raise ConfigError(f"clip_dim = {cfg.clip_dim} but this run's CLIP embeds to {emb['image_embed'].shape[1]} "
                          f"dims: set the decoder's clip_dim to the CLIP's embed_dim")
    if ctx.cfg.data.resolution != cfg.image_size:
        raise ConfigError(f"the {ctx.cfg.preset} images are {ctx.cfg.data.resolution} px but unet.image_size = "
                          f"{cfg.image_size}: make them equal (DataConfig.resolution)")
    return {}


def _batches(cfg: DecoderConfig, dims, ctx):
    from .data import to_float
    train, device = ctx.dataset("train"), ctx.device
    images = train.images()                                                 # uint8 [N, 3, R, R]
    if cfg.use_image_embed:
        emb = ctx.embeddings("train")
        if len(images) != len(emb["image_embed"]):
            raise ArtifactError(f"the train split has {len(images)} images but the CLIP cache "
                                f"{len(emb['image_embed'])} rows: retrain the clip stage (delete its folder in the "
                                f"run folder)")
        image_embed, tokens = emb["image_embed"].float(), emb["tokens"].long()
    else:
        # the GLIDE-style baseline reads the captions alone: it tokenizes them exactly as the CLIP stage caches them,
        # so it needs no trained CLIP and can train beside it
        from .clip_model import caption_tokens
        image_embed, tokens = None, caption_tokens(ctx.cfg.clip, train.captions()).long()

    def get_batch(idx):
        z = None if image_embed is None else image_embed[idx].to(device)
        return to_float(images[idx]).to(device), z, tokens[idx].to(device)
    return get_batch, len(images)


def _spec(name: str, about: str, needs: tuple[str, ...]) -> StageSpec:
    return StageSpec(
        name=name, needs=needs, notebook="06_decoder", about=about, prepare=_prepare, batches=_batches,
        build=lambda cfg, dims: Decoder(cfg), loss=lambda cfg, dims, ctx: loss_fn,
        wrap=lambda network, cfg, dims, ctx: network.to(ctx.device).eval().requires_grad_(False),
        finish=lambda model, cfg, dims, ctx: {"parameters_no_embedding": model.num_parameters(False)},
        sampling_fields=("guidance_scale", "sampler", "sample_steps"))


SPEC = _spec("decoder", "CLIP image embedding (+ caption) -> base image", needs=("clip",))
GLIDE_SPEC = _spec("glide", "the GLIDE-style baseline: caption -> base image", needs=())  # its own tokens
