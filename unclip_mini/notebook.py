"""What every notebook does in its first cells: read the parameters, open the run, record figures.

A notebook's `parameters` cell holds plain literals (papermill can replace them); `setup` then fills what
is left as None from the environment (`UNCLIP_PRESET`, `UNCLIP_RUN_DIR`, `UNCLIP_DEVICE`: set by the course
runner and the tests) and checks every value's type, so a wrong papermill parameter fails at once with
the fix.
"""
from __future__ import annotations

import os

import torch

from .errors import ConfigError
from .stages import Run

ENV = {"preset": "UNCLIP_PRESET", "run_dir": "UNCLIP_RUN_DIR", "device": "UNCLIP_DEVICE"}


def _check_type(name, value, types, example):
    bool_ok = types is bool
    if value is not None and ((isinstance(value, bool) and not bool_ok) or not isinstance(value, types)):
        want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ConfigError(f"notebook parameter {name}={value!r} has type {type(value).__name__} but must be "
                          f"{want} or None: pass it as `-p {name} {example}` to papermill (or `-y "
                          f"'{name}: {example}'`)")


def setup(preset=None, device=None, run_dir=None, seed=0, steps=None, interactive=False) -> Run:
    """Open the run a notebook works in and print where it is.

    Args mirror the notebook's `parameters` cell; None means "from the environment, else the default"
    (preset 'toy', device 'auto', run folder `runs/<preset>` at the repository root).
    """
    _check_type("preset", preset, str, "toy")
    _check_type("device", device, str, "cpu")
    _check_type("run_dir", run_dir, (str, os.PathLike), "runs/toy")
    _check_type("seed", seed, int, "0")
    _check_type("steps", steps, int, "500")
    _check_type("interactive", interactive, bool, "True")
    preset = preset or os.environ.get(ENV["preset"]) or "toy"
    device = device or os.environ.get(ENV["device"]) or "auto"
    run_dir = run_dir or os.environ.get(ENV["run_dir"]) or None
    run = Run(preset, run_dir=run_dir, device=device, seed=seed)
    print(f"preset {run.preset} | device {run.device} | run folder {run.folder.root} | "
          f"torch {torch.__version__} | {torch.get_num_threads()} CPU threads")
    return run


def save_metrics(run: Run, name: str, metrics: dict, notes: dict | None = None) -> None:
    """Record a notebook's measured figures in `<run>/metrics/<name>.json` and print them as a table.

    `notes` maps a metric to one line saying what it is (shown in the course summary).
    """
    clean = {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    run.folder.save_metrics(name, clean, notes=notes or {}, device=str(run.device),
                            torch_threads=torch.get_num_threads())
    width = max(len(k) for k in clean)
    for k, v in clean.items():
        print(f"{k:<{width}}  {v}")


def save_figure(run: Run, fig, name: str) -> None:
    """Save a matplotlib figure as `<run>/figures/<name>.png` (it is also shown inline)."""
    from .distributed import on_rank0
    on_rank0(fig.savefig, run.folder.figure_path(f"{name}.png"), dpi=100, bbox_inches="tight")
