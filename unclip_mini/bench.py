"""Speed benchmarks: each writes one JSON file under `<run>/bench/` (never a timed test).

    python -m unclip_mini bench [data prior ar_prior decoder upsampler pipeline] [--preset toy] [--peer]

Every benchmark times freshly initialised networks of the run's config on random inputs (speed does not
depend on the weights), so none needs a trained stage and each runs at any preset. Every file has the same
layout: {"benchmark", "preset", "device", "wall_s", "machine" (what it ran on: device, threads, cores,
torch, load average, and the machine's matmul rate measured in the same run), "result"}, and every timed
network in "result" reports `params`, `batch_size`, `train_step_s` (forward + backward + AdamW, in the
preset's precision: bf16 where it runs natively, see train.autocast) and `sample_step_s` (one guided
sampling step) where they apply, and beside a training step its FLOPs (`train_flops`: the matmuls,
convolutions and attention of forward + backward, counted by torch's FlopCounterMode), the rate it achieved
(`train_flop_per_s`) and that rate over the matmul rate (`train_vs_matmul`). One timer (`timed`) and one
pair of step helpers (`train_step_time`, `sample_step_time`) serve all.
`batch_size` overrides the configs' training batches (the paper's do not fit one GPU).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import atomic_write_json
from .errors import ConfigError
from .train import autocast, bf16_runs_natively

BENCHMARKS = ("data", "prior", "ar_prior", "decoder", "upsampler", "pipeline")
PEER_SCRIPT = Path(__file__).with_name("peer_bench.py")  # standalone: runs in the peer's own venv
PEER_PYTHON = os.environ.get("UNCLIP_PEER_PYTHON", "/tmp/peer/bin/python")


def cpu_kind() -> dict:
    """The CPU's model name and the widest bf16 matrix unit it reports (`amx_bf16`, `avx512_bf16` or none).

    oneDNN picks its bf16 kernels by that unit, and kernels that sum in another order round differently:
    two machines that differ here train different weights from the same seed (README, Reliability)."""
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    bf16 = next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)
    return {"cpu": name, "cpu_bf16": bf16}


def machine() -> dict:
    """What a timing was measured on."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), **cpu_kind(),
            "platform": platform.platform(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


# ---------------------------------------------------------------------------------------------
# one timer, two step helpers
# ---------------------------------------------------------------------------------------------

def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int = 5, warmup: int = 1, device="cpu", best: bool = False) -> float:
    """Median (`best`: fastest) wall seconds of `fn()` over `repeats` calls after `warmup` calls (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times) if best else sorted(times)[len(times) // 2]


def train_step_time(model: nn.Module, loss_fn, repeats: int = 5, device="cpu", lr: float = 1e-4,
                    precision: str = "fp32") -> tuple[float, int]:
    """(seconds, FLOPs) of one training step: `loss_fn(model)` -> scalar, backward, AdamW. The FLOPs are those
    of forward + backward that FlopCounterMode counts (matmuls, convolutions, attention), from one more step."""
    from torch.utils.flop_counter import FlopCounterMode
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_fn(model)
        loss.backward()
        opt.step()
    seconds = timed(step, repeats, device=device)
    with FlopCounterMode(display=False) as counter:
        with autocast(device, precision):
            loss = loss_fn(model)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    return seconds, int(counter.get_total_flops())


def matmul_rate(device="cpu", dtype=torch.float32, n: int | None = None, repeats: int = 10) -> float:
    """FLOP/s of the fastest of `repeats` square n x n matmuls (n = 1024 on a CPU, 8192 on a GPU): the machine's
    practical peak at this thread count (the least disturbed call: the steps keep their fastest round too)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, repeats, warmup=2, device=device, best=True)


def matmul_rates(device) -> dict:
    rates = {"matmul_flop_per_s": matmul_rate(device)}
    if bf16_runs_natively(device):
        rates["matmul_bf16_flop_per_s"] = matmul_rate(device, torch.bfloat16)
    return rates


def add_rates(result, rate: float):
    """Beside every training step in `result` (nested dicts): its achieved FLOP/s and that over `rate`."""
    if isinstance(result, dict):
        if result.get("train_flops") and result.get("train_step_s"):
            result["train_flop_per_s"] = result["train_flops"] / result["train_step_s"]
            result["train_vs_matmul"] = result["train_flop_per_s"] / rate
        for v in result.values():
            add_rates(v, rate)
    return result


