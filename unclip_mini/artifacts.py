"""The run folder: where every stage writes and finds its artifacts, atomically and with provenance.

    runs/<preset>/
        clip/checkpoint.pt         a stage's training checkpoint (see train.py)
        clip/embeddings.pt         an artifact: payload + meta (config, code version, what it depends on)
        metrics/02_clip.json       the figures a notebook measured
        figures/...                PNGs a notebook saved

Every write goes to a temporary file in the same folder and is renamed into place, so a crash never
leaves a torn file. Every artifact records the config that made it and the ids of the artifacts it was
made from (`requires`); loading refuses an artifact whose config or inputs differ from what the caller
expects, and says what differs and how to rebuild it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import torch

from .config import diff_configs
from .distributed import on_rank0
from .errors import ArtifactError, CheckpointError

FORMAT = "unclip_mini.artifact/1"


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------

def _atomic(path: Path, write):
    """Call `write(tmp_path)` then rename the temporary file onto `path` (same folder: atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_file(path, write) -> Path:
    """Write a file of any format atomically: `write(tmp_path)` fills a temporary file that is renamed onto
    `path` (same folder)."""
    return _atomic(path, write)


def check_output_path(path, suffix: str) -> Path:
    """Refuse an output file that cannot be written (wrong suffix, a folder, an unwritable place) before any
    work is done, naming the problem and the fix. Returns the path; nothing is written."""
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise ArtifactError(f"output {path} must be a {suffix} file: pass e.g. --out samples{suffix}")
    if path.is_dir():
        raise ArtifactError(f"output {path} is a folder: pass a file name inside it, e.g. {path / ('samples' + suffix)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ArtifactError(f"cannot write {path}: the folder {parent} does not exist; create it or pass another --out")
    try:
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise ArtifactError(f"cannot write {path} ({e.strerror or e}): pass another --out or fix the folder's "
                            f"permissions") from e
    return path


def atomic_torch_save(obj, path) -> Path:
    """`torch.save` to a temporary file, then rename: readers see the old file or the new one."""
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path) -> Path:
    """Write text atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return _atomic(path, write)


def atomic_write_json(obj, path) -> Path:
    """Write JSON atomically (indented, keys in insertion order)."""
    return atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def safe_torch_load(path, what="file", fix="delete it and rebuild it", mmap: bool = False):
    """`torch.load(weights_only=True)` with errors that name the file and the fix.

    Missing file -> CheckpointError; truncated, corrupt or non-torch file -> CheckpointError;
    a file holding arbitrary pickled objects is refused by weights_only.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no {what} at {path}: {fix}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a {what} file: pass the file inside it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap or None)
    except Exception as e:  # zip errors, EOF, unpickling errors: all mean "not a usable file"
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        reason = reason.splitlines()[0] if reason else type(e).__name__
        if "weights_only" in reason or "weights only" in reason.lower():  # torch's advice (weights_only=False) is unsafe
            reason = "torch.load(weights_only=True) cannot read it: damaged bytes, or pickled Python objects a safe load refuses"
        raise CheckpointError(f"{path} is corrupt, truncated or not a {what} ({type(e).__name__}: "
                              f"{reason[:200]}): {fix}") from e


# ---------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the code (with '+dirty' if the library has uncommitted edits), else a hash
    of the library's source files."""
    pkg = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=pkg, capture_output=True,
                              text=True, timeout=5)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--", str(pkg)], cwd=pkg,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    h = hashlib.sha256()
    for f in sorted(pkg.glob("*.py")):
        h.update(f.read_bytes())
    return "src-" + h.hexdigest()[:12]


