"""One training loop for every stage: EMA, checkpoints, exact resume, progress, mixed precision, DDP.

A stage supplies a model, a way to build a batch from dataset indices, and a loss function; the loop
does the rest. Each component says how, in one `StageSpec` (at the bottom), which `stages.py` reads to
train, record, check and load the stage. What the loop guarantees:

- **Exact resume.** A checkpoint holds the model, the EMA, the optimizer, the LR scheduler, the step,
  and every random state (torch, numpy, python, the loop's own generator, the data order). Killing a
  run at any point and restarting it gives, on CPU, the same final weights bit for bit.
- **No torn files.** Checkpoints are written to a temporary file and renamed (artifacts.py), and read
  back with `torch.load(weights_only=True)`.
- **Loud failures.** A NaN or infinite loss stops training with the step and the last good checkpoint.

Randomness inside `loss_fn` (timesteps, noise, condition dropout) must come from the `generator` it is
given, through `distributed.rand / randn / randint` (or helpers built on them, e.g.
`gaussian_diffusion.randn`); the model's own dropout uses torch's global RNG, which is checkpointed too.

Under `torchrun` each rank takes its slice of every global batch; the network is wrapped in DDP, or sharded
with FSDP (`TrainConfig.parallel`); the per-example draws do not depend on the split, so N processes train
what one process would on the same global batch (distributed.py says how); the logged loss is the mean over
ranks; rank 0 alone writes the checkpoint, which holds every rank's random states, so each rank resumes
its own streams.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from .progress import tqdm

from . import distributed
from .artifacts import atomic_torch_save, make_meta, safe_torch_load
from .config import PresetConfig, check, check_choice, check_positive, check_range, diff_configs
from .distributed import BatchGenerator, DistributedError, dist_info, init_distributed, on_rank0  # noqa: F401
from .errors import CheckpointError, ConfigError, DeviceError, TrainingDiverged

CHECKPOINT_FORMAT = "unclip_mini.checkpoint/1"


@dataclass(frozen=True)
class TrainConfig(PresetConfig):
    """How long and how a stage trains (each stage's config holds one)."""
    steps: int = 1000             # optimizer steps
    batch_size: int = 32          # global batch (split across DDP ranks)
    lr: float = 1e-3              # peak learning rate (paper decoder: 1.2e-4 at batch 2048)
    warmup_steps: int = 100       # linear LR warm-up
    lr_schedule: str = "constant"  # after warm-up: 'constant' | 'cosine' (to 10% of lr)
    weight_decay: float = 0.0     # AdamW (paper: 6e-2 diffusion prior, 4e-2 AR prior, none for the image models)
    decay_1d: bool = True         # decay the 1-D parameters too (biases, norm gains); paper: not stated, so at
                                  # `paper` False (OpenAI's CLIP decays neither gains nor biases); True below (ours)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8             # Adam epsilon (paper: 1e-6 diffusion prior, 1e-10 AR prior, 1e-8 the others)
    grad_clip: float = 1.0        # max gradient norm, 0 = off; paper: none stated (ADM and GLIDE's code do not
                                  # clip), so 0 at `paper`; 1.0 below (ours, not measured)
    ema_decay: float = 0.999      # max EMA decay; warm-up min(decay, (1+n)/(10+n)) (paper: 0.9999)
    ckpt_every: int = 500         # checkpoint every this many steps (and at the end)
    log_every: int = 10           # history / progress-bar refresh period
    precision: str = "fp32"       # 'fp32' | 'bf16' (autocast, on CUDA and on CPUs with bf16 kernels: autocast())
    parallel: str = "ddp"         # under torchrun: 'ddp' (a replica per rank) | 'fsdp' (fully_shard: weights,
                                  # gradients, optimizer state and EMA sharded; the paper's >= 1B models)

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "ckpt_every", "log_every")
        check_range(self, "lr", 0, low_open=True)
        check_range(self, "warmup_steps", 0, integer=True)
        check_choice(self, "lr_schedule", ("constant", "cosine"))
        check_range(self, "weight_decay", 0)
        check_range(self, "grad_clip", 0)
        check_range(self, "eps", 0, low_open=True)
        check_choice(self, "decay_1d", (True, False))
        check_choice(self, "parallel", ("ddp", "fsdp"))
        check_range(self, "ema_decay", 0, 1)
        check_choice(self, "precision", ("fp32", "bf16"))
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), self, "betas",
              "two numbers in [0, 1)")

    def lr_at(self, step: int) -> float:
        """Learning-rate multiplier at `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            p = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        return 1.0


# ---------------------------------------------------------------------------------------------
# devices (the process group: distributed.py)
# ---------------------------------------------------------------------------------------------

def resolve_device(device=None) -> torch.device:
    """'auto'/None -> cuda if available else cpu; a device this machine lacks fails clearly."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was requested but this machine has no CUDA GPU "
                          f"(torch.cuda.is_available() is False): use device='cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r} does not exist: this machine has "
                          f"{torch.cuda.device_count()} GPU(s); use cuda:0..")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r} is not supported: use 'auto', 'cpu' or 'cuda'")
    return dev


