"""The two diffusion upsamplers of unCLIP (Ramesh et al. 2022, §2.1 and Appendix C, Table 3).

    "We train two diffusion upsampler models: one to upsample images from 64x64 to 256x256
    resolution, and another to further upsample those to 1024x1024 resolution. To improve the
    robustness of our upsamplers, we slightly corrupt the conditioning images during training. For
    the first upsampling stage, we use gaussian blur, and for the second, we use a more diverse BSR
    degradation. To reduce training compute and improve numerical stability, we follow Rombach et al.
    and train on random crops of images that are one-fourth the target size. We use only spatial
    convolutions in the model (i.e., no attention layers) and at inference time directly apply the
    model at the target resolution." (unCLIP §2.1)

What is here:
    UpsamplerConfig  one stage's U-Net (unet.UNetConfig.upsampler), diffusion, corruption, crops, sampling
    training_pairs   (high-res crop, its low-res window, the corrupted conditioning) rendered on the fly
    Upsampler        the trained model (EMA weights): `upsample(low_res [B,3,h,w]) -> [B,3,4h,4w]`
    SPEC1, SPEC2     the stages "upsampler1" and "upsampler2" (their corruptions: degradations.py)

The conditioning image is resized to the output size (bilinear, as GLIDE's super-resolution model
does) and concatenated to x_t as 3 extra input channels (`cond=` of the U-Net). No caption, no guidance.
Below the `paper` preset two things differ from the paper, both for learning per CPU-second:
`cond_skip` (the U-Net predicts x_0 minus the bilinear upsample, instead of eps) and `crop_focus`
(half the crops are centred near an object; uniform quarter-size crops of a toy scene are half
background). Below `paper` the U-Net also normalizes with `PixelNorm` instead of GroupNorm (unet.py):
GroupNorm's statistics over the whole feature map differ between a training crop and the whole image,
PixelNorm's per-position statistics do not, so what is learned on crops holds on the whole image.
Left out: the paper's fp16 / distributed training details.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from . import distributed
from .config import PresetConfig, check, check_choice, check_range
from .degradations import DEGRADATIONS, check_images, degrade
from .errors import ConfigError, DataError
from .data import to_float
from .gaussian_diffusion import DiffusionConfig, create_diffusion, randn, respace
from .train import StageSpec, TrainConfig
from .unet import UNetConfig, UNetModel

SCALE = 4                                 # each upsampler multiplies the side by 4 (paper: 64->256->1024)

# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def _diffusion(stage: int, preset: str) -> DiffusionConfig:
    schedule = "cosine" if stage == 1 else "linear"            # paper: cosine / linear (Table 3)
    if preset == "paper":                                      # GLIDE/ADM's eps-prediction
        return DiffusionConfig(timesteps=1000, schedule=schedule, mean_type="eps")
    # x0-prediction with the conditioning image as a skip (cond_skip): right from step 0 the model
    # returns the bilinear upsample, so short CPU runs learn only the detail; smoke uses a short chain
    return DiffusionConfig(timesteps=100 if preset == "smoke" else 1000, schedule=schedule, mean_type="x0")


def _train(stage: int, preset: str) -> TrainConfig:
    if preset == "smoke":
        return TrainConfig(steps=3, batch_size=4, warmup_steps=1, ckpt_every=1000, log_every=1)
    if preset == "toy":  # about 2 min of one core each (README, measurements)
        if stage == 1:
            return TrainConfig(steps=1000, batch_size=16, lr=1e-3, warmup_steps=40, ckpt_every=250, log_every=10)
        return TrainConfig(steps=1200, batch_size=4, lr=1e-3, warmup_steps=50, ckpt_every=300, log_every=10)
    if preset == "small":  # one GPU; stage 2's 256-px crops of 1024-px renders are drawn on the CPU
        return TrainConfig(steps=5000 if stage == 1 else 2000, batch_size=64 if stage == 1 else 16, lr=3e-4,
                           warmup_steps=200, lr_schedule="cosine", ema_decay=0.999, ckpt_every=500,
                           log_every=50, precision="bf16")
    # paper (Table 3): 1M iterations, batch 1024 / 512, lr 1.2e-4 / 1.0e-4, EMA 0.9999, no weight decay, no
    # clipping stated; DDP: a replica of 0.7 B / 0.3 B parameters with its Adam state fits one GPU
    return TrainConfig(steps=1_000_000, batch_size=1024 if stage == 1 else 512, lr=1.2e-4 if stage == 1 else 1e-4,
                       warmup_steps=10000, ema_decay=0.9999, ckpt_every=5000, log_every=100, precision="bf16",
                       grad_clip=0.0, decay_1d=False)


@dataclasses.dataclass(frozen=True)
class UpsamplerConfig(PresetConfig):
    """One upsampler. `stage1(preset)` / `stage2(preset)`; `smoke/toy/small/paper()` give stage 1.

    `unet.image_size` is the OUTPUT side of the whole image (toy: 128 / 512); training crops are
    `crop_fraction` of it (toy: 32 / 128 px), and their conditioning windows a quarter of that.
    """
    stage: int = 1                                   # 1: base -> x4 (paper 64->256), 2: x4 -> x16 (256->1024)
    unet: UNetConfig = dataclasses.field(default_factory=lambda: UNetConfig.upsampler(1, "toy"))  # paper: 700M / 300M params
    diffusion: DiffusionConfig = dataclasses.field(default_factory=lambda: _diffusion(1, "toy"))  # paper: 1000 steps, cosine / linear
    degradation: str = "blur"                        # paper: 'blur' (stage 1), 'bsr' (stage 2); 'none' for the ablation
    blur_kernel: int = 3                             # paper: 3
    blur_sigma: float = 0.6                          # paper: 0.6
    crop_fraction: float = 0.25                      # paper: 0.25 (random crops one-fourth the target size)
    crop_focus: float = 0.0                          # paper: 0 (uniform crops); P(crop centred near an object)
    sample_steps: int = 27                           # paper: 27 (stage 1), 15 (stage 2), DDIM
    cond_skip: bool = True                           # paper: False; ours: x0 = up(cond) + net (see `model_fn`)
    train: TrainConfig = dataclasses.field(default_factory=lambda: _train(1, "toy"))  # paper: 1M iterations

    def __post_init__(self):
        check_choice(self, "stage", (1, 2))
        for name, kind in (("unet", UNetConfig), ("diffusion", DiffusionConfig), ("train", TrainConfig)):
            check(isinstance(getattr(self, name), kind), self, name, f"must be a {kind.__name__}")
        check_choice(self, "degradation", DEGRADATIONS)
        check(isinstance(self.blur_kernel, int) and self.blur_kernel > 0 and self.blur_kernel % 2 == 1,
              self, "blur_kernel", "must be a positive odd int (paper: 3)")
        check_range(self, "blur_sigma", 0.0, low_open=True)
        check_range(self, "crop_fraction", 0.0, 1.0, low_open=True)
        check_range(self, "crop_focus", 0.0, 1.0)
        check_range(self, "sample_steps", 2, self.diffusion.timesteps, integer=True)
        check_choice(self, "cond_skip", (True, False))
        check(not self.cond_skip or self.diffusion.mean_type == "x0", self, "cond_skip",
              f"adds the conditioning image to a predicted x_0, so it needs diffusion.mean_type='x0' "
              f"(got {self.diffusion.mean_type!r}); set cond_skip=False for eps or v")
        u = self.unet
        check(u.attention_resolutions == (), self, "unet",
              "the upsamplers are conv-only (unCLIP §2.1: no attention) so that a model trained on crops "
              "runs on the whole image; set attention_resolutions=()")
        check(u.cond_channels == 3 and u.in_channels == 3 and u.out_channels == 3, self, "unet",
              "needs in_channels=3, out_channels=3 and cond_channels=3 (the low-res image): use "
              "UNetConfig.upsampler(stage, preset)")
        check(u.learn_sigma == (self.diffusion.var_type == "learned_range"), self, "unet",
              f"learn_sigma={u.learn_sigma} does not match diffusion.var_type={self.diffusion.var_type!r}")
        side = self.crop_size
        unit = math.lcm(SCALE, u.downsample_factor)
        check(abs(u.image_size * self.crop_fraction - side) < 1e-9 and side % unit == 0 and side > 0,
              self, "crop_fraction",
              f"crop side = image_size {u.image_size} * {self.crop_fraction} must be a whole multiple of {unit} "
              f"(the x{SCALE} scale and the U-Net's downsample factor {u.downsample_factor})")

    @property
    def crop_size(self) -> int:
        """Side in px (output resolution) of the training crops."""
        return int(round(self.unet.image_size * self.crop_fraction))

    @property
    def input_multiple(self) -> int:
        """Low-res inputs must have H and W divisible by this (their x4 must fit the U-Net's factor)."""
        f = self.unet.downsample_factor
        return f // math.gcd(f, SCALE)

    @classmethod
    def stage1(cls, preset: str = "toy"):
        """Upsampler 1 of `preset` (toy 32->128, small/paper 64->256): Gaussian blur, cosine, 27 DDIM steps (toy: 10)."""
        return cls._make(1, preset)

    @classmethod
    def stage2(cls, preset: str = "toy"):
        """Upsampler 2 of `preset` (toy 128->512, small/paper 256->1024): BSR, linear, 15 DDIM steps (toy: 5)."""
        return cls._make(2, preset)

    @classmethod
    def _make(cls, stage, preset):
        unet = UNetConfig.upsampler(stage, preset)   # validates the preset name
        if preset == "smoke":  # smoke data is 16 px: outputs are 64 / 256 px
            unet = unet.replace(image_size=16 * SCALE ** stage)
        return cls(stage=stage, unet=unet, diffusion=_diffusion(stage, preset),
                   degradation="blur" if stage == 1 else "bsr",
                   # toy: x0 + cond_skip is nearly a deterministic regression, so 10 / 5 DDIM steps score
                   # as 27 / 15 do (README, measurements) at a third of the time
                   sample_steps={"smoke": 3, "toy": 10 if stage == 1 else 5}.get(preset, 27 if stage == 1 else 15),
                   # toy: sigma 0.6 px at our 32-px base is twice the paper's relative blur (0.6 px at 64 px)
                   blur_sigma=0.4 if preset in ("smoke", "toy") else 0.6,
                   crop_focus=0.0 if preset == "paper" else 0.5, cond_skip=preset != "paper",
                   train=_train(stage, preset))

    @classmethod
    def smoke(cls):
        return cls.stage1("smoke")

    @classmethod
    def toy(cls):
        return cls.stage1("toy")

    @classmethod
    def small(cls):
        return cls.stage1("small")

    @classmethod
    def paper(cls):
        return cls.stage1("paper")


# ---------------------------------------------------------------------------------------------
# training pairs, rendered on the fly
# ---------------------------------------------------------------------------------------------

def resize_cond(low_res: torch.Tensor, size) -> torch.Tensor:
    """The conditioning image at the output size: bilinear, as GLIDE's super-resolution U-Net. `[B, 3, H, W]`."""
    return F.interpolate(low_res, size=size, mode="bilinear", align_corners=False)


def training_pairs(world, scenes, cfg: UpsamplerConfig, out_res: int, generator=None) -> dict:
    """Ground-truth pairs for `scenes`: a random crop window of each, rendered at `out_res`.

    Returns dict(high_res [B, 3, c, c] float, low_res [B, 3, c/4, c/4] float (the avg-pooled crop, before
    corruption), cond (low_res corrupted by cfg.degradation), crops [(top, left, c)]) with c = cfg.crop_size.
    Crop corners are multiples of 4, so the low-res window is exactly a window of the x4-smaller image.
    """
    c = cfg.crop_size
    if c > out_res:
        raise ConfigError(f"crop side {c} exceeds the {out_res}-px render: lower crop_fraction")
    n = len(scenes)
    positions = (out_res - c) // SCALE + 1          # possible corners per axis, on the x4 grid
    corners = distributed.randint(0, positions, (n, 2), generator, "cpu") * SCALE
    u = distributed.rand((n, 4), generator, "cpu").tolist()                 # drawn even when unused
    for k, scene in enumerate(scenes):
        if u[k][0] < cfg.crop_focus and scene.objects:   # centre the window near one object
            o = scene.objects[int(u[k][1] * len(scene.objects))]
            for axis, (centre, jitter) in enumerate(((o.centre[1], u[k][2]), (o.centre[0], u[k][3]))):
                pos = centre * out_res - c / 2 + (jitter - 0.5) * c / 2           # +- c/4 around the object
                corners[k, axis] = min(max(int(pos) // SCALE, 0), positions - 1) * SCALE
    crops = [(int(t), int(l), c) for t, l in corners.tolist()]
    high = to_float(world.render(scenes, out_res, crop=crops))                   # [B, 3, c, c]
    low = F.avg_pool2d(high, SCALE)                                              # area downsampling
    if cfg.degradation == "bsr":  # a random mixture per image, from a seed per image: split-invariant
        seeds = distributed.randint(0, 2**62, (n,), generator, "cpu").tolist()
        cond = torch.cat([degrade(low[k:k + 1], "bsr", torch.Generator().manual_seed(s)) for k, s in enumerate(seeds)])
    else:
        cond = degrade(low, cfg.degradation, generator, cfg.blur_kernel, cfg.blur_sigma)
    return {"high_res": high, "low_res": low, "cond": cond, "crops": crops}


def model_fn(model, cond_skip: bool):
    """The function the diffusion calls: `fn(x_t, t, cond=up(cond)) -> prediction [B, 3, H, W]`.

    cond_skip: the U-Net predicts x_0 - up(cond), the detail the bilinear upsample lacks (the residual
    that SRDiff, Li et al. 2022, diffuses). With its zero-initialised output layer the model starts at
    the bilinear upsample, so a short run learns only the detail (README, measurements).
    """
    if not cond_skip:
        return model
    return lambda x, t, cond: cond + model(x, t, cond=cond)


def make_loss_fn(cfg: UpsamplerConfig, world, out_res: int):
    """loss_fn for `train.Trainer`: batch = list of scenes; every random draw comes from `generator`."""
    diffusion = create_diffusion(cfg.diffusion)

    def loss_fn(model, scenes, generator):
        device = next(model.parameters()).device
        pair = training_pairs(world, scenes, cfg, out_res, generator)
        x0 = pair["high_res"].to(device)
        cond = resize_cond(pair["cond"].to(device), x0.shape[-2:])
        t = diffusion.sample_timesteps(len(x0), generator, device)
        noise = randn(x0.shape, generator, device)
        losses = diffusion.training_losses(model_fn(model, cfg.cond_skip), x0, t, model_kwargs={"cond": cond},
                                           noise=noise)
        return losses["loss"].mean(), {}

    return loss_fn


# ---------------------------------------------------------------------------------------------
# the trained upsampler
# ---------------------------------------------------------------------------------------------

class Upsampler:
    """A trained upsampler (EMA weights): `upsample(low_res [B, 3, h, w]) -> [B, 3, 4h, 4w]`."""

    def __init__(self, cfg: UpsamplerConfig, model: UNetModel, device):
        self.cfg, self.device = cfg, torch.device(device)
        self.record = None  # the stage record, when it came from a run folder (stages.load_or_train)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.base_diffusion = create_diffusion(cfg.diffusion)
        self._spaced = {}

    def __repr__(self):
        return (f"Upsampler(stage={self.cfg.stage}, degradation={self.cfg.degradation!r}, "
                f"sample_steps={self.cfg.sample_steps})")

    def diffusion(self, steps: int | None = None):
        """The diffusion respaced to `steps` DDIM steps (default cfg.sample_steps), cached."""
        steps = self.cfg.sample_steps if steps is None else steps
        # at least 2: a one-step chain has no posterior variance to build (gaussian_diffusion needs 2 steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= self.cfg.diffusion.timesteps:
            raise ConfigError(f"steps = {steps!r} must be an int in 2..{self.cfg.diffusion.timesteps} "
                              f"(paper: {self.cfg.sample_steps})")
        if steps not in self._spaced:
            self._spaced[steps] = respace(self.base_diffusion, steps)
        return self._spaced[steps]

    def check_input(self, low_res) -> torch.Tensor:
        """Refuse what the model cannot take; returns the images on the model's device."""
        low_res = check_images(low_res, "low_res")
        m = self.cfg.input_multiple
        h, w = low_res.shape[-2:]
        if h % m or w % m:
            f = self.cfg.unet.downsample_factor
            raise DataError(f"low_res is {h}x{w}, but its x{SCALE} ({SCALE * h}x{SCALE * w}) must be a multiple of "
                            f"the U-Net's factor {f}: crop or pad the input to a multiple of {m} px "
                            f"(e.g. {max(m, h // m * m)}x{max(m, w // m * m)})")
        return low_res.to(self.device)

    @torch.no_grad()
    def upsample(self, low_res, steps: int | None = None, generator=None, eta: float = 0.0,
                 batch_size: int | None = None, progress: bool = False, noise=None) -> torch.Tensor:
        """x4 upsampling by DDIM: low_res float `[B, 3, h, w]` in [-1, 1] -> `[B, 3, 4h, 4w]` in [-1, 1].

        Runs on whole images of any size whose x4 fits the U-Net's factor (the model is conv-only).
        `noise` (x_T `[B, 3, 4h, 4w]`) or `generator` fixes the result; `batch_size` bounds memory
        (the result does not depend on it).
        """
        low_res = self.check_input(low_res)
        b, _, h, w = low_res.shape
        shape = (b, 3, SCALE * h, SCALE * w)
        if noise is None:
            noise = randn(shape, generator, self.device)
        elif tuple(noise.shape) != shape:
            raise DataError(f"noise has shape {tuple(noise.shape)} but must be {shape} (x4 of low_res)")
        diffusion = self.diffusion(steps)
        cond = resize_cond(low_res.float(), shape[-2:])
        outs = []
        size = batch_size or b
        for a in range(0, b, size):
            outs.append(diffusion.ddim_sample_loop(
                model_fn(self.model, self.cfg.cond_skip), (min(size, b - a), *shape[1:]), noise=noise[a:a + size].to(self.device),
                model_kwargs={"cond": cond[a:a + size]}, eta=eta, generator=generator, progress=progress))
        return torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------

def out_resolution(data_resolution: int, cfg: UpsamplerConfig) -> int:
    """Side of the full output image of `cfg`'s stage: base resolution * 4**stage (checked against the U-Net)."""
    out_res = data_resolution * SCALE ** cfg.stage
    if cfg.unet.image_size != out_res:
        raise ConfigError(f"upsampler {cfg.stage}'s unet.image_size = {cfg.unet.image_size} but the base images "
                          f"are {data_resolution} px, so stage {cfg.stage} outputs {out_res} px: build the config "
                          f"with UpsamplerConfig.stage{cfg.stage}(preset) or set unet.image_size={out_res}")
    return out_res


def _prepare(cfg: UpsamplerConfig, ctx) -> dict:
    return {"out_res": out_resolution(ctx.cfg.data.resolution, cfg)}


def _batches(cfg: UpsamplerConfig, dims, ctx):
    world = ctx.world
    return (lambda idx: world.scenes(idx.tolist(), "train")), ctx.cfg.data.train_size


def _spec(stage: int, about: str) -> StageSpec:
    return StageSpec(
        name=f"upsampler{stage}", needs=(), notebook="07_upsamplers", about=about, prepare=_prepare,
        batches=_batches, build=lambda cfg, dims: UNetModel(cfg.unet),
        loss=lambda cfg, dims, ctx: make_loss_fn(cfg, ctx.world, dims["out_res"]),
        wrap=lambda network, cfg, dims, ctx: Upsampler(cfg, network, ctx.device),
        sampling_fields=("sample_steps",))


SPEC1 = _spec(1, "base -> x4, Gaussian-blur corrupted conditioning")
SPEC2 = _spec(2, "x4 -> x16, BSR-degraded conditioning")
