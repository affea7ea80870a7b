"""Training on many processes (`torchrun`): who writes, what each process draws, how the processes agree.

Under `torchrun --nproc_per_node N -m unclip_mini train STAGE` every process (a *rank*) runs the same code on
its own slice of each global batch. Three rules make N processes train what one process would:

- **Gradients are averaged.** The training loop wraps the network in DistributedDataParallel (or shards it
  with FSDP's `fully_shard`, `train.TrainConfig.parallel`) and every loss calls the wrapper's forward, so
  each rank ends each step with the same weights.
- **The random draws of a step do not depend on how the batch is split.** The loop's generator is a
  `BatchGenerator`: the same seed on every rank, plus which rows of the global batch this rank holds.
  Every per-example draw of a loss (timesteps, noise, condition dropout, crops, degradations) goes through
  `rand`, `randn` or `randint` here, which draw for the *whole* global batch and keep this rank's rows. So
  rank r's example i gets the noise a single process would give global example i, every rank's generator
  stays in the same state, and a single process (which holds all rows) draws exactly what it drew before.
  The cost is drawing B instead of B / N numbers: nothing next to a training step.
  The model's own dropout draws from torch's global RNG, seeded per rank (`seed * 7919 + rank`): its masks
  differ from rank to rank, as they must, but they are not split-invariant (a mask is drawn for a whole
  activation tensor; drawing the global batch's masks on every rank would cost as much as the layer), so a
  model with dropout trains on N processes as well as on one, not bit for bit as one.
- **Rank 0 alone writes.** `on_rank0(fn)` runs `fn` on rank 0 while the others wait, then hands them its
  result (or its error); the stage lifecycle writes checkpoints, records and artifacts through it.

Outside torchrun (WORLD_SIZE unset or 1) every helper here is the plain single-process call.
"""
from __future__ import annotations

import os
import pickle

import torch

from .errors import ConfigError, UnclipError


class DistributedError(UnclipError, RuntimeError):
    """Another rank failed (its error is in the message), or the ranks disagree."""


# ---------------------------------------------------------------------------------------------
# the process group
# ---------------------------------------------------------------------------------------------

def dist_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> torch.device | None:
    """Under torchrun (WORLD_SIZE > 1), join the process group and return this rank's device
    (cuda:LOCAL_RANK with NCCL, else the CPU with gloo); None outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def barrier():
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (picklable objects; [obj] outside torchrun)."""
    rank, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor (a detached copy; the tensor itself, detached, outside torchrun)."""
    world = dist_info()[1]
    if world == 1:
        return value.detach()
    out = value.detach().clone()
    torch.distributed.all_reduce(out)       # a sum: gloo has no AVG
    return out / world


_inside_rank0 = False


def on_rank0(fn, *args, **kwargs):
    """Run `fn(*args, **kwargs)` on rank 0 only; the other ranks wait, then get its return value.

    Every rank must call it at the same point. An error on rank 0 is raised on every rank (none is left
    waiting at a barrier). A call inside a rank-0-only section (a write inside `fn`) runs directly.
    """
    global _inside_rank0
    rank, world = dist_info()
    if world == 1 or _inside_rank0:
        return fn(*args, **kwargs)
    box, error = [None], None
    if rank == 0:
        _inside_rank0 = True
        try:
            box = [("ok", fn(*args, **kwargs))]
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, then raised here too
            box, error = [("error", e)], e
        finally:
            _inside_rank0 = False
        try:
            pickle.dumps(box[0])
        except Exception:  # noqa: BLE001
            box = [("error", DistributedError(f"rank 0 could not send its result to the other ranks: {box[0][1]!r}"))]
            error = error or box[0][1]
    torch.distributed.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise (error if rank == 0 else value)
    return value


# ---------------------------------------------------------------------------------------------
# random draws that do not depend on how the global batch is split
# ---------------------------------------------------------------------------------------------

class BatchGenerator(torch.Generator):
    """The training loop's generator: a `torch.Generator` that also knows which rows of the global batch
    this process holds (`rows`, a slice of `range(total)`). Seeded the same on every rank.

    `rand`, `randn` and `randint` below draw per-example randomness for all `total` rows and keep `rows`.
    Any other use of it draws what a plain generator would (e.g. one number shared by every rank).
    """

    def __new__(cls, device="cpu", total: int = 1, rows: slice | None = None):
        return super().__new__(cls, device)

    def __init__(self, device="cpu", total: int = 1, rows: slice | None = None):
        self.total = int(total)
        self.rows = slice(0, self.total) if rows is None else rows

    @property
    def local(self) -> int:
        return self.rows.stop - self.rows.start


def _global_shape(shape, generator):
    """(shape to draw, rows to keep): the whole batch's when `generator` is a split BatchGenerator."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not isinstance(generator, BatchGenerator):
        return shape, None
    if not shape or shape[0] != generator.local:
        raise ConfigError(f"a per-example draw of shape {shape} from the training generator, but this process holds "
                          f"{generator.local} rows of the global batch: the first dimension must be the batch")
    if generator.local == generator.total:
        return shape, None
    return (generator.total, *shape[1:]), generator.rows