def sample_step_time(fn, repeats: int = 5, device="cpu") -> float:
    """Seconds of one sampling step `fn()` (no gradients)."""
    def step():
        with torch.no_grad():
            fn()
    return timed(step, repeats, device=device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def transformer_training_flops(transformer: nn.Module, positions: float, batch_size: int, steps: int) -> float:
    """Training FLOPs of a prior's transformer: 6 x (weights of its linear layers) x positions processed.

    Forward 2 and backward 4 FLOPs per weight and position. Left out, a few percent at toy sizes: the input
    projections and output head (outside the shared transformer) and the attention scores (~L / 6W of it).
    """
    weights = sum(m.weight.numel() for m in transformer.modules() if isinstance(m, nn.Linear))
    return 6.0 * weights * positions * batch_size * steps


# ---------------------------------------------------------------------------------------------
# the benchmarks
# ---------------------------------------------------------------------------------------------

def bench_data(run, n: int = 2000) -> dict:
    """Scenes per second: generating `n` train scenes and rendering them, at the base and the x4 size."""
    from .data import ToyWorld
    world, out = ToyWorld(run.cfg.data), {}
    for res in (run.cfg.data.resolution, 4 * run.cfg.data.resolution):
        t0 = time.perf_counter()
        scenes = world.scenes(range(n))
        t1 = time.perf_counter()
        world.render(scenes, res)
        t2 = time.perf_counter()
        out[f"{res}px"] = {"scenes_per_s": n / (t2 - t0), "generate_s": t1 - t0, "render_s": t2 - t1, "n": n}
    return out


def _text_inputs(run, b: int, text_len: int = 16):
    clip, dev = run.cfg.clip, run.device
    text_len = min(text_len, clip.context_length)
    return (F.normalize(torch.randn(b, clip.embed_dim, device=dev), dim=-1),
            torch.randn(b, text_len, clip.text_width, device=dev), torch.ones(b, text_len, dtype=torch.bool, device=dev))


def time_prior(run, b: int, repeats: int = 5, sample_captions: int = 32, whole: bool = True) -> dict:
    """The diffusion prior at the configured size: a training step, a guided sampling step, one embedding."""
    from . import gaussian_diffusion as gd
    from .diffusion_prior import DiffusionPrior, DiffusionPriorNetwork, loss_fn
    cfg, clip, dev = run.cfg.diffusion_prior, run.cfg.clip, run.device
    torch.manual_seed(0)
    model = DiffusionPriorNetwork(cfg, clip.embed_dim, clip.text_width, clip.context_length).to(dev)
    fn = loss_fn(gd.create_diffusion(cfg.diffusion).to(dev), cfg.scale_for(clip.embed_dim), cfg.cond_drop_prob)
    g = torch.Generator(device=dev).manual_seed(0)
    zt, tokens, mask = _text_inputs(run, b)
    zi = F.normalize(torch.randn(b, clip.embed_dim, device=dev), dim=-1)
    train_s, flops = train_step_time(model, lambda m: fn(m, (zi, zt, tokens, mask), g)[0], repeats, dev,
                                     precision=cfg.train.precision)
    prior = DiffusionPrior(model, cfg, dev)
    te, tt, tm = _text_inputs(run, sample_captions)
    cache = model.encode_prefix(*gd.with_null_rows(te, tt, tm))
    x, t = torch.randn(sample_captions, clip.embed_dim, device=dev), torch.full((sample_captions,), 10, device=dev)
    guided = gd.classifier_free_guidance(lambda x_, t_: model.forward_cached(x_, t_, cache), 2.0)
    step_s = sample_step_time(lambda: guided(x, t), repeats, dev)
    out = {"params": count_parameters(model), "batch_size": b, "train_step_s": train_s, "train_flops": flops,
           "sample_step_s": step_s, "sample_batch": sample_captions, "sample_steps": cfg.sample_steps,
           "num_candidates": cfg.num_candidates, "width": cfg.width, "layers": cfg.layers, "heads": cfg.heads,
           "text_len": tokens.shape[1]}
    if whole:
        out["sample_s_per_embedding"] = timed(lambda: prior.sample(te, tt, tm, generator=g), max(1, repeats // 2),
                                              device=dev) / sample_captions
    return out


def bench_prior(run, peer: bool = False, batch_size: int | None = None, repeats: int = 5, rounds: int = 3,
                sample_captions: int = 32) -> dict:
    """This run's diffusion prior (training step, guided sampling step, one embedding) and, with `peer`,
    dalle2-pytorch's `DiffusionPrior` at the same parameter count, depth and heads, on the same batch, caption
    length and sampling batch (peer_bench.py --mode prior in the peer's venv), alternating for `rounds` rounds
    (each keeps its fastest; see `bench_decoder`); ratios > 1: ours is faster."""
    b = batch_size or run.cfg.diffusion_prior.train.batch_size
    _check_peer(peer)
    runs, dim = {"ours": [], "peer": []}, None
    for k in range(rounds if peer else 1):
        runs["ours"].append(time_prior(run, b, repeats, sample_captions, whole=k == 0))
        if peer:
            ours = runs["ours"][0]
            args = ["--mode", "prior", "--params", ours["params"], "--depth", ours["layers"], "--heads", ours["heads"],
                    "--batch-size", b, "--text-len", ours["text_len"], "--sample-batch", sample_captions,
                    "--repeats", repeats, "--threads", torch.get_num_threads(), "--device", run.device]
            runs["peer"].append(_peer(args + (["--dim", dim] if dim else [])))
            dim = runs["peer"][0]["dim"]
    return _compare(runs["ours"], runs["peer"], rounds)


def bench_ar_prior(run, batch_size: int | None = None, repeats: int = 5, sample_captions: int = 64) -> dict:
    """The AR prior at the configured size: a training step, and drawing every code with and without the
    KV cache. K (codes per embedding) is the config's `n_components`, else the trained stage's, else D/4."""
    from .ar_prior import ARPriorNetwork, ar_loss_fn
    from .stages import read_record
    cfg, clip, dev = run.cfg.ar_prior, run.cfg.clip, run.device
    record = read_record(run, "ar_prior")
    k = cfg.n_components or (record["dims"]["n_components"] if record else max(1, clip.embed_dim // 4))
    torch.manual_seed(0)
    model = ARPriorNetwork(cfg, clip.embed_dim, clip.text_width, clip.context_length, k).to(dev)
    b = batch_size or cfg.train.batch_size
    zt, tokens, mask = _text_inputs(run, b)
    batch = {"text_tokens": tokens, "text_mask": mask, "text_embed": zt,
             "dot_codes": torch.randint(0, cfg.dot_buckets, (b,), device=dev),
             "codes": torch.randint(0, cfg.n_buckets, (b, k), device=dev)}
    fn, g = ar_loss_fn(cfg.cond_drop_prob), torch.Generator(device=dev).manual_seed(0)
    train_s, flops = train_step_time(model, lambda m: fn(m, batch, g)[0], repeats, dev, precision=cfg.train.precision)
    model.eval()
    te, tt, tm = _text_inputs(run, sample_captions)
    dots = torch.randint(0, cfg.dot_buckets, (sample_captions,), device=dev)
    out = {"params": count_parameters(model), "batch_size": b, "train_step_s": train_s, "train_flops": flops,
           "n_components": k, "sample_batch": sample_captions}
    for name, cache in (("cache", True), ("no_cache", False)):
        s = timed(lambda: model.sample_codes(tt, tm, te, dots, generator=g, use_cache=cache), max(1, repeats // 2),
                  device=dev)
        out[f"sample_s_per_embedding_{name}"] = s / sample_captions
    out["sample_step_s"] = out["sample_s_per_embedding_cache"] * sample_captions / k  # one code for the batch
    out["cache_speedup"] = out["sample_s_per_embedding_no_cache"] / out["sample_s_per_embedding_cache"]
    return out


def time_decoder(cfg, batch_size: int, repeats: int = 5, device="cpu") -> dict:
    """A fresh decoder of config `cfg`: a training step and a guided sampling step (the doubled batch)."""
    from . import gaussian_diffusion as gd
    from .decoder import CLIP_VOCAB_SIZE, Decoder
    torch.manual_seed(0)
    model = Decoder(cfg).to(device)
    b, s = batch_size, cfg.image_size
    x = torch.randn(b, 3, s, s, device=device)
    z = F.normalize(torch.randn(b, cfg.clip_dim, device=device), dim=-1) if cfg.use_image_embed else None
    tokens = torch.zeros(b, 12, dtype=torch.long, device=device)
    tokens[:, :11] = torch.randint(1, 40000, (b, 11))
    tokens[:, 11] = CLIP_VOCAB_SIZE - 1                                # an end-of-text id
    g = torch.Generator(device=device).manual_seed(0)
    train_s, flops = train_step_time(model, lambda m: m.training_losses(x, z, tokens, g)["loss"].mean(), repeats,
                                     device, precision=cfg.train.precision)
    model.eval()
    rows = (z, tokens) if z is not None else (tokens,)
    *rows, drop = gd.with_null_rows(*rows)
    cond = model.condition(rows[0] if z is not None else None, rows[-1], drop=drop)
    guided = gd.classifier_free_guidance(lambda x_, t_: model.unet(x_, t_, **cond), 3.0)
    t = torch.full((b,), 500, device=device)
    sample_s = sample_step_time(lambda: guided(x, t), repeats, device)
    return {"params": model.num_parameters(), "params_no_embedding": model.num_parameters(False),
            "unet_params": count_parameters(model.unet), "batch_size": b, "image_size": s,
            "train_step_s": train_s, "train_flops": flops, "sample_step_s": sample_s}


def bench_decoder(run, peer: bool = False, batch_size: int | None = None, repeats: int = 5, rounds: int = 3,
                  threads: int | None = None) -> dict:
    """This run's decoder (training step, guided sampling step), the same without the pixel unshuffle, and
    with `peer` dalle2-pytorch's `Unet` at the same parameter count (the token table excluded: a lookup costs
    nothing) and resolution, run by peer_bench.py in the peer's own venv (`$UNCLIP_PEER_PYTHON`, default
    /tmp/peer/bin/python; `python -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.14.1
    torchvision==0.29.1 dalle2-pytorch`). Ours and the peer's alternate for `rounds` rounds and each keeps its
    fastest round: on a shared CPU the minimum is the least disturbed measurement."""
    cfg = run.cfg.decoder
    b = batch_size or cfg.train.batch_size
    device = str(run.device)
    _check_peer(peer)
    plain = cfg.replace(unet=cfg.unet.replace(pixel_unshuffle=1)) if cfg.unet.pixel_unshuffle > 1 else None
    runs = {"ours": [], "ours_no_unshuffle": [], "peer": []}
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dim = None
        for _ in range(rounds):
            runs["ours"].append(time_decoder(cfg, b, repeats, device))
            if plain is not None:
                runs["ours_no_unshuffle"].append(time_decoder(plain, b, repeats, device))
            if peer:
                args = ["--mode", "unet", "--params", runs["ours"][0]["params_no_embedding"], "--image-size",
                        cfg.image_size, "--batch-size", b, "--repeats", repeats, "--threads", torch.get_num_threads(),
                        "--image-embed-dim", cfg.clip_dim, "--text-embed-dim", cfg.text_width, "--device", device]
                runs["peer"].append(_peer(args + (["--dim", dim] if dim else [])))
                dim = runs["peer"][0]["dim"]
    finally:
        torch.set_num_threads(old_threads)
    result = _compare(runs["ours"], runs["peer"], rounds)
    result["ours_no_unshuffle"] = _best(runs["ours_no_unshuffle"])
    if runs["peer"] and runs["ours_no_unshuffle"]:
        plain = result["ours_no_unshuffle"]
        result["ratio_train_no_unshuffle"] = result["peer"]["train_step_s"] / plain["train_step_s"]
        result["ratio_sample_no_unshuffle"] = result["peer"]["sample_step_s"] / plain["sample_step_s"]
    return result


def _best(rows):
    """The first round's figures with each step time replaced by its fastest round (all rounds kept)."""
    if not rows:
        return None
    out = dict(rows[0])
    for key in ("train_step_s", "sample_step_s"):
        out[key] = min(r[key] for r in rows)
        out[key + "_all_rounds"] = [r[key] for r in rows]
    return out


def _compare(ours: list, theirs: list, rounds: int) -> dict:
    result = {"rounds": rounds, "ours": _best(ours)}
    if theirs:
        result["peer"] = _best(theirs)
        result["ratio_train"] = result["peer"]["train_step_s"] / result["ours"]["train_step_s"]   # > 1: ours faster
        result["ratio_sample"] = result["peer"]["sample_step_s"] / result["ours"]["sample_step_s"]
    return result


def _check_peer(peer: bool):
    if peer and not Path(PEER_PYTHON).exists():
        raise ConfigError(f"the peer's python {PEER_PYTHON} does not exist: create its venv with `python -m "
                          f"venv /tmp/peer && /tmp/peer/bin/pip install torch==2.14.1 torchvision==0.29.1 "
                          f"dalle2-pytorch`, or set UNCLIP_PEER_PYTHON")


def _peer(args) -> dict:
    """One run of peer_bench.py in the peer's venv with `args`; its JSON line as a dict."""
    cmd = [PEER_PYTHON, str(PEER_SCRIPT), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"the peer benchmark failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_upsampler(run, step_counts=None, n: int = 1, repeats: int = 3, batch_size: int | None = None) -> dict:
    """Each upsampler at the configured size: a training step (one batch of crops) and a sampling step on
    whole images; and the seconds per image of the chain base -> x4 -> x16 at each pair of step counts
    (default (5, 5), (10, 10) and the configs' own)."""
    from .gaussian_diffusion import create_diffusion, randn
    from .unet import UNetModel
    from .upsampler import SCALE, Upsampler, model_fn, resize_cond
    dev, base = run.device, run.cfg.data.resolution
    ups, out = {}, {}
    for stage in (1, 2):
        cfg = getattr(run.cfg, f"upsampler{stage}")
        torch.manual_seed(0)
        net = UNetModel(cfg.unet).to(dev)
        diffusion = create_diffusion(cfg.diffusion)
        c, b = cfg.crop_size, batch_size or cfg.train.batch_size
        x0, cond = torch.randn(b, 3, c, c, device=dev), torch.randn(b, 3, c, c, device=dev)
        g = torch.Generator(device=dev).manual_seed(0)

        def loss(m):
            t = diffusion.sample_timesteps(b, g, dev)
            return diffusion.training_losses(model_fn(m, cfg.cond_skip), x0, t, {"cond": cond},
                                             randn(x0.shape, g, dev))["loss"].mean()
        train_s, flops = train_step_time(net, loss, repeats, dev, precision=cfg.train.precision)
        side = base * SCALE ** stage
        xt = torch.randn(n, 3, side, side, device=dev)
        low = resize_cond(torch.randn(n, 3, side // SCALE, side // SCALE, device=dev), (side, side))
        net.eval()
        step_s = sample_step_time(lambda: model_fn(net, cfg.cond_skip)(xt, torch.zeros(n, dtype=torch.long,
                                                                                       device=dev), cond=low),
                                  repeats, dev)
        out[f"upsampler{stage}"] = {"params": count_parameters(net), "batch_size": b, "crop_size": c,
                                    "train_step_s": train_s, "train_flops": flops, "sample_step_s": step_s,
                                    "sample_image_size": side,
                                    "sample_batch": n}
        ups[stage] = Upsampler(cfg, net, dev)
    step_counts = step_counts or ((5, 5), (10, 10), (ups[1].cfg.sample_steps, ups[2].cfg.sample_steps))
    low = torch.rand(n, 3, base, base, device=dev) * 2 - 1
    g = torch.Generator().manual_seed(0)
    for s1, s2 in step_counts:
        t1 = timed(lambda: ups[1].upsample(low, steps=s1, generator=g), 1, 0, dev)
        mid = ups[1].upsample(low, steps=2, generator=g)
        t2 = timed(lambda: ups[2].upsample(mid, steps=s2, generator=g), 1, 0, dev)
        out[f"chain_s_per_image@{s1}+{s2}"] = (t1 + t2) / n
        out[f"upsampler1_s_per_image@{s1}"], out[f"upsampler2_s_per_image@{s2}"] = t1 / n, t2 / n
    return out


def fresh_pipeline(run):
    """unCLIP built from freshly initialised components of the run's config (CLIP, diffusion prior, decoder,
    both upsamplers): the same networks, so the same speed, as a trained stack, with nothing to train."""
    from .clip_model import ClipEncoder, create_clip
    from .decoder import Decoder
    from .diffusion_prior import DiffusionPrior, DiffusionPriorNetwork
    from .unclip import UnCLIP
    from .unet import UNetModel
    from .upsampler import Upsampler
    cfg, dev = run.cfg, run.device
    torch.manual_seed(0)
    clip = ClipEncoder(*create_clip(cfg.clip), cfg.clip, dev)
    prior = DiffusionPrior(DiffusionPriorNetwork(cfg.diffusion_prior, cfg.clip.embed_dim, cfg.clip.text_width,
                                                 cfg.clip.context_length), cfg.diffusion_prior, dev)
    ups = [Upsampler(getattr(cfg, f"upsampler{k}"), UNetModel(getattr(cfg, f"upsampler{k}").unet), dev) for k in (1, 2)]
    return UnCLIP(clip, Decoder(cfg.decoder).to(dev).eval(), priors={"diffusion": prior}, upsamplers=ups)


def bench_pipeline(run, batches=(1, 16)) -> dict:
    """Text -> x16 image through the whole stack at the configs' step counts: seconds per image, in all and per
    stage (text, prior, decoder, upsampler1, upsampler2), at each batch size (one warm-up call first)."""
    pipe = fresh_pipeline(run)
    captions = [s.caption for s in run.world.scenes(range(max(batches)), "val")]
    pipe.generate(captions[:1], size=pipe.base * 4, decoder_steps=2, upsampler_steps=(2, 2))   # warm-up
    out = {"sizes": list(pipe.sizes), "steps": {
        "prior": run.cfg.diffusion_prior.sample_steps, "decoder": run.cfg.decoder.sample_steps,
        "upsampler1": run.cfg.upsampler1.sample_steps, "upsampler2": run.cfg.upsampler2.sample_steps}}
    for b in batches:
        _sync(run.device)
        t0 = time.perf_counter()
        gen = pipe.generate(captions[:b], batch_size=b)
        _sync(run.device)
        total = time.perf_counter() - t0
        out[f"batch{b}"] = {"s_per_image": total / b, **{f"{k}_s_per_image": v / b for k, v in gen.seconds.items()}}
    return out


def run_benchmark(run, name: str, peer: bool = False, batch_size: int | None = None) -> dict:
    """Run one benchmark on `run`, write `<run>/bench/<name>.json`, return its dict. `batch_size` replaces the
    configs' training batches (data and pipeline have none)."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size = {batch_size!r} must be a positive int (or None for the configs')")
    before = matmul_rates(run.device)     # measured in this run, before and after the steps: the faster counts
    t0 = time.perf_counter()
    b = {"batch_size": batch_size}
    fn = {"data": bench_data, "prior": lambda r: bench_prior(r, peer=peer, **b),
          "ar_prior": lambda r: bench_ar_prior(r, **b), "upsampler": lambda r: bench_upsampler(r, **b),
          "decoder": lambda r: bench_decoder(r, peer=peer, **b), "pipeline": bench_pipeline}[name]
    result = fn(run)
    wall = time.perf_counter() - t0
    rates = {k: max(v, before[k]) for k, v in matmul_rates(run.device).items()}
    add_rates(result, rates["matmul_bf16_flop_per_s" if bf16_runs_natively(run.device) and
                            _precision(run, name) == "bf16" else "matmul_flop_per_s"])
    out = {"benchmark": name, "preset": run.preset, "device": str(run.device), "wall_s": wall,
           "machine": {**machine(), **rates}, "result": result}
    atomic_write_json(out, run.folder.path("bench", f"{name}.json"))
    return out


def _precision(run, name: str) -> str:
    field = {"prior": "diffusion_prior", "upsampler": "upsampler1"}.get(name, name)
    part = getattr(run.cfg, field, None)
    return part.train.precision if part is not None and hasattr(part, "train") else "fp32"


def main(run, names=None, peer: bool = False, batch_size: int | None = None) -> dict:
    """Run the named benchmarks (default all), printing where each wrote its JSON."""
    names = list(names or BENCHMARKS)
    for n in names:
        if n not in BENCHMARKS:
            raise ConfigError(f"unknown benchmark {n!r}; valid: {', '.join(BENCHMARKS)}")
    results = {}
    for n in names:
        print(f"bench {n} ...", flush=True)
        results[n] = run_benchmark(run, n, peer=peer, batch_size=batch_size)
        print(f"  -> {run.folder.path('bench', n + '.json')} ({results[n]['wall_s']:.1f} s)", flush=True)
    return results
