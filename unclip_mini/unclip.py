"""unCLIP itself: caption -> CLIP -> prior -> z_i -> decoder -> two upsamplers (Ramesh et al. 2022, §2), and the
image manipulations of §3 through the bipartite latent (z_i, x_T).

The paper factorises the image distribution given a caption y through the CLIP image embedding z_i:

    P(x | y) = P(x, z_i | y) = P(x | z_i, y) P(z_i | y)        (§2; the first step holds because z_i is a
                                                               deterministic function of x)

so generation is two samples in a row: z_i from the prior P(z_i | y) (`diffusion_prior` or `ar_prior`), then
x from the decoder P(x | z_i, y), then the upsamplers take x from 64 to 256 to 1024 px (here: the base size x4,
x16). `UnCLIP.generate` runs the whole stack; it is built from trained components by
`stages.load_pipeline(run)` and imports none of the run-folder machinery.

Any image x has a bipartite latent (z_i, x_T): z_i = CLIP's image embedding, what CLIP sees, and x_T = the DDIM
inversion of the decoder conditioned on z_i, the residual the decoder needs to reconstruct x (§3). Editing
one part and decoding gives the paper's manipulations: `variations` (the same (z_i, x_T) decoded with DDIM
eta > 0, §3.1), `interpolate` (slerp between two z_i, with x_T fixed or slerped too, §3.2), `text_diff` (move
z_i towards the difference of two captions' z_t, §3.3).
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .clip_model import ClipEncoder
from .decoder import Decoder
from .errors import ConfigError, DataError
from .gaussian_diffusion import randn
from .progress import tqdm

PRIORS = ("diffusion", "ar")
CONDITIONINGS = ("prior", "text_embed", "caption")  # §5.1: caption + prior's z_i, caption + z_t as z_i, caption alone


def stream_names(n_upsamplers: int = 2) -> tuple[str, ...]:
    """The stages of `generate` that draw random numbers: the prior, the decoder, then each upsampler."""
    return ("prior", "decoder") + tuple(f"upsampler{k + 1}" for k in range(n_upsamplers))


STREAMS = stream_names(2)   # the paper's stack: two upsamplers


def stage_generators(seed: int, n_upsamplers: int = 2) -> dict[str, torch.Generator]:
    """One CPU generator per random stage of `UnCLIP.generate` ({name: generator} for `stream_names`), each
    seeded from `seed` through a root generator. Separate streams keep the stages' draws apart: the decoder's
    x_T and the upsamplers' noise for a seed are the same whichever prior, conditioning or number of prior
    candidates drew before them, so a comparison of those settings compares them alone (paired samples).
    The root draws the stages' seeds in order, so a stack with more or fewer upsamplers gives the stages
    it shares with another the same streams."""
    names = stream_names(n_upsamplers)
    root = torch.Generator().manual_seed(int(seed))
    seeds = torch.randint(0, 2 ** 62, (len(names),), generator=root).tolist()
    return {name: torch.Generator().manual_seed(s) for name, s in zip(names, seeds)}


def slerp(a: torch.Tensor, b: torch.Tensor, theta) -> torch.Tensor:
    """Spherical interpolation from `a` (theta = 0) to `b` (theta = 1) along the great circle, `[..., D]`.

    The direction moves at a constant angular speed, so equal steps of theta are equal angles, and its
    norm is interpolated linearly (unit vectors stay unit vectors; two Gaussian x_T of similar norm keep
    theirs). Nearly parallel vectors fall back to a normalised lerp; opposite vectors, where every great
    circle joins them, take the one through a fixed direction orthogonal to `a`. `theta` is a float, or a
    1-D tensor of T values (the result is then `[T, ..., D]`).
    """
    if torch.is_tensor(theta) and theta.ndim == 1:
        return torch.stack([slerp(a, b, float(t)) for t in theta])
    theta = float(theta)
    if a.shape != b.shape:
        raise DataError(f"slerp needs two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
    if bool((na == 0).any() or (nb == 0).any()):
        raise DataError("slerp of a zero vector has no direction: pass non-zero vectors")
    u, v = a64 / na, b64 / nb
    cos = (u * v).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.arccos(cos)                                     # the angle between them [..., 1]
    # w: the unit vector orthogonal to u in the plane of u and v, so dir(theta) = cos(theta w) u + sin(theta w) w
    w_raw = v - cos * u
    w_norm = w_raw.norm(dim=-1, keepdim=True)
    opposite = cos < -1 + 1e-9                                    # every great circle joins them: take the one
    basis = F.one_hot(u.abs().argmin(-1), u.shape[-1]).to(u)      # through the axis least like u
    ortho = F.normalize(basis - (basis * u).sum(-1, keepdim=True) * u, dim=-1)
    w = torch.where(opposite, ortho, w_raw / w_norm.clamp(min=1e-300))
    direction = torch.cos(theta * omega) * u + torch.sin(theta * omega) * w
    parallel = (w_norm < 1e-9) & ~opposite                        # no plane: the normalised lerp
    direction = torch.where(parallel, F.normalize((1 - theta) * u + theta * v, dim=-1), direction)
    return (direction * ((1 - theta) * na + theta * nb)).to(a.dtype)


@dataclass
class Generation:
    """What `UnCLIP.generate` made: the images at every size, and the latents that made them."""
    captions: list[str]                     # one per image: each caption repeated n_per_caption times
    images: dict[int, torch.Tensor]         # side in px -> images [N, 3, S, S] in [-1, 1], smallest first
    image_embed: torch.Tensor               # z_i [N, D] the decoder was given (zeros for 'caption' alone)
    noise: torch.Tensor                     # x_T [N, 3, H, W]: the decoder's starting noise
    text_embed: torch.Tensor                # z_t [N, D] of each image's caption
    conditioning: str                       # 'prior' | 'text_embed' | 'caption'
    prior: str | None                       # 'diffusion' | 'ar' | None (no prior ran)
    seconds: dict[str, float] = field(default_factory=dict)   # wall time of each stage

    @property
    def final(self) -> torch.Tensor:
        """The largest images made."""
        return self.images[max(self.images)]


class UnCLIP:
    """The whole text-to-image stack, from trained components (`stages.load_pipeline(run)` builds one).

    clip: `ClipEncoder`; priors: {'diffusion': DiffusionPrior, 'ar': ARPrior} (either may be missing);
    decoder: `Decoder` (base resolution); upsamplers: the trained `Upsampler`s, base -> x4 -> x16 (none, one
    or both); vocabulary: the toy world's colour and shape words, for a warning when a caption names none.
    """

    def __init__(self, clip: ClipEncoder, decoder: Decoder, priors: dict | None = None, upsamplers=(),
                 vocabulary: dict | None = None, glide: Decoder | None = None):
        if not decoder.cfg.use_image_embed:
            raise ConfigError("UnCLIP's decoder must read z_i: pass the 'decoder' stage, not the GLIDE-style baseline")
        self.clip, self.decoder, self.priors = clip, decoder, dict(priors or {})
        self.upsamplers, self.vocabulary, self.glide = list(upsamplers), dict(vocabulary or {}), glide
        unknown = [p for p in self.priors if p not in PRIORS]
        if unknown:
            raise ConfigError(f"unknown prior {unknown[0]!r}; valid priors: {', '.join(PRIORS)}")
        self.device = decoder.text_to_emb.weight.device
        self.base = decoder.cfg.image_size

    def __repr__(self):
        return (f"UnCLIP(priors={list(self.priors)}, decoder {self.base} px, sizes {self.sizes}, "
                f"device {self.device})")

    @property
    def sizes(self) -> tuple[int, ...]:
        """The image sides this stack can make: the base, then x4 per upsampler."""
        return tuple(self.base * 4 ** k for k in range(len(self.upsamplers) + 1))

    # -- captions ------------------------------------------------------------------------------
    def check_captions(self, captions) -> list[str]:
        """The captions as a list; empty or over-long ones are errors, ones the toy world cannot draw a warning."""
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions)
        if not captions:
            raise DataError("no captions: pass at least one, e.g. 'a red circle left of a blue square'")
        self.clip.tokenize(captions)  # empty / over-long captions fail here, naming the length and the limit
        words = set(self.vocabulary.get("colours", ())) | set(self.vocabulary.get("shapes", ()))
        if words:
            for c in captions:
                if not set(re.findall(r"[a-z]+", c.lower())) & words:
                    warnings.warn(f"caption {c!r} names no colour or shape of the toy world this stack was trained "
                                  f"on, so the images will not follow it; its words: colours "
                                  f"{', '.join(self.vocabulary['colours'])}; shapes {', '.join(self.vocabulary['shapes'])}",
                                  UserWarning, stacklevel=3)
        return captions

    def encode_text(self, captions) -> dict:
        """CLIP's view of captions: z_t `[B, D]`, token features `[B, L, W]`, mask `[B, L]`, token ids `[B, L]`."""
        return self.clip.encode_text(self.check_captions(captions))

    # -- the three steps -----------------------------------------------------------------------
    def prior_sample(self, text: dict, prior: str = "diffusion", generator=None, guidance_scale=None,
                     steps=None, num_candidates=None) -> torch.Tensor:
        """z_i `[B, D]` for captions encoded by `encode_text`, from the named prior (P(z_i | y)).

        num_candidates: the diffusion prior's best-of-N, the candidate with the largest z_i . z_t kept (None: its
        config's, the paper's 2); the AR prior has none (it conditions on a sampled dot product instead)."""
        if prior not in PRIORS:
            raise ConfigError(f"unknown prior {prior!r}; valid priors: {', '.join(PRIORS)}")
        if prior not in self.priors:
            raise ConfigError(f"this stack has no {prior!r} prior (it has {', '.join(self.priors) or 'none'}): "
                              f"train the {'ar_prior' if prior == 'ar' else 'diffusion_prior'} stage")
        if prior == "ar" and num_candidates is not None:
            raise ConfigError(f"{num_candidates!r} candidates (generate's prior_candidates) are for the diffusion "
                              f"prior: the AR prior draws one z_i per caption (leave them at None, or use "
                              f"prior='diffusion')")
        p = self.priors[prior]
        args = (text["text_embed"], text["text_tokens"], text["text_mask"])
        if prior == "diffusion":
            return p.sample(*args, guidance_scale=guidance_scale, num_candidates=num_candidates, steps=steps,
                            generator=generator)
        return p.sample(*args, guidance_scale=guidance_scale, generator=generator)

    def decode(self, image_embed, tokens=None, noise=None, steps=None, guidance_scale=None, eta: float = 0.0,
               generator=None, batch_size: int = 64, text_guidance_scale=None) -> torch.Tensor:
        """Base-resolution images `[B, 3, H, W]` from z_i `[B, D]` (None: the null z_i) and caption token ids;
        `text_guidance_scale` guides the caption apart from z_i (`Decoder.guided_model`)."""
        b = (image_embed if image_embed is not None else tokens).shape[0]
        if noise is None:
            noise = randn((b, 3, self.base, self.base), generator, self.device)
        out = []
        for a in range(0, b, batch_size):
            sl = slice(a, a + batch_size)
            out.append(self.decoder.sample(
                image_embed=None if image_embed is None else image_embed[sl],
                tokens=None if tokens is None else tokens[sl], noise=noise[sl].to(self.device), steps=steps,
                guidance_scale=guidance_scale, eta=eta, generator=generator,
                text_guidance_scale=text_guidance_scale))
        return torch.cat(out)

    def upsample(self, images, size: int, steps=(None, None), generator=None) -> dict:
        """{side: images} for every size from the base up to `size`, through the upsamplers in turn."""
        out, x = {self.base: images}, images
        for k, up in enumerate(self.upsamplers):
            side = self.base * 4 ** (k + 1)
            if side > size:
                break
            x = out[side] = self._upsample_one(up, x, side, steps[k], generator)
        return out

    # The most output pixels one upsampler call takes at once: 4 images of 512 px. On the 2-core CPU, upsampler 2
    # ran 0.81 s per image in chunks of 16 and 0.31-0.35 s in chunks of 4, with the same output (README, speed row).
    chunk_pixels = 4 * 512 * 512

    def _upsample_one(self, up, x, side, steps, generator):
        """One upsampler on a batch, in chunks of as many images as `chunk_pixels` allows (at most 16), its x_T
        drawn up front, so the chunks do not change which noise each image gets."""
        chunk = max(1, min(16, self.chunk_pixels // (side * side)))
        noise = randn((x.shape[0], 3, side, side), generator, torch.device("cpu"))
        return torch.cat([up.upsample(x[a:a + chunk], steps=steps, noise=noise[a:a + chunk].to(up.device))
                          for a in range(0, x.shape[0], chunk)])

    def _size(self, size) -> int:
        named = {"base": self.base, "x4": self.base * 4, "x16": self.base * 16}
        side = named.get(size, size)
        if side not in self.sizes:
            raise ConfigError(f"size {size!r}: this stack makes {', '.join(map(str, self.sizes))} px (base, x4, "
                              f"x16 with both upsamplers trained); pick one of those")
        return int(side)

    @torch.no_grad()
    def generate(self, captions, n_per_caption: int = 1, prior: str = "diffusion", seed: int = 0, size="x16",
                 conditioning: str = "prior", prior_guidance=None, prior_steps=None, decoder_guidance=None,
                 decoder_steps=None, upsampler_steps=(None, None), batch_size: int = 64,
                 progress: bool = False, prior_candidates=None, decoder_text_guidance=None) -> Generation:
        """Images for captions: z_t (CLIP) -> z_i (prior) -> base image (decoder) -> x4 -> x16 (upsamplers).

        n_per_caption: images per caption (each its own z_i and x_T). prior: 'diffusion' | 'ar'. seed: each
        stage draws from its own generator seeded from it (`stage_generators`: the prior, the decoder's x_T and
        sampling noise, each upsampler's), so the same seed gives the same images (bit for bit on one machine;
        another `batch_size` changes only the float rounding, as the noise is drawn up front), and for one seed
        the x_T is the same under every prior, conditioning and `prior_candidates`. size: the largest side to make
        (a side in px, or 'base' | 'x4' | 'x16'). conditioning (§5.1): 'prior' (the caption and the prior's z_i),
        'text_embed' (the caption and its z_t used as if it were z_i: no prior), 'caption' (the caption alone,
        z_i null). prior_candidates: the diffusion prior's best-of-N (`prior_sample`). decoder_text_guidance:
        the caption's own guidance scale in the decoder, apart from z_i's `decoder_guidance` (None: one scale
        for both, the paper's). None step counts, guidance scales and candidates take each stage's config.
        """
        if isinstance(n_per_caption, bool) or not isinstance(n_per_caption, int) or n_per_caption < 1:
            raise ConfigError(f"n_per_caption = {n_per_caption!r}: ask for at least 1 image per caption")
        if conditioning not in CONDITIONINGS:
            raise ConfigError(f"unknown conditioning {conditioning!r}; valid: {', '.join(CONDITIONINGS)} (§5.1)")
        if conditioning == "prior" and prior not in PRIORS:
            raise ConfigError(f"unknown prior {prior!r}; valid priors: {', '.join(PRIORS)}")
        side = self._size(size)
        captions = [c for c in self.check_captions(captions) for _ in range(n_per_caption)]
        gens = stage_generators(seed, len(self.upsamplers))
        seconds = {}
        stages = ["text"] + (["prior"] if conditioning == "prior" else []) + ["decoder"] + \
            [f"upsampler{k + 1}" for k in range(len(self.upsamplers)) if self.base * 4 ** (k + 1) <= side]
        bar = tqdm(total=len(stages), desc="unCLIP", disable=not progress)

        def step(name, fn):
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            out = fn()
            seconds[name] = time.perf_counter() - t0
            bar.update(1)
            return out

        text = step("text", lambda: self.clip.encode_text(captions))
        if conditioning == "prior":
            z = step("prior", lambda: self.prior_sample(text, prior, gens["prior"], prior_guidance, prior_steps,
                                                        prior_candidates))
        elif conditioning == "text_embed":
            z = text["text_embed"]
        else:
            z = None
        noise = randn((len(captions), 3, self.base, self.base), gens["decoder"], torch.device("cpu"))
        base = step("decoder", lambda: self.decode(z, text["tokens"], noise, decoder_steps, decoder_guidance,
                                                   generator=gens["decoder"], batch_size=batch_size,
                                                   text_guidance_scale=decoder_text_guidance))
        images, x = {self.base: base}, base
        for k, up in enumerate(self.upsamplers):
            s = self.base * 4 ** (k + 1)
            if s > side:
                break
            x = step(f"upsampler{k + 1}", lambda: self._upsample_one(up, x, s, upsampler_steps[k],
                                                                   gens[f"upsampler{k + 1}"]))
            images[s] = x
        bar.close()
        image_embed = z if z is not None else torch.zeros_like(text["text_embed"])
        return Generation(captions, {k: v.cpu() for k, v in sorted(images.items())}, image_embed.cpu(), noise,
                          text["text_embed"].cpu(), conditioning, prior if conditioning == "prior" else None, seconds)

    # -- the bipartite latent (z_i, x_T) and the manipulations of §3 -----------------------------------
    # The guidance scale of the inversion and of the decodings that start from an inverted x_T, when none is given:
    # 1 (unguided). DDIM inversion retraces the sampling ODE, and the guided model is not the score of any one
    # density, so its inversion drifts: at toy the guided round trip comes back much further from the image than
    # the unguided one (notebook 09 measures both).
    latent_guidance = 1.0

    def _latent_guidance(self, guidance_scale):
        return self.latent_guidance if guidance_scale is None else guidance_scale

    def _base_images(self, images) -> torch.Tensor:
        if not torch.is_tensor(images) or images.ndim not in (3, 4) or images.shape[-3] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise DataError(f"images must be [B, 3, H, W] (uint8, or float in [-1, 1]), got {shape}")
        x = images[None] if images.ndim == 3 else images
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.base or x.shape[-2] != self.base:
            raise DataError(f"images are {x.shape[-2]}x{x.shape[-1]} but the decoder works at {self.base}x{self.base}: "
                            f"pass the base-resolution image (e.g. Generation.images[{self.base}])")
        return x.to(self.device)

    def _tokens(self, captions, b):
        if captions is None:
            return None
        captions = [captions] * b if isinstance(captions, str) else list(captions)
        return self.clip.encode_text(self.check_captions(captions))["tokens"]

    @torch.no_grad()
    def encode(self, images, captions=None, steps=None, guidance_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The bipartite latent of base-resolution images `[B, 3, H, W]`: (z_i `[B, D]`, x_T `[B, 3, H, W]`).

        z_i is CLIP's image embedding; x_T the DDIM inversion of the decoder conditioned on z_i (and on the
        captions, if given; default: the empty caption), unguided (`latent_guidance`) unless a scale is given.
        """
        x = self._base_images(images)
        z = self.clip.encode_image(x)
        x_t = self.decoder.invert(x, z, self._tokens(captions, len(x)), steps=steps,
                                  guidance_scale=self._latent_guidance(guidance_scale))
        return z, x_t

    @torch.no_grad()
    def variations(self, images=None, eta: float = 0.5, n: int = 4, seed: int = 0, steps=None, guidance_scale=None,
                   captions=None, latents=None) -> torch.Tensor:
        """`n` variations of each image `[B, n, 3, H, W]`: its (z_i, x_T) decoded with DDIM at `eta` (§3.1).

        eta = 0 reconstructs the image (deterministic); larger eta injects fresh noise at every step, so the
        details vary while z_i keeps what CLIP sees. `latents` = (z_i, x_T) from `encode` skips the inversion.
        Use the same guidance scale as the inversion (default for both: `latent_guidance`).
        """
        guidance_scale = self._latent_guidance(guidance_scale)
        if not 0.0 <= float(eta) <= 1.0:
            raise ConfigError(f"eta = {eta!r} must be in [0, 1] (0: reconstruct, 1: DDPM-like)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n = {n!r}: ask for at least 1 variation per image")
        z, x_t = latents if latents is not None else self.encode(images, captions, steps, guidance_scale)
        b = z.shape[0]
        tokens = self._tokens(captions, b)
        g = torch.Generator().manual_seed(int(seed))
        rep = lambda v: None if v is None else v.repeat_interleave(n, dim=0)
        out = self.decoder.sample(image_embed=rep(z), tokens=rep(tokens), noise=rep(x_t), steps=steps,
                                  guidance_scale=guidance_scale, eta=float(eta), generator=g)
        return out.reshape(b, n, *out.shape[1:]).cpu()

    @torch.no_grad()
    def interpolate(self, a, b, thetas, noise: str = "fixed", seed: int = 0, steps=None, guidance_scale=None):
        """Decode slerp(z_i(a), z_i(b), theta) for each theta (§3.2): images `[T, 3, H, W]`, and the z_i `[T, D]`.

        noise='fixed': one random x_T for the whole row (the paper's Figure 4: the ends need not reproduce a
        and b); 'slerp': x_T slerped between the DDIM inversions of a and b, so the ends reconstruct them.
        Guidance (None): the decoder's own scale for 'fixed' (a fresh sample), `latent_guidance` for 'slerp'.
        """
        if noise not in ("fixed", "slerp"):
            raise ConfigError(f"noise = {noise!r}; valid: 'fixed' (one random x_T) or 'slerp' (between inversions)")
        thetas = torch.as_tensor(thetas, dtype=torch.float64).flatten()
        if thetas.numel() == 0 or bool(((thetas < 0) | (thetas > 1)).any()):
            raise ConfigError("thetas must be one or more values in [0, 1] (0: image a, 1: image b)")
        pair = torch.cat([self._base_images(a), self._base_images(b)])
        if noise == "slerp":
            guidance_scale = self._latent_guidance(guidance_scale)
            z, x_t = self.encode(pair, steps=steps, guidance_scale=guidance_scale)
            x_ts = slerp(x_t[0].flatten(), x_t[1].flatten(), thetas).reshape(len(thetas), *x_t.shape[1:])
        else:
            z = self.clip.encode_image(pair)
            g = torch.Generator().manual_seed(int(seed))
            x_ts = randn((1, 3, self.base, self.base), g, torch.device("cpu")).expand(len(thetas), -1, -1, -1)
        zs = slerp(z[0], z[1], thetas).float()                                  # [T, D], unit norm
        images = self.decoder.sample(image_embed=zs, noise=x_ts.to(self.device).contiguous(), steps=steps,
                                     guidance_scale=guidance_scale)
        return images.cpu(), zs.cpu()

    @torch.no_grad()
    def text_diff(self, images, caption_now, caption_new, thetas, steps=None, guidance_scale=None,
                  latents=None):
        """Edit images towards a caption (§3.3): z_d = norm(z_t(new) - z_t(now)); decode slerp(z_i, z_d, theta)
        with each image's own x_T fixed. The captions are one string each, or one per image. Returns images
        `[T, B, 3, H, W]` (theta 0: the reconstruction). Guidance (None): `latent_guidance`, as the inversion."""
        guidance_scale = self._latent_guidance(guidance_scale)
        thetas = torch.as_tensor(thetas, dtype=torch.float64).flatten()
        if thetas.numel() == 0 or bool(((thetas < 0) | (thetas > 1)).any()):
            raise ConfigError("thetas must be one or more values in [0, 1] (the paper: up to 0.25 .. 0.5)")
        z, x_t = latents if latents is not None else self.encode(images, steps=steps, guidance_scale=guidance_scale)
        b = z.shape[0]
        now = [caption_now] * b if isinstance(caption_now, str) else list(caption_now)
        new = [caption_new] * b if isinstance(caption_new, str) else list(caption_new)
        if len(now) != b or len(new) != b:
            raise DataError(f"{b} images but {len(now)} / {len(new)} captions: pass one caption, or one per image")
        t = self.clip.encode_text(self.check_captions(now + new))["text_embed"]
        diff = t[b:] - t[:b]                                                     # [B, D]
        same = diff.norm(dim=-1) < 1e-6
        if bool(same.any()):
            i = int(same.nonzero()[0])
            raise DataError(f"the captions {now[i]!r} and {new[i]!r} have the same CLIP text embedding: there is "
                            f"no direction to edit along; change the new caption")
        z_d = F.normalize(diff, dim=-1)
        out = []
        for theta in thetas.tolist():
            z_theta = slerp(z, z_d, theta).float()
            out.append(self.decoder.sample(image_embed=z_theta, noise=x_t, steps=steps, guidance_scale=guidance_scale))
        return torch.stack(out).cpu()