def _draw(make, shape, generator, device, **kw):
    full, rows = _global_shape(shape, generator)
    where = generator.device if generator is not None else device
    x = make(full, generator=generator, device=where, **kw)
    if rows is not None:
        x = x[rows]
    return x if device is None else x.to(device)


def rand(shape, generator=None, device=None, **kw) -> torch.Tensor:
    """Uniform [0, 1) of `shape` = [this process's batch, ...], split-invariant (see `BatchGenerator`); drawn on
    the generator's device and moved to `device`."""
    return _draw(torch.rand, shape, generator, device, **kw)


def randn(shape, generator=None, device=None, **kw) -> torch.Tensor:
    """Standard normal of `shape` = [this process's batch, ...], split-invariant (see `rand`)."""
    return _draw(torch.randn, shape, generator, device, **kw)


def randint(low: int, high: int, shape, generator=None, device=None, **kw) -> torch.Tensor:
    """Integers in [low, high) of `shape` = [this process's batch, ...], split-invariant (see `rand`)."""
    return _draw(lambda s, **k: torch.randint(low, high, s, **k), shape, generator, device, **kw)


# ---------------------------------------------------------------------------------------------
# FSDP: parameters, gradients, optimizer state and the EMA sharded across ranks (the paper's sizes)
# ---------------------------------------------------------------------------------------------

def shard(model: torch.nn.Module, bf16: bool = False) -> torch.nn.Module:
    """Shard `model` in place with PyTorch's own FSDP (`fully_shard`) over every rank, and return it.

    Units: each element of every `nn.ModuleList` in the model (the U-Net's levels, the transformers' blocks)
    is sharded on its own, then the rest at the root, so one unit at a time is gathered in full. `bf16`:
    parameters are gathered and computed in bfloat16, gradients reduced in float32 (the master weights and
    the optimizer stay float32).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    p = next(model.parameters())
    mesh = init_device_mesh(p.device.type, (dist_info()[1],))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for module in reversed(list(model.modules())):  # inner units before the ones around them
        if isinstance(module, torch.nn.ModuleList):
            for unit in module:
                if any(True for _ in unit.parameters()):
                    fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole (unsharded) state dict of a sharded model, on rank 0's CPU ({} on the others). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state_dict(model: torch.nn.Module, optimizer) -> dict:
    """The whole optimizer state of a sharded model, keyed by parameter name, on rank 0 ({} elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, state: dict, optimizer=None, optimizer_state=None):
    """Load whole state dicts (as `full_state_dict` wrote them; every rank passes them) into a sharded model
    (and its optimizer): each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    set_model_state_dict(model, state, options=_options())
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options())
