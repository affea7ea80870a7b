"""The course runner: execute every notebook in order with papermill, then summarise what they measured.

    python -m unclip_mini course [--preset toy] [--out runs/toy] [--only 01 02] [--publish]

Each notebook runs in a fresh kernel into `<out>/notebooks/`, with the preset and run folder passed
through the environment (`UNCLIP_PRESET`, `UNCLIP_RUN_DIR`) so no parameter cell is injected and the
executed notebook is a clean copy of the source. The first failing notebook stops the course; the report
names the notebook, the cell and the error, and the partial output notebook stays for inspection.
`--publish` copies the executed notebooks back over `notebooks/` (what is committed, so readers see the
figures of a real run).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .artifacts import atomic_write_json, atomic_write_text
from .config import PRESETS
from .errors import ConfigError
from .progress import tqdm
from .stages import REPO_ROOT, default_run_dir

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebooks(only=None, folder=NOTEBOOK_DIR) -> list[Path]:
    """The course's notebooks in reading order (optionally only those whose name starts with `only`)."""
    found = sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))
    if only:
        picked = [p for p in found if any(p.name.startswith(o) for o in only)]
        missing = [o for o in only if not any(p.name.startswith(o) for p in found)]
        if missing:
            raise ConfigError(f"no notebook matches {missing}; notebooks: {', '.join(p.stem for p in found)}")
        return picked
    return found


def clean_notebook(nb) -> None:
    """Remove what papermill and widgets add to a notebook's metadata (before it is committed)."""
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            for out in cell.get("outputs", []):
                out.get("metadata", {}).pop("papermill", None)


def run_course(preset: str = "toy", out=None, only=None, publish: bool = False, device=None,
               timeout: int | None = None, notebook_dir=NOTEBOOK_DIR) -> int:
    """Execute the notebooks; returns 0 on success, 1 when a notebook failed (reported)."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    out = Path(out) if out else default_run_dir(preset)
    out.mkdir(parents=True, exist_ok=True)
    executed = out / "notebooks"
    executed.mkdir(exist_ok=True)
    os.environ.update({"UNCLIP_PRESET": preset, "UNCLIP_RUN_DIR": str(out.resolve()),
                       "UNCLIP_PROGRESS": "text"})
    if device:
        os.environ["UNCLIP_DEVICE"] = device
    timings = {}
    todo = notebooks(only, notebook_dir)
    t_all = time.perf_counter()
    for path in tqdm(todo, desc=f"course ({preset})", unit="notebook"):
        target = executed / path.name
        t0 = time.perf_counter()
        print(f"-> {path.name}", flush=True)
        try:
            papermill.execute_notebook(str(path), str(target), parameters={}, kernel_name="python3",
                                       cwd=str(notebook_dir), progress_bar=False,
                                       execution_timeout=timeout)
        except PapermillExecutionError as e:
            timings[path.stem] = round(time.perf_counter() - t0, 1)
            cell = _failing_cell(target, e)
            print(f"\nFAILED: {path.name}, cell {cell} (In [{e.exec_count}]): {e.ename}: {e.evalue}\n"
                  f"The partial output notebook is {target}; artifacts written before the failure are "
                  f"complete (every write is atomic).")
            _write_summary(out, preset, timings, failed=(path.name, cell, f"{e.ename}: {e.evalue}"))
            return 1
        timings[path.stem] = round(time.perf_counter() - t0, 1)
        if publish:
            nb = nbformat.read(target, as_version=4)
            clean_notebook(nb)
            nbformat.write(nb, path)
    elapsed = round(time.perf_counter() - t_all, 1)
    summary = _write_summary(out, preset, timings)
    print(f"\ncourse finished in {elapsed / 60:.1f} min; summary: {summary}")
    return 0


def _failing_cell(target: Path, err) -> str:
    """'k of n' for the failing cell, counted among code cells of the executed notebook."""
    try:
        import nbformat
        nb = nbformat.read(target, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        for i, c in enumerate(code, 1):
            if any(o.get("output_type") == "error" for o in c.get("outputs", [])):
                return f"{i} of {len(code)}"
    except Exception:  # the report must not fail because the partial notebook is odd
        pass
    return f"index {err.cell_index}"


def _write_summary(out: Path, preset: str, timings: dict, failed=None) -> Path:
    """`<out>/summary.md`: every figure the notebooks measured, and the course's wall times."""
    from .bench import machine
    where = machine()
    # a partial run (--only) keeps the other notebooks' times from the previous record of this folder
    path, kept = out / "metrics" / "course.json", []
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:  # a hand-edited record: start afresh rather than fail the course
            old = {}
        if old.get("preset") == preset:
            kept = [k for k in old.get("seconds", {}) if k not in timings and k != "total"]
            timings = {**{k: old["seconds"][k] for k in kept}, **timings}
    timings = dict(sorted(timings.items()))
    if not failed:
        timings["total"] = round(sum(timings.values()), 1)
    atomic_write_json({"preset": preset, "seconds": timings, "kept_from_previous_run": kept, "failed": failed,
                       "machine": where}, path)
    lines = [f"# unclip_mini course summary (preset `{preset}`)", "",
             f"Measured on {where['cpu_count']} CPU cores ({where['threads']} torch threads), "
             f"GPU: {where['cuda'] or 'none'}, torch {where['torch']}.", ""]
    if failed:
        lines += [f"**FAILED** in `{failed[0]}`, cell {failed[1]}: {failed[2]}", ""]
    lines += ["| notebook | wall time (s) |", "|---|---|"]
    lines += [f"| {k} | {v}{' (previous run)' if k in kept else ''} |" for k, v in timings.items()]
    if kept:
        lines += ["", "The notebooks marked (previous run) were not re-executed this time; their times, and the "
                      "total that includes them, come from the folder's previous record."]
    for f in sorted((out / "metrics").glob("[0-9][0-9]_*.json")):
        rec = json.loads(f.read_text())
        notes = rec.get("notes", {})
        lines += ["", f"## {f.stem} ({rec.get('device', '?')}, preset {rec.get('preset')}, "
                      f"code {rec.get('code_version')})", "", "| figure | value | what |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {notes.get(k, '')} |" for k, v in rec["metrics"].items()]
    return atomic_write_text("\n".join(lines) + "\n", out / "summary.md")
