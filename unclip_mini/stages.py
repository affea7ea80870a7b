"""The pipeline's stages, the whole stack's config, and the run they share.

    Config   every component's config for one preset (`Config(preset="toy")`)
    Run      a Config + a run folder + a device + a seed: what notebooks, the CLI and tests work in
    STAGES   name -> what it needs, which notebook teaches it, how to train and load it
    load_or_train(run, name)   load a stage from the run folder, or train it (and what it needs) first

A trained stage leaves `<run>/<stage>/stage.json`: its id, the config it was trained with, and the ids of
the stages it was trained from. A stage refuses inputs whose ids differ from those it recorded (e.g. a
prior trained on a CLIP that has since been retrained).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .artifacts import RunFolder, atomic_write_json
from .config import PRESETS, PresetConfig, check_choice, check_range
from .errors import ArtifactError, ConfigError
from .train import resolve_device, seed_everything

REPO_ROOT = Path(__file__).resolve().parent.parent


# field of Config -> (module, factory): factory(preset) gives that component's config for a preset
COMPONENTS = {
    "data": ("data", "DataConfig.preset"),
    "clip": ("clip_model", "ClipConfig.preset"),
    "diffusion_prior": ("diffusion_prior", "DiffusionPriorConfig.preset"),
    "ar_prior": ("ar_prior", "ARPriorConfig.preset"),
    "checker": ("metrics", "CheckerConfig.preset"),
    "decoder": ("decoder", "DecoderConfig.preset"),
    "glide": ("decoder", "DecoderConfig.glide"),
    "upsampler1": ("upsampler", "UpsamplerConfig.stage1"),
    "upsampler2": ("upsampler", "UpsamplerConfig.stage2"),
}


def _factory(field_name):
    import importlib
    module, attr = COMPONENTS[field_name]
    obj = importlib.import_module(f"unclip_mini.{module}")
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Config(PresetConfig):
    """The configuration of every stage for one preset (each part is that component's own config)."""
    preset: str = "toy"
    seed: int = 0
    data: Any = None              # data.DataConfig
    clip: Any = None              # clip_model.ClipConfig
    diffusion_prior: Any = None   # diffusion_prior.DiffusionPriorConfig
    ar_prior: Any = None          # ar_prior.ARPriorConfig
    checker: Any = None           # metrics.CheckerConfig (the attribute checker that scores images)
    decoder: Any = None           # decoder.DecoderConfig
    glide: Any = None             # decoder.DecoderConfig without z_i: the GLIDE-style baseline
    upsampler1: Any = None        # upsampler.UpsamplerConfig, base -> x4
    upsampler2: Any = None        # upsampler.UpsamplerConfig, x4 -> x16

    def __post_init__(self):
        check_choice(self, "preset", PRESETS)
        check_range(self, "seed", 0, integer=True)
        for name in COMPONENTS:  # a missing component takes this preset's default
            if getattr(self, name) is None:
                try:
                    object.__setattr__(self, name, _factory(name)(self.preset))
                except ModuleNotFoundError as e:  # a component still being written (tests catch this)
                    if e.name != f"unclip_mini.{COMPONENTS[name][0]}":
                        raise
        if self.clip.arch == "custom" and self.clip.image_size != self.data.resolution:
            raise ConfigError(f"clip.image_size = {self.clip.image_size} but data.resolution = "
                              f"{self.data.resolution}: a CLIP trained here reads the base images; make "
                              f"them equal")

    @classmethod
    def smoke(cls):
        return cls(preset="smoke")

    @classmethod
    def toy(cls):
        return cls(preset="toy")

    @classmethod
    def small(cls):
        return cls(preset="small")

    @classmethod
    def paper(cls):
        return cls(preset="paper")

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise ConfigError(f"Config.from_dict needs a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"Config has no field {unknown[0]!r} (a config from another version of the code?); "
                              f"valid fields: {', '.join(names)}")
        parts = {}
        for k, v in d.items():
            if k in COMPONENTS and isinstance(v, dict):
                parts[k] = type(_factory(k)(d.get("preset", "toy"))).from_dict(v)
            else:
                parts[k] = v
        return cls(**parts)

    def with_steps(self, stage: str, steps: int | None) -> "Config":
        """A copy where `stage` trains for `steps` steps (None: unchanged)."""
        if steps is None:
            return self
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps = {steps!r} must be a positive int (or None for the preset's "
                              f"default)")
        part = getattr(self, stage)
        return self.replace(**{stage: part.replace(train=part.train.replace(steps=steps))})


def default_run_dir(preset: str) -> Path:
    """`runs/<preset>` at the repository root (not the notebook's folder)."""
    return REPO_ROOT / "runs" / preset


class Run:
    """One preset's config, run folder and device: what every stage and notebook works in."""

    def __init__(self, preset: str = "toy", run_dir=None, device="auto", seed: int | None = None,
                 config: Config | None = None):
        if config is None:
            if preset not in PRESETS:
                raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
            config = Config(preset=preset)
        if seed is not None:
            config = config.replace(seed=seed)
        self.cfg = config
        self.preset = config.preset
        self.seed = config.seed
        self.folder = RunFolder(run_dir or default_run_dir(self.preset), self.preset)
        self.device = resolve_device(device)

    def __repr__(self):
        return f"Run(preset={self.preset!r}, folder={str(self.folder.root)!r}, device={str(self.device)!r})"

    @cached_property
    def world(self):
        """The toy data world of this preset."""
        from .data import ToyWorld
        return ToyWorld(self.cfg.data)

    def dataset(self, split: str):
        """The toy world's `split` ('train' | 'val' | 'heldout') at the configured size."""
        return self._datasets(split)

    def _datasets(self, split):
        cache = self.__dict__.setdefault("_dataset_cache", {})
        if split not in cache:
            cache[split] = self.world.dataset(split)
        return cache[split]

    def seed_everything(self, offset: int = 0):
        seed_everything(self.seed + offset)


# ---------------------------------------------------------------------------------------------
# stage records
# ---------------------------------------------------------------------------------------------

def stage_id(name: str, config: dict) -> str:
    """A trained stage's id: its name and a hash of everything that determined it."""
    return f"{name}-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def write_record(run: Run, name: str, config: dict, requires: dict | None = None, **extra) -> dict:
    """Mark stage `name` as trained: `<run>/<name>/stage.json` (atomic)."""
    record = {"stage": name, "id": stage_id(name, {"config": config, "requires": requires or {}}),
              "config": config, "requires": dict(requires or {}), **extra}
    atomic_write_json(record, run.folder.path(name, "stage.json"))
    return record


def read_record(run: Run, name: str) -> dict | None:
    """The stage's record, or None when it has not finished training in this run folder."""
    path = run.folder.root / name / "stage.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is unreadable ({e}): delete it to retrain stage {name!r}") from e


