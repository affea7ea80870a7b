"""The course runner: execute every notebook in order with papermill, then summarise what they measured.

    python -m unclip_mini course [--preset toy] [--out runs/toy] [--only 01 02] [--publish] [--no-ahead]
    python -m unclip_mini sweep 08 --param decoder_guidance 1 3 5 [--preset toy] [--out runs/toy]

Each notebook runs in a fresh kernel into `<out>/notebooks/`, with the preset and run folder passed
through the environment (`UNCLIP_PRESET`, `UNCLIP_RUN_DIR`) so no parameter cell is injected and the
executed notebook is a clean copy of the source. While a notebook runs, the console shows its cell
progress and what it prints about its stages (which one is trained, and that stage's progress bar). The
first failing notebook stops the course; the report names the notebook, the cell and the error, and the
partial output notebook stays for inspection. The course ends by writing `<out>/summary.md` and
`<out>/report.html` (report.py). `--publish` copies the executed notebooks back over `notebooks/` (what is
committed, so readers see the figures of a real run).

Training ahead. On a CPU with two or more cores the heaviest stages that later notebooks need (`AHEAD`) are
trained one after another in a background process on their own core, each as soon as the stages it needs
exist, while the notebooks run on the other core (with one torch thread until the background is done, up to
notebook `AHEAD_UNTIL`); a notebook that reaches such a stage first, or while it is being trained, waits for it
(`stages.training_lock`) and loads it. Variants that notebooks train for a comparison (`stages.VARIANTS`) are
trained ahead the same way, by name. Every stage trains with one torch thread in
the course (`UNCLIP_TRAIN_THREADS=1`), so it is the same stage wherever it was trained.

Sweeps. `sweep` runs one notebook several times with one papermill parameter changed, each run into its own
output notebook and its metrics under its own name (`<notebook>@<param>=<value>`), all sharing the trained
stages of one run folder; `gather` puts those metrics side by side in one table.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from .artifacts import atomic_write_json, atomic_write_text
from .config import PRESETS
from .errors import ConfigError
from .stages import REPO_ROOT, default_run_dir, needs_of

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# trained in the background, in this order, each once its needs exist: the GLIDE-style baseline first, beside the
# CLIP (it needs none: it tokenizes its captions itself), so that the decoder, which needs the CLIP, is the only
# long training left on the notebooks' core; the rest is done while the decoder trains, the two variants that
# notebooks 07 and 10 train for their comparisons last, in what is left of the decoder's time
AHEAD = ("glide", "upsampler1", "upsampler2", "checker", "diffusion_prior", "ar_prior", "upsampler1-noblur",
         "diffusion_prior-gap")
AHEAD_UNTIL = "06"     # notebooks up to this one run with one torch thread while the background trains
KERNEL_ARGS = ["--IPKernelApp.log_level=ERROR"]   # the kernel's own start-up notices (e.g. "running over TCP")


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


class LiveOutput:
    """Where papermill writes a kernel's stdout during a course: the lines that say which stage runs, and
    training progress bars, go on to the console (the rest stays in the output notebook)."""
    KEEP = re.compile(r"^\[[\w-]+\] |\|.*\| *\d+/\d+ \[")

    def __init__(self, stream=None, every: float = 10.0):
        self.stream, self.every, self.last = stream or sys.stdout, every, {}

    def write(self, text: str):
        for piece in re.split(r"[\r\n]+", text):
            piece = piece.strip()
            if not piece or not self.KEEP.search(piece):
                continue
            bar = piece.split(":", 1)[0] if "|" in piece else None         # a progress bar: its name
            now = time.monotonic()
            if bar and "100%" not in piece and now - self.last.get(bar, -1e9) < self.every:
                continue                                                   # at most one line per bar every 10 s
            if bar:
                self.last[bar] = now
            self.stream.write(f"   {piece[:140]}\n")
        self.stream.flush()

    def flush(self):
        self.stream.flush()


class AheadTrainer(threading.Thread):
    """Trains `stages` one after another in a background process (`python -m unclip_mini train`, one torch
    thread), each once the stages it needs are trained. A stage a notebook trained first is skipped."""

    def __init__(self, preset: str, out: Path, stages=AHEAD, device=None):
        super().__init__(daemon=True)
        # resolved now: the notebooks change the working directory while this thread starts its processes
        self.preset, self.out, self.stages, self.device = preset, Path(out).resolve(), list(stages), device
        self.done, self.failed, self.proc, self._halt = {}, {}, None, threading.Event()

    def _trained(self, name) -> bool:
        return (self.out / name / "stage.json").exists()  # the record, written last when a stage is done

    def run(self):
        log = open(self.out / "ahead.log", "a")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "UNCLIP_TRAIN_THREADS": "1", "UNCLIP_PROGRESS": "text"}
        for name in self.stages:
            while not self._halt.is_set() and not all(self._trained(d) for d in needs_of(name)):
                self._halt.wait(2.0)
            if self._halt.is_set():
                break
            if self._trained(name):
                continue
            cmd = [sys.executable, "-m", "unclip_mini", "train", name, "--preset", self.preset,
                   "--run-dir", str(self.out)] + (["--device", self.device] if self.device else [])
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if self._halt.is_set():  # stopped while it was starting
                self.proc.terminate()
            rc = self.proc.wait()
            if self._halt.is_set():   # the course ended first: the checkpoint stays, a later run resumes it
                break
            (self.done if rc == 0 else self.failed)[name] = round(time.perf_counter() - t0, 1)
            print(f"   [ahead] {name} {'trained' if rc == 0 else 'FAILED (see ahead.log)'} in the background "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)
        log.close()

    def stop(self):
        """End the background work: the stage being trained is killed (its checkpoint stays); returns once the
        thread has finished, so `done` and `failed` are final. (The event is not called `_stop`: that name is
        `threading.Thread`'s own, and shadowing it breaks `join`.)"""
        self._halt.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        if self.is_alive():
            self.join(timeout=60)


def _execute(path: Path, target: Path, parameters: dict, notebook_dir, timeout, live: bool):
    import papermill
    papermill.execute_notebook(str(path), str(target), parameters=parameters, kernel_name="python3",
                               cwd=str(notebook_dir), progress_bar=live, execution_timeout=timeout,
                               stdout_file=LiveOutput() if live else None, extra_arguments=KERNEL_ARGS)


def run_course(preset: str = "toy", out=None, only=None, publish: bool = False, device=None,
               timeout: int | None = None, notebook_dir=NOTEBOOK_DIR, ahead: bool | None = None,
               live: bool = True) -> int:
    """Execute the notebooks; returns 0 on success, 1 when a notebook failed (reported).

    ahead: train `AHEAD` in a background process (None: when this machine has 2+ CPU cores and no GPU).
    live: show each notebook's cell progress and its stage messages on the console.
    """
    import nbformat
    from papermill.exceptions import PapermillExecutionError

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    # absolute from here on: papermill runs each notebook inside `notebook_dir` by changing this process's working
    # directory, so a relative path would mean another folder to what starts meanwhile (the background's training)
    out = Path(out).resolve() if out else default_run_dir(preset)
    out.mkdir(parents=True, exist_ok=True)
    executed = out / "notebooks"
    executed.mkdir(exist_ok=True)
    logging.getLogger("papermill").setLevel(logging.WARNING)
    todo = notebooks(only, notebook_dir)
    if ahead is None:
        import torch
        ahead = (os.cpu_count() or 1) >= 2 and not torch.cuda.is_available() and len(todo) > 1
    os.environ.update({"UNCLIP_PRESET": preset, "UNCLIP_RUN_DIR": str(out), "UNCLIP_PROGRESS": "text",
                       "UNCLIP_TRAIN_THREADS": "1"})
    if device:
        os.environ["UNCLIP_DEVICE"] = device
    background = AheadTrainer(preset, out, device=device) if ahead else None
    if background:
        background.start()
    timings, t_all = {}, time.perf_counter()
    threads_default = os.environ.get("OMP_NUM_THREADS")
    try:
        for k, path in enumerate(todo, 1):
            # while the background trains, a notebook keeps to one core (two threads on a busy core are slower);
            # once it is done, the notebook has every core
            if background and background.is_alive() and path.name[:2] <= AHEAD_UNTIL:
                os.environ["OMP_NUM_THREADS"] = "1"
            elif threads_default is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = threads_default
            target = executed / path.name
            t0 = time.perf_counter()
            print(f"-> [{k}/{len(todo)}] {path.name}", flush=True)
            try:
                _execute(path, target, {}, notebook_dir, timeout, live)
            except PapermillExecutionError as e:
                timings[path.stem] = round(time.perf_counter() - t0, 1)
                cell = _failing_cell(target, e)
                print(f"\nFAILED: {path.name}, cell {cell} (In [{e.exec_count}]): {e.ename}: {e.evalue}\n"
                      f"The partial output notebook is {target}; artifacts written before the failure are "
                      f"complete (every write is atomic).")
                _write_summary(out, preset, timings, failed=(path.name, cell, f"{e.ename}: {e.evalue}"))
                return 1
            timings[path.stem] = round(time.perf_counter() - t0, 1)
            print(f"   {path.name} done in {timings[path.stem]:.0f} s", flush=True)
            if publish:
                nb = nbformat.read(target, as_version=4)
                clean_notebook(nb)
                nbformat.write(nb, path)
    finally:
        if background:
            background.stop()
        if threads_default is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads_default
    elapsed = round(time.perf_counter() - t_all, 1)
    ahead_info = {"stages": dict(background.done), "failed": dict(background.failed)} if background else None
    summary = _write_summary(out, preset, timings, ahead=ahead_info, wall=elapsed)
    from .report import write_report
    report = write_report(out)
    print(f"\ncourse finished in {elapsed / 60:.1f} min; summary: {summary}; report: {report}")
    return 0


# ---------------------------------------------------------------------------------------------
# sweeps: one notebook, one parameter, several values, one run folder
# ---------------------------------------------------------------------------------------------

def sweep(notebook: str, param: str, values, preset: str = "toy", out=None, timeout: int | None = None,
          notebook_dir=NOTEBOOK_DIR, live: bool = True, fixed: dict | None = None) -> Path:
    """Run `notebook` once per value of papermill parameter `param`, each into
    `<out>/sweeps/<notebook>/<param>=<value>.ipynb` with its metrics saved as `<notebook>@<param>=<value>`;
    the stages come from (or are trained once into) the run folder. `fixed`: other parameters held at one
    value in every run, named in each run's tag after the swept one (`<param>=<value>,n_eval=192`).
    Returns the gathered table's path."""
    import nbformat
    from papermill.inspection import inspect_notebook
    found = notebooks([notebook], notebook_dir)
    if len(found) != 1:
        raise ConfigError(f"{notebook!r} matches {len(found)} notebooks: give its number, e.g. 08")
    path = found[0]
    declared = inspect_notebook(str(path))
    fixed = dict(fixed or {})
    for name in (param, *fixed):
        if name not in declared or name == "tag":
            raise ConfigError(f"{path.name} has no parameter {name!r} to set; its parameters: "
                              f"{', '.join(k for k in declared if k != 'tag')}")
    if param in fixed:
        raise ConfigError(f"{param!r} is the swept parameter: drop it from the fixed ones (--set)")
    if "tag" not in declared:
        raise ConfigError(f"{path.name} has no `tag` parameter, so its runs would overwrite each other's metrics")
    if not values:
        raise ConfigError("give at least one value to sweep over")
    out = Path(out).resolve() if out else default_run_dir(preset)   # absolute, as in run_course
    folder = out / "sweeps" / path.stem
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.update({"UNCLIP_PRESET": preset, "UNCLIP_RUN_DIR": str(out), "UNCLIP_PROGRESS": "text",
                       "UNCLIP_TRAIN_THREADS": "1"})
    for v in values:
        tag = ",".join(f"{k}={x}" for k, x in {param: v, **fixed}.items())
        print(f"-> {path.name} with {tag}", flush=True)
        target = folder / f"{tag}.ipynb"
        _execute(path, target, {**fixed, param: v, "tag": tag}, notebook_dir, timeout, live)
        nb = nbformat.read(target, as_version=4)
        clean_notebook(nb)
        nbformat.write(nb, target)
    return gather(out, path.stem)


def gather(out, name: str) -> Path:
    """Put the metrics of every tagged run of notebook `name` in `<out>/metrics` side by side: writes
    `<out>/sweeps/<name>.md` and `.json` (one column per run, one row per figure) and prints the table."""
    out = Path(out)
    runs = {}
    for f in sorted((out / "metrics").glob(f"{name}@*.json")):
        runs[f.stem.split("@", 1)[1]] = json.loads(f.read_text())["metrics"]
    if not runs:
        raise ConfigError(f"no tagged runs of {name!r} in {out / 'metrics'}: run `python -m unclip_mini sweep` first")
    keys = [k for k in dict.fromkeys(k for m in runs.values() for k in m)]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [f"# {name}: {len(runs)} runs", "", "| figure | " + " | ".join(runs) + " |",
             "|---|" + "---|" * len(runs)]
    lines += [f"| {k} | " + " | ".join(fmt(m.get(k, "")) for m in runs.values()) + " |" for k in keys]
    folder = out / "sweeps"
    atomic_write_json({"notebook": name, "runs": runs}, folder / f"{name}.json")
    path = atomic_write_text("\n".join(lines) + "\n", folder / f"{name}.md")
    print("\n".join(lines[:2] + lines[2:40]))
    return path


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


def _write_summary(out: Path, preset: str, timings: dict, failed=None, ahead=None, wall=None) -> Path:
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
                       "wall_seconds": wall, "trained_ahead": ahead, "machine": where}, path)
    lines = [f"# unclip_mini course summary (preset `{preset}`)", "",
             f"Measured on {where['cpu_count']} CPU cores of {where['cpu']} (bf16 unit: {where['cpu_bf16'] or 'none'}; "
             f"{where['threads']} torch threads), "
             f"GPU: {where['cuda'] or 'none'}, torch {where['torch']}.", ""]
    if failed:
        lines += [f"**FAILED** in `{failed[0]}`, cell {failed[1]}: {failed[2]}", ""]
    lines += ["| notebook | wall time (s) |", "|---|---|"]
    lines += [f"| {k} | {v}{' (previous run)' if k in kept else ''} |" for k, v in timings.items()]
    if wall is not None:
        lines += ["", f"Wall time of this run: {wall:.0f} s."]
    if ahead:
        lines += ["", "Trained ahead in a background process (seconds): "
                  + (", ".join(f"{k} {v}" for k, v in ahead["stages"].items()) or "none")
                  + (f"; failed: {', '.join(ahead['failed'])}" if ahead["failed"] else "")
                  + ". The notebooks' times above overlap with these."]
    if kept:
        lines += ["", "The notebooks marked (previous run) were not re-executed this time; their times, and the "
                      "total that includes them, come from the folder's previous record."]
    for f in sorted(p for p in (out / "metrics").glob("[0-9][0-9]_*.json") if "@" not in p.stem):
        rec = json.loads(f.read_text())
        notes = rec.get("notes", {})
        lines += ["", f"## {f.stem} ({rec.get('device', '?')}, preset {rec.get('preset')}, "
                      f"code {rec.get('code_version')})", "", "| figure | value | what |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {notes.get(k, '')} |" for k, v in rec["metrics"].items()]
    return atomic_write_text("\n".join(lines) + "\n", out / "summary.md")