def bf16_runs_natively(device) -> bool:
    """Whether bf16 arithmetic is native on `device`: any CUDA GPU here, and a CPU whose oneDNN has bf16
    kernels (AVX512-BF16 or AMX). Elsewhere a CPU emulates bf16 and autocast would run slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device, precision: str = "fp32"):
    """The autocast context of a training step at `precision` ('fp32' | 'bf16') on `device`: bf16 where it runs
    natively (see bf16_runs_natively), else off (fp32), so one config trains on any machine."""
    device = torch.device(device)
    on = precision == "bf16" and bf16_runs_natively(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


# ---------------------------------------------------------------------------------------------
# EMA, data order, random states
# ---------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of a model's parameters, with warm-up.

    decay_n = min(max_decay, (1 + n) / (10 + n)): early on the average follows the model closely,
    so a short run's EMA is not dominated by its random initialisation.
    """

    def __init__(self, model: torch.nn.Module, max_decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.max_decay = max_decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int):
        d = min(self.max_decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


class EpochSampler:
    """Batches of dataset indices: a fresh permutation per epoch from (seed, epoch).

    The data order is a pure function of (seed, epoch, position), so its whole state is two ints.
    """

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < 1:
            raise ConfigError("the training set is empty: check the data config (train_size)")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = None

    def _permutation(self):
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.size, generator=g)
        return self._perm

    def next(self) -> torch.Tensor:
        """The next `batch_size` indices (wrapping into the next epoch) `[batch_size]`."""
        out = []
        need = self.batch_size
        while need:
            perm = self._permutation()
            take = perm[self.pos:self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= self.size:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return torch.cat(out)

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s):
        self.epoch, self.pos, self._perm = int(s["epoch"]), int(s["pos"]), None