def trained_record(run: Run, name: str, label: str | None = None) -> dict:
    """The record of stage `name` (trained), or an ArtifactError that says how to train it.

    `label` names the stage in the message ("CLIP"); default: the stage name quoted.
    """
    record = read_record(run, name)
    if record is None:
        what = label or f"{name!r} stage"
        how = (f"train it again with the code that made it ({name!r} is not a registered stage; "
               f"`python -m unclip_mini stages` lists those)")
        if name in STAGES:
            how = (f"call stages.load_or_train(run, {name!r}) (notebook {STAGES[name].notebook}) or "
                   f"`python -m unclip_mini train {name} --preset {run.preset}`")
        raise ArtifactError(f"no trained {what} in {run.folder.root}: {how}")
    return record


def check_requires(run: Run, name: str, record: dict):
    """Refuse a stage trained from inputs that have changed since."""
    for dep, want in record.get("requires", {}).items():
        have = read_record(run, dep)
        if have is None or have["id"] != want:
            now = "missing" if have is None else have["id"]
            raise ArtifactError(f"stage {name!r} in {run.folder.root} was trained from {dep} {want}, but "
                                f"the {dep} there is now {now}: delete {run.folder.root / name} to retrain "
                                f"{name} on the current {dep}")


def _drift(old, now, prefix: str) -> list[str]:
    """Fields recorded in `old` whose value differs in `now` (fields only in `now` are new options)."""
    if isinstance(old, dict) and isinstance(now, dict):
        return [d for k, v in old.items() for d in _drift(v, now.get(k, "<missing>"), f"{prefix}.{k}")]
    return [] if old == now else [f"{prefix}: {old!r} -> {now!r}"]