def make_meta(kind: str, config: dict, requires: dict | None = None) -> dict:
    """The provenance record stored with every artifact and checkpoint."""
    blob = json.dumps(config, sort_keys=True).encode()
    return {"kind": kind, "config": config, "config_id": hashlib.sha256(blob).hexdigest()[:12],
            "requires": dict(requires or {}), "code_version": code_version(),
            "torch": str(torch.__version__), "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def check_meta(meta: dict, path, *, kind=None, config=None, requires=None, rebuild="") -> None:
    """Refuse an artifact of another kind, another config, or made from other inputs."""
    how = f" Rebuild it: {rebuild}" if rebuild else " Delete it to have it rebuilt."
    if kind is not None and meta.get("kind") != kind:
        raise ArtifactError(f"{path} holds a {meta.get('kind')!r}, not a {kind!r}: wrong file?{how}")
    if config is not None and meta.get("config") != config:
        diffs = diff_configs(meta.get("config") or {}, config)
        raise ArtifactError(f"{path} was made with another config ({'; '.join(diffs[:6])}"
                            f"{' ...' if len(diffs) > 6 else ''}).{how}")
    for name, want in (requires or {}).items():
        have = meta.get("requires", {}).get(name)
        if have != want:
            raise ArtifactError(f"{path} was made from {name} {have!r}, but the current {name} is "
                                f"{want!r} (it was retrained or changed).{how}")


# ---------------------------------------------------------------------------------------------
# the run folder
# ---------------------------------------------------------------------------------------------

class RunFolder:
    """One run's folder (default `runs/<preset>`): stage checkpoints, artifacts, metrics, figures."""

    def __init__(self, root, preset: str):
        self.root = Path(root)
        self.preset = preset
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".write-test-", delete=True)
            probe.close()
        except OSError as e:
            raise ArtifactError(f"run folder {self.root} is not writable ({e.strerror or e}): pass another "
                                f"folder (--out / run_dir=...) or fix its permissions") from e

    def __repr__(self):
        return f"RunFolder({str(self.root)!r}, preset={self.preset!r})"

    def path(self, stage: str, name: str) -> Path:
        """Path of `name` inside the stage's folder (the folder is created)."""
        d = self.root / stage
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    def checkpoint_path(self, stage: str) -> Path:
        return self.path(stage, "checkpoint.pt")

    def figure_path(self, name: str) -> Path:
        return self.path("figures", name)

    # -- artifacts: a payload of tensors / plain values with a provenance record --------------
    def save(self, stage: str, name: str, payload: dict, *, config: dict, requires: dict | None = None) -> Path:
        """Atomically write an artifact `<stage>/<name>.pt` with its provenance."""
        meta = make_meta(f"{stage}/{name}", config, requires)
        return atomic_torch_save({"format": FORMAT, "meta": meta, "payload": payload},
                                 self.path(stage, f"{name}.pt"))

    def exists(self, stage: str, name: str) -> bool:
        return (self.root / stage / f"{name}.pt").exists()

    def load(self, stage: str, name: str, *, config: dict | None = None, requires: dict | None = None,
             rebuild: str = "") -> tuple[dict, dict]:
        """Read an artifact, refusing one made with another config or from other inputs.

        Returns (payload, meta).
        """
        path = self.root / stage / f"{name}.pt"
        how = rebuild or f"delete {path} and rerun the stage that makes it"
        obj = safe_torch_load(path, what=f"{stage} artifact", fix=how)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not an unclip_mini artifact: {how}")
        check_meta(obj["meta"], path, kind=f"{stage}/{name}", config=config, requires=requires, rebuild=how)
        return obj["payload"], obj["meta"]

    # -- metrics: the measured figures, one JSON per notebook -----------------------------------
    def save_metrics(self, name: str, metrics: dict, **context) -> Path:
        """Write `metrics/<name>.json`: the figures plus where they were measured (preset, device...)."""
        record = {"name": name, "preset": self.preset, **context, "code_version": code_version(),
                  "created": time.strftime("%Y-%m-%d %H:%M:%S"), "metrics": metrics}
        return on_rank0(atomic_write_json, record, self.path("metrics", f"{name}.json"))
