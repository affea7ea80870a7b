"""What every notebook does in its first cells: read the parameters, open the run, record figures.

A notebook's `parameters` cell holds plain literals (papermill can replace them); `setup` then fills what
is left as None from the environment (`UNCLIP_PRESET`, `UNCLIP_RUN_DIR`, `UNCLIP_DEVICE`: set by the course
runner and the tests) and checks every value's type, so a wrong papermill parameter fails at once with
the fix.
"""
from __future__ import annotations

import json
import os

import torch

from .errors import ConfigError
from .stages import Run, display_path

ENV = {"preset": "UNCLIP_PRESET", "run_dir": "UNCLIP_RUN_DIR", "device": "UNCLIP_DEVICE"}


def _check_type(name, value, types, example):
    bool_ok = types is bool
    if value is not None and ((isinstance(value, bool) and not bool_ok) or not isinstance(value, types)):
        want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ConfigError(f"notebook parameter {name}={value!r} has type {type(value).__name__} but must be "
                          f"{want} or None: pass it as `-p {name} {example}` to papermill (or `-y "
                          f"'{name}: {example}'`)")


def setup(preset=None, device=None, run_dir=None, seed=0, steps=None, interactive=False, tag=None) -> Run:
    """Open the run a notebook works in and print where it is.

    Args mirror the notebook's `parameters` cell; None means "from the environment, else the default"
    (preset 'toy', device 'auto', run folder `runs/<preset>` at the repository root). `tag` names one run of a
    sweep (`course.sweep`): its metrics and figures are saved as `<name>@<tag>`, beside the untagged run's.
    """
    _check_type("preset", preset, str, "toy")
    _check_type("device", device, str, "cpu")
    _check_type("run_dir", run_dir, (str, os.PathLike), "runs/toy")
    _check_type("seed", seed, int, "0")
    _check_type("steps", steps, int, "500")
    _check_type("interactive", interactive, bool, "True")
    _check_type("tag", tag, str, "guidance=3")
    preset = preset or os.environ.get(ENV["preset"]) or "toy"
    device = device or os.environ.get(ENV["device"]) or "auto"
    run_dir = run_dir or os.environ.get(ENV["run_dir"]) or None
    run = Run(preset, run_dir=run_dir, device=device, seed=seed)
    run.tag = tag
    print(f"preset {run.preset} | device {run.device} | run folder {display_path(run.folder.root)} | "
          f"torch {torch.__version__} | {torch.get_num_threads()} CPU threads")
    return run


def save_metrics(run: Run, name: str, metrics: dict, notes: dict | None = None) -> None:
    """Record a notebook's measured figures in `<run>/metrics/<name>.json` and print them as a table.

    `notes` maps a metric to one line saying what it is (shown in the course summary).
    """
    clean = {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    run.folder.save_metrics(_tagged(run, name), clean, notes=notes or {}, device=str(run.device),
                            torch_threads=torch.get_num_threads())
    width = max(len(k) for k in clean)
    for k, v in clean.items():
        print(f"{k:<{width}}  {v}")


def save_figure(run: Run, fig, name: str) -> None:
    """Save a matplotlib figure as `<run>/figures/<name>.png` (it is also shown inline)."""
    from .distributed import on_rank0
    on_rank0(fig.savefig, run.folder.figure_path(f"{_tagged(run, name)}.png"), dpi=100, bbox_inches="tight")


def show_jpeg(fig, quality: int = 85, dpi: int = 100) -> None:
    """Show a figure inline as a JPEG instead of a PNG, and close it. For figures of many rendered images (the
    512-px galleries): a PNG of them is ~1 MB in the committed notebook, a JPEG a fifth of that at no visible loss;
    `save_figure` still writes the PNG into the run folder."""
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="jpeg", dpi=dpi, bbox_inches="tight", pil_kwargs={"quality": quality})
    plt.close(fig)
    display(Image(data=buf.getvalue(), format="jpeg"))


def _tagged(run: Run, name: str) -> str:
    tag = getattr(run, "tag", None)
    return f"{name}@{tag}" if tag else name


def read_metrics(run: Run, name: str) -> dict | None:
    """The figures notebook `name` recorded in this run folder (`<run>/metrics/<name>.json`), or None when it has
    not run here: later notebooks read earlier measurements instead of measuring them twice."""
    path = run.folder.root / "metrics" / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["metrics"]


def save_claims(run: Run, rows: list[dict]) -> None:
    """Record the claims table (`<run>/claims.json`, read by the course report) and print it.

    rows: dicts with 'claim', 'paper', 'ours', 'verdict' ('yes' | 'partly' | 'no' | 'not measured'), 'why'.
    """
    from .artifacts import atomic_write_json, code_version
    keys = ("claim", "paper", "ours", "verdict", "why")
    for r in rows:
        missing = [k for k in keys if k not in r]
        if missing:
            raise ConfigError(f"claim row {r.get('claim', r)!r} lacks {missing}: give every row {', '.join(keys)}")
    atomic_write_json({"preset": run.preset, "code_version": code_version(), "claims": rows},
                      run.folder.root / "claims.json")
    for i, r in enumerate(rows, 1):
        print(f"{i:>2}. {r['claim']}\n    paper: {r['paper']}\n    here:  {r['ours']}\n    reproduced: {r['verdict']}"
              + (f" — {r['why']}" if r["why"] else ""))