def check_config(run: Run, name: str, record: dict):
    """Refuse a stage trained with another config than the run's (training steps aside: a run may be
    extended or cut short): the recorded component configs and seed must match `run.cfg` and `run.seed`."""
    from .train import _no_steps
    now = json.loads(json.dumps(run.cfg.to_dict()))
    diffs = []
    for key, old in record.get("config", {}).items():
        if key == "seed" and old != run.seed:
            diffs.append(f"seed: {old!r} -> {run.seed!r}")
        elif key in now and key != "preset" and isinstance(old, dict):
            diffs += _drift(_no_steps(old), _no_steps(now[key]), key)
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ArtifactError(f"stage {name!r} in {run.folder.root} was trained with another config than this "
                            f"run's ({shown}): use another run folder (run_dir=...) for the new config, or "
                            f"delete {run.folder.root / name} to retrain {name} with it")


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]   # stages that must be trained first
    notebook: str            # the notebook that teaches it
    module: str              # the library module that trains and loads it
    about: str
    train_fn: str = "train_stage"  # module.<train_fn>(run, steps=None) -> the trained object
    load_fn: str = "load_stage"    # module.<load_fn>(run) -> the trained object


STAGES = {s.name: s for s in [
    Stage("clip", (), "02_clip", "clip_model", "contrastive text-image encoder + cached embeddings"),
    Stage("diffusion_prior", ("clip",), "04_diffusion_prior", "diffusion_prior",
          "caption -> CLIP image embedding by diffusion (the paper's preferred prior)"),
    Stage("ar_prior", ("clip",), "05_ar_prior", "ar_prior",
          "caption -> CLIP image embedding as PCA-quantized codes, autoregressively"),
    Stage("checker", (), "06_decoder", "metrics", "attribute classifier that scores generated toy images",
          "train_checker", "load_checker"),
    Stage("decoder", ("clip",), "06_decoder", "decoder", "CLIP image embedding (+ caption) -> base image"),
    Stage("glide", ("clip",), "06_decoder", "decoder", "the GLIDE-style baseline: caption -> base image",
          "train_glide", "load_glide"),
    Stage("upsampler1", (), "07_upsamplers", "upsampler", "base -> x4, Gaussian-blur corrupted conditioning",
          "train_upsampler1", "load_upsampler1"),
    Stage("upsampler2", (), "07_upsamplers", "upsampler", "x4 -> x16, BSR-degraded conditioning",
          "train_upsampler2", "load_upsampler2"),
]}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    return STAGES[name]


def _module(stage: Stage):
    import importlib
    return importlib.import_module(f"unclip_mini.{stage.module}")


def load_or_train(run: Run, name: str, steps: int | None = None, verbose: bool = True):
    """Load stage `name` from the run folder; train it (and any missing stage it needs) if absent."""
    stage = get_stage(name)
    record = read_record(run, name)
    if record is not None:
        check_requires(run, name, record)
        check_config(run, name, record)
        if verbose:
            print(f"[{name}] loaded from {run.folder.root / name} (id {record['id']})")
        return getattr(_module(stage), stage.load_fn)(run)
    for dep in stage.needs:
        if read_record(run, dep) is None:
            load_or_train(run, dep, verbose=verbose)
    if verbose:
        print(f"[{name}] not trained yet in {run.folder.root / name}: training it now through the library "
              f"(notebook {stage.notebook} explains this stage)")
    return getattr(_module(stage), stage.train_fn)(run, steps=steps)