def get_rng_state(generator: torch.Generator) -> dict:
    """Every random state that training touches, as weights_only-loadable values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    generator.set_state(state["generator"])


def seed_everything(seed: int):
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def load_checkpoint(path, *, stage: str | None = None, config: dict | None = None,
                    fix: str = "train the stage again", mmap: bool = False) -> dict:
    """Read a training checkpoint written by `Trainer`, refusing foreign or mismatched ones.

    `config` (a dict) must equal the one stored, except for `train.steps` (training may be extended).
    """
    ckpt = safe_torch_load(path, what="checkpoint", fix=fix, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an unclip_mini training checkpoint (no "
                              f"{CHECKPOINT_FORMAT!r} marker): pass a checkpoint this library wrote")
    if not isinstance(ckpt.get("meta"), dict):
        raise CheckpointError(f"{path} has no provenance record ('meta'): it was not written by this library's "
                              f"Trainer; {fix}")
    have = ckpt["meta"].get("kind")
    if stage is not None and have != stage:
        raise CheckpointError(f"{path} holds a {have!r} checkpoint, not a {stage!r} one: "
                              f"pass the {stage} checkpoint (runs/<preset>/{stage}/checkpoint.pt)")
    if config is not None:
        diffs = [d for d in diff_configs(without_steps(ckpt["meta"]["config"]), without_steps(config))]
        if diffs:
            raise CheckpointError(f"{path} was trained with another config ({'; '.join(diffs[:6])}): "
                                  f"use the matching preset, or delete the folder {os.path.dirname(path)} "
                                  f"to retrain")
    return ckpt


def without_steps(cfg):
    """The config without any `train.steps` (at any depth): training may be extended."""
    if not isinstance(cfg, dict):
        return cfg
    out = {k: without_steps(v) for k, v in cfg.items()}
    if isinstance(out.get("train"), dict):
        out["train"] = {k: v for k, v in out["train"].items() if k != "steps"}
    return out


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

class Trainer:
    """Train `model` for `cfg.steps` steps with resume from `ckpt_path`.

    Args:
        model: the module to train (moved to `device`).
        loss_fn: `loss_fn(model, batch, generator) -> (loss scalar, logs dict of floats)`; `model` may be a
            DDP wrapper, so the loss must call its forward; per-example draws go through `distributed.rand`,
            `randn`, `randint` with `generator` (a `distributed.BatchGenerator`).
        get_batch: `get_batch(indices [b] LongTensor) -> batch` (anything `loss_fn` understands),
            already on `device` or moved by `loss_fn`.
        dataset_size: number of training examples the indices range over.
        cfg: TrainConfig.
        ckpt_path: where the checkpoint lives; an existing one is resumed.
        stage: the stage's name, stored in and checked against the checkpoint.
        config: the stage's whole config as a dict (stored; a checkpoint made with another refuses).
        requires: ids of the artifacts this stage was trained from (e.g. the CLIP it used).
        seed: seeds model init beforehand (caller), the data order and the loop's generator.
    """

    def __init__(self, model, loss_fn, get_batch, dataset_size, cfg: TrainConfig, ckpt_path, *,
                 stage: str, config: dict, requires: dict | None = None, seed: int = 0,
                 device=None, progress: bool = True, on_checkpoint=None):
        self.cfg, self.stage, self.config, self.requires = cfg, stage, config, dict(requires or {})
        self.ckpt_path, self.seed = ckpt_path, seed
        self.device = resolve_device(device)
        self.rank, self.world = dist_info()
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {self.world} "
                              f"torchrun processes: choose a multiple of {self.world}")
        self.model = model.to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.train_model = self.model
        self.sharded = self.world > 1 and cfg.parallel == "fsdp"
        if self.sharded:  # in place: the model's (and the EMA's) parameters become this rank's shards
            # bf16 shards (FSDP's param dtype) on CUDA only; on a CPU bf16 comes from autocast() alone
            bf16 = cfg.precision == "bf16" and self.device.type == "cuda"
            distributed.shard(self.model, bf16)
            distributed.shard(self.ema.model)
        elif self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cfg.lr_at)
        self.loss_fn, self.get_batch = loss_fn, get_batch
        self.sampler = EpochSampler(dataset_size, cfg.batch_size, seed)
        local = cfg.batch_size // self.world  # this rank's rows of every global batch
        self.generator = BatchGenerator(self.device, cfg.batch_size, slice(self.rank * local, (self.rank + 1) * local))
        self.generator.manual_seed(seed * 7919)  # the same on every rank (distributed.py)
        self.step = 0
        self.history = {"step": [], "loss": [], "lr": [], "seconds": []}
        self.progress = progress and self.rank == 0
        self.on_checkpoint = on_checkpoint
        self.last_good = None
        self.resumed_from = None
        if os.path.exists(ckpt_path):
            self._resume()
        else:  # a fresh run: every RNG the loop touches starts from `seed` (same seed, same run)
            seed_everything(seed * 7919 + self.rank)  # per rank: model dropout differs between ranks

    def _param_groups(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.decay_1d or self.cfg.weight_decay == 0:
            return params
        return [{"params": [p for p in params if p.ndim >= 2]},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self, rng_ranks: list | None = None) -> dict:
        """The checkpoint. Under FSDP a collective (every rank calls it; rank 0 gets the whole state)."""
        if self.sharded:
            model, ema = distributed.full_state_dict(self.model), distributed.full_state_dict(self.ema.model)
            optimizer = distributed.full_optimizer_state_dict(self.model, self.optimizer)
        else:
            model, ema, optimizer = self.model.state_dict(), self.ema.model.state_dict(), self.optimizer.state_dict()
        rng_ranks = rng_ranks or [get_rng_state(self.generator)]
        return {
            "format": CHECKPOINT_FORMAT,
            "meta": make_meta(self.stage, self.config, self.requires),
            "step": self.step,
            "model": model,
            "ema": ema,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks,           # every rank's states, in rank order (resume restores its own)
            "world": self.world, "sharded": self.sharded,
            "history": self.history,
        }

    def save(self):
        """Write the checkpoint (rank 0; the others wait). Every rank calls it at the same step."""
        state = self.state_dict(distributed.all_gather_object(get_rng_state(self.generator)))

        def write():
            atomic_torch_save(state, self.ckpt_path)
            if self.on_checkpoint:
                self.on_checkpoint(self.step)
        on_rank0(write)
        self.last_good = self.step

    def _resume(self):
        ckpt = load_checkpoint(self.ckpt_path, stage=self.stage, config=self.config,
                               fix=f"delete {self.ckpt_path} to train from scratch", mmap=self.sharded)
        have = ckpt["meta"].get("requires", {})
        for k, v in self.requires.items():
            if have.get(k) != v:
                raise CheckpointError(f"{self.ckpt_path} was trained from {k} {have.get(k)!r}, but the "
                                      f"current {k} is {v!r}: delete {self.ckpt_path} to retrain on it")
        if bool(ckpt.get("sharded", False)) != self.sharded:
            how = lambda s: "sharded (FSDP on several processes)" if s else "unsharded (one process, or DDP)"
            raise CheckpointError(f"{self.ckpt_path} was written by a {how(ckpt.get('sharded', False))} run, but "
                                  f"this run is {how(self.sharded)}: resume it the way it was trained "
                                  f"(train.parallel and the number of processes), or delete it to retrain")
        if self.sharded:
            distributed.load_full_state_dict(self.model, ckpt["model"], self.optimizer, ckpt["optimizer"])
            distributed.load_full_state_dict(self.ema.model, ckpt["ema"])
        else:
            self.model.load_state_dict(ckpt["model"])
            self.ema.model.load_state_dict(ckpt["ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        self.history = ckpt["history"]
        self.step = self.last_good = self.resumed_from = int(ckpt["step"])
        ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
        if len(ranks) == self.world:  # each rank its own streams: exact
            set_rng_state(ranks[self.rank], self.generator)
        else:  # another number of processes: the shared generator (and the data order) continue exactly;
            set_rng_state(ranks[0], self.generator)  # the per-rank streams (model dropout) start afresh
            if self.rank > 0:
                seed_everything(self.seed * 7919 + self.rank + 104_729 * self.step)

    def check_replicas(self):
        """Under DDP, refuse ranks whose weights differ (gradients that were not averaged): a sum per parameter."""
        if self.world == 1 or self.sharded:
            return
        mine = [float(p.detach().double().sum()) for p in self.model.parameters()]
        every = distributed.all_gather_object(mine)
        names = [n for n, _ in self.model.named_parameters()]
        for r, theirs in enumerate(every):
            bad = [names[i] for i, (a, b) in enumerate(zip(every[0], theirs)) if a != b]
            if bad:
                raise DistributedError(f"{self.stage}: after step {self.step} rank {r}'s weights differ from rank 0's "
                                       f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): its loss does not "
                                       f"call the DDP wrapper's forward, so its gradients were not averaged")

    # -- training ----------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device, self.cfg.precision)

    def fit(self) -> dict:
        """Train until `cfg.steps`; returns the history {'step', 'loss', 'lr', 'seconds'}."""
        cfg = self.cfg
        if self.step >= cfg.steps:
            return self.history
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.stage, disable=not self.progress,
                   dynamic_ncols=True)
        t0 = time.perf_counter() - (self.history["seconds"][-1] if self.history["seconds"] else 0.0)
        running, count = 0.0, 0
        while self.step < cfg.steps:
            idx = self.sampler.next()
            if self.world > 1:
                idx = idx.chunk(self.world)[self.rank]
            batch = self.get_batch(idx)
            with self._autocast():
                loss, logs = self.loss_fn(self.train_model, batch, self.generator)
            mean = distributed.all_mean(loss)  # the global batch's loss: every rank stops together on NaN
            if not torch.isfinite(mean):
                where = (f"the last good checkpoint is {self.ckpt_path} (step {self.last_good})"
                         if self.last_good is not None else "no checkpoint was written yet")
                raise TrainingDiverged(f"{self.stage}: the loss is {mean.item()} at step {self.step + 1}; "
                                       f"{where}. Lower the learning rate (train.lr = {cfg.lr}) or "
                                       f"check the inputs for NaN, then resume or retrain")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.ema.update(self.model, self.step)
            self.step += 1
            running += mean.item()
            count += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.history["step"].append(self.step)
                self.history["loss"].append(running / count)
                self.history["lr"].append(self.scheduler.get_last_lr()[0])
                self.history["seconds"].append(time.perf_counter() - t0)
                bar.set_postfix(loss=f"{running / count:.4f}", **{k: f"{v:.3g}" for k, v in logs.items()})
                bar.update(self.step - bar.n)
                running, count = 0.0, 0
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        self.check_replicas()
        return self.history

    def ema_network(self, build) -> torch.nn.Module:
        """The trained network with the EMA weights, whole on every rank (`build()` makes an empty one when the
        EMA is sharded: it is filled from the checkpoint rank 0 has just written)."""
        if not self.sharded:
            return self.ema.model
        distributed.barrier()
        network = build().to(self.device)
        network.load_state_dict(load_checkpoint(self.ckpt_path, mmap=True)["ema"])
        return network.eval().requires_grad_(False)


@contextlib.contextmanager
def training_threads():
    """Train with `$UNCLIP_TRAIN_THREADS` torch threads when it is set (the course sets 1: a stage then trains
    the same, bit for bit, whether it runs in a notebook or in the course's background process), else as is."""
    want = os.environ.get("UNCLIP_TRAIN_THREADS")
    if not want:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(want))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# what a component tells the stage lifecycle (stages.py) about a stage
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageSpec:
    """How to build, feed, train and wrap one stage's network; `stages.py` does the rest.

    Training runs `prepare` -> `batches` -> (seeding) -> `build` -> `Trainer.fit` -> `wrap` -> `finish`;
    loading runs `build` -> the checkpoint's EMA weights -> `wrap`. `cfg` is the stage's own config (e.g. a
    `DecoderConfig`); `dims` a JSON dict of what the network is built from besides `cfg` (sizes read off the
    stages it needs; recorded, so loading needs no refit); `ctx` the run as the stage sees it: `ctx.cfg`
    (every component's config), `ctx.device`, `ctx.seed`, `ctx.world`, `ctx.dataset(split)`,
    `ctx.embeddings(split)` (the CLIP cache), `ctx.save(name, payload, config)` / `ctx.load(name, config)`
    (artifacts in the stage's folder, tied to the stages it was trained from), `ctx.id` (the stage's id).
    """
    name: str                                   # the stage (and, by default, the `stages.Config` field of its config)
    needs: tuple[str, ...]                      # stages trained first; their ids are recorded as `requires`
    notebook: str                               # the notebook that teaches it
    about: str                                  # one line for `python -m unclip_mini stages`
    build: Callable                             # build(cfg, dims) -> a freshly initialised nn.Module
    batches: Callable                           # batches(cfg, dims, ctx) -> (get_batch(indices) -> batch, size)
    loss: Callable                              # loss(cfg, dims, ctx) -> loss_fn(model, batch, generator)
    wrap: Callable                              # wrap(network, cfg, dims, ctx) -> the object later stages use
    prepare: Callable | None = None             # prepare(cfg, ctx) -> dims (may save artifacts); default {}
    finish: Callable | None = None              # finish(obj, cfg, dims, ctx) -> dict kept in the record
    pretrained: Callable | None = None          # pretrained(cfg, ctx) -> a network with weights, or None to train
    sampling_fields: tuple[str, ...] = ()       # config fields read at use time, not trained (no retraining)
    config_field: str | None = None             # the `stages.Config` field, when it is not `name`

    @property
    def field(self) -> str:
        return self.config_field or self.name
