"""The stage lifecycle: every component is trained, recorded, checked and loaded here, one way.

    Config     every component's config for one preset (`Config(preset="toy")`)
    Run        a Config + a run folder + a device + a seed: what notebooks, the CLI and tests work in
    STAGES     name -> the component's `train.StageSpec` (what it needs, how to build, feed, train, wrap it)
    load_or_train(run, name)   load a stage from the run folder, or train it (and what it needs) first
    load_pipeline(run)         the whole of unCLIP (`unclip.UnCLIP`) from the run's trained stages

A trained stage leaves `<run>/<stage>/checkpoint.pt` (train.py) and, written last, `<run>/<stage>/stage.json`,
its record (one layout for every stage):

    {"stage": "decoder", "id": "decoder-3f2a...",       the name and a hash of everything below but results
     "config": {...},                                   the component's config (sampling-only fields left out)
     "data": {...}, "seed": 0,                          the world it was trained on, the run's seed
     "dims": {...},                                     what the network was built from (sizes of its inputs)
     "requires": {"clip": "clip-8b1c..."},              the ids of the stages it was trained from
     "variant": null,                                   or the name of a variant (e.g. upsampler1 'clean')
     "parameters": 2903907, "steps": 6000, "train_seconds": 1895.1, "history": {...},
     "results": {...},                                  what the component measured after training
     "code_version": "...", "created": "..."}

Loading refuses a stage whose recorded config, data or seed differ from the run's (training steps aside: a run
may be extended), or whose inputs have changed since (e.g. a prior trained on a CLIP that was retrained), and
says how to rebuild it. The object a load returns carries its record as `.record`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from . import ar_prior, checker, clip_model, decoder, diffusion_prior, upsampler
from .artifacts import RunFolder, atomic_write_json, code_version
from .config import PRESETS, PresetConfig, check_choice, check_range
from .data import DataConfig, ToyWorld, open_dataset
from .errors import ArtifactError, ConfigError
from .distributed import dist_info, on_rank0
from .train import (StageSpec, Trainer, load_checkpoint, resolve_device, seed_everything, training_threads,
                    without_steps)

try:
    import fcntl  # POSIX file locks (training_lock)
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None

REPO_ROOT = Path(__file__).resolve().parent.parent

# field of Config -> factory(preset) giving that component's config for a preset
COMPONENTS = {
    "data": DataConfig.preset,
    "clip": clip_model.ClipConfig.preset,
    "diffusion_prior": diffusion_prior.DiffusionPriorConfig.preset,
    "ar_prior": ar_prior.ARPriorConfig.preset,
    "checker": checker.CheckerConfig.preset,
    "decoder": decoder.DecoderConfig.preset,
    "glide": decoder.DecoderConfig.glide,
    "upsampler1": upsampler.UpsamplerConfig.stage1,
    "upsampler2": upsampler.UpsamplerConfig.stage2,
}

STAGES: dict[str, StageSpec] = {s.name: s for s in [
    clip_model.SPEC, diffusion_prior.SPEC, ar_prior.SPEC, checker.SPEC, decoder.SPEC, decoder.GLIDE_SPEC,
    upsampler.SPEC1, upsampler.SPEC2]}

GAP_TARGET_COSINE = 0.5   # notebook 10: matched pairs moved to this mean cos(z_t', z_i) for the gap experiment


@dataclass(frozen=True)
class VariantSpec:
    """A stage trained with another config for a notebook's comparison, named `<stage>-<variant>` (its folder),
    so that `course` can train it ahead and `train <stage>-<variant>` by hand. `config(run)` builds its config
    from the run's once the stage's needs exist."""
    stage: str
    variant: str
    config: Any          # (Run) -> the component's config

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.variant}"


def _gap_config(run):
    emb = run.embeddings("train")
    gap = diffusion_prior.gap_for_cosine(emb["image_embed"], emb["text_embed"], GAP_TARGET_COSINE)
    return run.cfg.diffusion_prior.replace(text_gap=gap)


VARIANTS: dict[str, VariantSpec] = {v.name: v for v in [
    # the corruption ablation: upsampler 1 trained on clean inputs
    VariantSpec("upsampler1", "noblur", lambda run: run.cfg.upsampler1.replace(degradation="none")),   # notebook 07
    # the modality-gap experiment: a diffusion prior trained on widened z_t
    VariantSpec("diffusion_prior", "gap", _gap_config),                                           # notebook 10
]}


@dataclass(frozen=True)
class Config(PresetConfig):
    """The configuration of every stage for one preset (each part is that component's own config)."""
    preset: str = "toy"
    seed: int = 0
    data: Any = None              # data.DataConfig
    clip: Any = None              # clip_model.ClipConfig
    diffusion_prior: Any = None   # diffusion_prior.DiffusionPriorConfig
    ar_prior: Any = None          # ar_prior.ARPriorConfig
    checker: Any = None           # checker.CheckerConfig (the attribute checker that scores images)
    decoder: Any = None           # decoder.DecoderConfig
    glide: Any = None             # decoder.DecoderConfig without z_i: the GLIDE-style baseline
    upsampler1: Any = None        # upsampler.UpsamplerConfig, base -> x4
    upsampler2: Any = None        # upsampler.UpsamplerConfig, x4 -> x16

    def __post_init__(self):
        check_choice(self, "preset", PRESETS)
        check_range(self, "seed", 0, integer=True)
        for name, factory in COMPONENTS.items():  # a missing component takes this preset's default
            if getattr(self, name) is None:
                object.__setattr__(self, name, factory(self.preset))
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
        parts = {k: (type(COMPONENTS[k](d.get("preset", "toy"))).from_dict(v)
                     if k in COMPONENTS and isinstance(v, dict) else v) for k, v in d.items()}
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


def display_path(path) -> str:
    """`path` as messages print it: relative to the repository root when it lies inside (so the outputs a
    notebook stores do not hold the absolute paths of the machine that ran it), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


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
        self.folder = RunFolder(run_dir or default_run_dir(config.preset), config.preset)
        self.device = resolve_device(device)
        self._datasets = {}

    @property
    def preset(self) -> str:
        return self.cfg.preset

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def __repr__(self):
        return f"Run(preset={self.preset!r}, folder={str(self.folder.root)!r}, device={str(self.device)!r})"

    @cached_property
    def world(self) -> ToyWorld:
        """The toy data world of this preset."""
        return ToyWorld(self.cfg.data)

    def dataset(self, split: str):
        """Split 'train' | 'val' | 'heldout' of the configured data (renders are cached once made)."""
        if split not in self._datasets:
            self._datasets[split] = open_dataset(self.cfg.data, split, self.world)
        return self._datasets[split]

    def embeddings(self, split: str = "train") -> dict:
        """The CLIP stage's cached embeddings of `split` (z_i, z_t, tokens, token features; clip_model.embed_dataset),
        refused if they were made by another CLIP than the current one."""
        record = trained_record(self, "clip")
        cache = self.__dict__.setdefault("_embeddings", {})
        if cache.get("id") != record["id"]:
            payload, _ = self.folder.load("clip", "embeddings", requires={"clip": record["id"]},
                                          rebuild=f"delete {self.folder.root / 'clip'} and retrain the clip stage")
            cache.clear()
            cache.update(id=record["id"], payload=payload)
        payload = cache["payload"]
        if split not in payload:
            raise ArtifactError(f"the embeddings cache has no split {split!r}; valid: {', '.join(payload)}")
        return payload[split]

    def seed_everything(self, offset: int = 0):
        seed_everything(self.seed + offset)


# ---------------------------------------------------------------------------------------------
# stage records
# ---------------------------------------------------------------------------------------------

def stage_id(name: str, identity: dict) -> str:
    """A trained stage's id: its name and a hash of everything that determined it."""
    return f"{name}-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def read_record(run: Run, name: str) -> dict | None:
    """The stage's record, or None when it has not finished training in this run folder."""
    path = run.folder.root / name / "stage.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is unreadable ({e}): delete it to retrain stage {name!r}") from e


def trained_record(run: Run, name: str) -> dict:
    """The record of stage `name` (trained), or an ArtifactError that says how to train it."""
    record = read_record(run, name)
    if record is None:
        base = name.split("-")[0]
        how = (f"train it again with the code that made it ({name!r} is not a registered stage; "
               f"`python -m unclip_mini stages` lists those)")
        if name in STAGES:
            how = (f"call stages.load_or_train(run, {name!r}) (notebook {STAGES[name].notebook}) or "
                   f"`python -m unclip_mini train {name} --preset {run.preset} --run-dir {run.folder.root}`")
        elif base in STAGES:
            how = f"train the variant with stages.load_or_train(run, {base!r}, config=..., variant=...)"
        raise ArtifactError(f"no trained {name!r} stage in {run.folder.root}: {how}")
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


def trained_config(spec: StageSpec, cfg) -> dict:
    """The part of a component's config that determines its trained weights (sampling fields left out)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in spec.sampling_fields}


def check_config(run: Run, name: str, record: dict, cfg) -> None:
    """Refuse a stage trained with another config, data or seed than `cfg` (the component's config now),
    `run.cfg.data` and `run.seed`; training steps may differ."""
    spec = STAGES[record.get("spec", name)]
    now = {"config": trained_config(spec, cfg), "data": run.cfg.data.to_dict()}
    diffs = []
    for key, prefix in (("config", spec.field), ("data", "data")):
        diffs += _drift(without_steps(record.get(key, {})), without_steps(now[key]), prefix)
    if record.get("seed") != run.seed:
        diffs.append(f"seed: {record.get('seed')!r} -> {run.seed!r}")
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ArtifactError(f"stage {name!r} in {run.folder.root} was trained with another config than this "
                            f"run's ({shown}): use another run folder (run_dir=...) for the new config, or "
                            f"delete {run.folder.root / name} to retrain {name} with it")


def write_record(run: Run, name: str, config: dict, dims: dict | None = None, requires: dict | None = None,
                 **fields) -> dict:
    """Mark stage `name` as trained: write its record `<run>/<name>/stage.json` (atomically) and return it.

    `config` is the component's trained config (`trained_config`); the run supplies the data and the seed.
    Under torchrun rank 0 writes it and every rank returns rank 0's record.
    """
    identity = {"config": config, "data": run.cfg.data.to_dict(), "seed": run.seed, "dims": dict(dims or {})}
    requires = dict(requires or {})
    record = {"stage": name, "spec": fields.pop("spec", name.split("-")[0]),
              "id": stage_id(name, {**identity, "requires": requires}), **identity, "requires": requires,
              "variant": fields.pop("variant", None), **fields,
              "code_version": code_version(), "created": time.strftime("%Y-%m-%d %H:%M:%S")}

    def write():
        atomic_write_json(record, run.folder.path(name, "stage.json"))
        return record
    return on_rank0(write)


# ---------------------------------------------------------------------------------------------
# what a component sees of the run while its stage is trained or loaded
# ---------------------------------------------------------------------------------------------

class StageContext:
    """The run as one stage sees it (the `ctx` of `train.StageSpec`): the run's config, device, seed,
    data and CLIP cache, plus the stage's own folder and artifacts, tied to the stages it needs."""

    def __init__(self, run: Run, folder_name: str, requires: dict, stage_id: str | None = None):
        self.run, self.name, self.requires, self.id = run, folder_name, dict(requires), stage_id
        self.cfg, self.device, self.seed = run.cfg, run.device, run.seed

    @property
    def world(self) -> ToyWorld:
        return self.run.world

    @property
    def folder(self) -> Path:
        return self.run.folder.root / self.name

    def dataset(self, split: str):
        return self.run.dataset(split)

    def embeddings(self, split: str = "train") -> dict:
        return self.run.embeddings(split)

    def save(self, artifact: str, payload: dict, config: dict, requires: dict | None = None):
        """Write `<stage>/<artifact>.pt` (atomic), tied to `config` and to `requires` (default: the needs' ids).
        Under torchrun rank 0 writes it while the others wait; then every rank may `load` it."""
        return on_rank0(self.run.folder.save, self.name, artifact, payload, config=config,
                        requires=self.requires if requires is None else requires)

    def load(self, artifact: str, config: dict, requires: dict | None = None) -> dict:
        """Read `<stage>/<artifact>.pt`, refusing one made with another config or from other inputs."""
        payload, _ = self.run.folder.load(
            self.name, artifact, config=config, requires=self.requires if requires is None else requires,
            rebuild=f"delete {self.folder} and retrain the {self.name} stage")
        return payload


# ---------------------------------------------------------------------------------------------
# the lifecycle
# ---------------------------------------------------------------------------------------------

def get_stage(name: str) -> StageSpec:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}; variants: "
                          f"{', '.join(VARIANTS)}")
    return STAGES[name]


def needs_of(name: str) -> tuple:
    """The stages that stage or variant `name` needs trained first (an unknown name fails, listing both kinds)."""
    return STAGES[VARIANTS[name].stage].needs if name in VARIANTS else get_stage(name).needs


def variant_config(run: Run, name: str):
    """The config variant `name` (e.g. 'upsampler1-noblur') trains with in `run`."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; variants: {', '.join(VARIANTS)}")
    return VARIANTS[name].config(run)


def load_or_train_named(run: Run, name: str, steps: int | None = None, verbose: bool = True):
    """`load_or_train` for a stage's name or a variant's name (`VARIANTS`): what `train` and `course` call."""
    if name not in VARIANTS:
        return load_or_train(run, name, steps=steps, verbose=verbose)
    v = VARIANTS[name]
    for dep in STAGES[v.stage].needs:                  # the variant's config may read them (the gap prior: the CLIP)
        load_or_train(run, dep, verbose=verbose)
    return load_or_train(run, v.stage, steps=steps, verbose=verbose, config=v.config(run), variant=v.variant)


def _folder_name(name: str, variant: str | None) -> str:
    if variant is None:
        return name
    if not isinstance(variant, str) or not variant.replace("_", "").isalnum():
        raise ConfigError(f"variant {variant!r} must be a short name of letters, digits and '_' (e.g. 'clean')")
    return f"{name}-{variant}"


def _stage_config(run: Run, spec: StageSpec, config, steps):
    cfg = getattr(run.cfg, spec.field) if config is None else config
    want = type(getattr(run.cfg, spec.field))
    if not isinstance(cfg, want):
        raise ConfigError(f"config for stage {spec.name!r} must be a {want.__name__}, got {type(cfg).__name__}")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps = {steps!r} must be a positive int (or None for the preset's default)")
        cfg = cfg.replace(train=cfg.train.replace(steps=steps))
    return cfg


def train_stage(run: Run, name: str, steps: int | None = None, config=None, variant: str | None = None,
                progress: bool = True):
    """Train stage `name` (resuming its checkpoint if there is one), write its record, return it wrapped.

    config: the component's config (default: the run's); with `variant`, a config that differs from the
    run's is trained into `<run>/<name>-<variant>/` (e.g. upsampler 1 without corruption, for an ablation).
    The stages it needs must be trained already (`load_or_train` trains them first).
    """
    spec = get_stage(name)
    cfg = _stage_config(run, spec, config, steps)
    folder = _folder_name(name, variant)
    requires = {}
    for dep in spec.needs:
        have = read_record(run, dep)
        if have is None:
            raise ArtifactError(f"stage {name!r} needs a trained {dep!r} stage in {run.folder.root}: call "
                                f"stages.load_or_train(run, {dep!r}) first (load_or_train(run, {name!r}) trains "
                                f"what is missing)")
        requires[dep] = have["id"]
    ctx = StageContext(run, folder, requires)
    t0 = time.perf_counter()
    dims = spec.prepare(cfg, ctx) if spec.prepare else {}
    identity = {"config": trained_config(spec, cfg), "data": run.cfg.data.to_dict(), "seed": run.seed,
                "dims": dims}
    ctx.id = stage_id(folder, {**identity, "requires": requires})  # the id write_record will give it
    network = spec.pretrained(cfg, ctx) if spec.pretrained else None
    history, trained_steps = None, 0
    if network is None:
        get_batch, size = spec.batches(cfg, dims, ctx)
        run.seed_everything()
        network = spec.build(cfg, dims)  # initialised after seeding: same seed -> same weights
        trainer = Trainer(network, spec.loss(cfg, dims, ctx), get_batch, size, cfg.train,
                          run.folder.checkpoint_path(folder), stage=folder, config=identity, requires=requires,
                          seed=run.seed, device=run.device, progress=progress)
        with training_threads():
            history = trainer.fit()
        network, trained_steps = trainer.ema_network(lambda: spec.build(cfg, dims)), trainer.step
    obj = spec.wrap(network, cfg, dims, ctx)
    # what the component measures and exports after training: rank 0 alone, the others get its results
    results = on_rank0(spec.finish, obj, cfg, dims, ctx) if spec.finish else {}
    record = write_record(  # last: the stage is done
        run, folder, identity["config"], dims, requires, spec=name, variant=variant,
        parameters=sum(p.numel() for p in network.parameters()), steps=trained_steps,
        train_seconds=round(history["seconds"][-1], 1) if history and history["seconds"] else 0.0,
        wall_seconds=round(time.perf_counter() - t0, 1), history=history, results=results)
    assert record["id"] == ctx.id
    obj.record = record
    return obj


def load_stage(run: Run, name: str, config=None, variant: str | None = None):
    """Load trained stage `name` (its EMA weights) as the object later stages use, checked against the run.

    config: the component's config the stage must match (default: the run's); its sampling-only fields
    (`StageSpec.sampling_fields`, e.g. the decoder's guidance scale) are taken from it, not from the record.
    """
    spec = get_stage(name)
    cfg_now = _stage_config(run, spec, config, None)
    folder = _folder_name(name, variant)
    record = trained_record(run, folder)
    check_requires(run, folder, record)
    check_config(run, folder, record, cfg_now)
    cfg = type(cfg_now).from_dict({**record["config"], **{k: getattr(cfg_now, k) for k in spec.sampling_fields}})
    ctx = StageContext(run, folder, record["requires"], record["id"])
    dims = record["dims"]
    network = spec.pretrained(cfg, ctx) if spec.pretrained else None
    if network is None:
        identity = {k: record[k] for k in ("config", "data", "seed", "dims")}
        ckpt = load_checkpoint(run.folder.checkpoint_path(folder), stage=folder, config=identity,
                               fix=f"delete {run.folder.root / folder} and retrain the {folder} stage")
        network = spec.build(cfg, dims)
        network.load_state_dict(ckpt["ema"])
    obj = spec.wrap(network, cfg, dims, ctx)
    obj.record = record
    return obj


def load_or_train(run: Run, name: str, steps: int | None = None, verbose: bool = True, config=None,
                  variant: str | None = None):
    """Load stage `name` from the run folder; train it (and any missing stage it needs) if absent."""
    spec = get_stage(name)
    folder = _folder_name(name, variant)
    verbose = verbose and dist_info()[0] == 0  # under torchrun rank 0 speaks for all
    if read_record(run, folder) is not None:
        obj = load_stage(run, name, config=config, variant=variant)
        if verbose:
            print(f"[{folder}] loaded from {display_path(run.folder.root / folder)} (id {obj.record['id']})")
        return obj
    for dep in spec.needs:
        if read_record(run, dep) is None:
            load_or_train(run, dep, verbose=verbose)
    with training_lock(run, folder, verbose):
        if read_record(run, folder) is not None:  # another process trained it while this one waited
            return load_or_train(run, name, verbose=verbose, config=config, variant=variant)
        if verbose:
            print(f"[{folder}] not trained yet in {display_path(run.folder.root / folder)}: training it now through the library "
                  f"(notebook {spec.notebook} explains this stage)")
        return train_stage(run, name, steps=steps, config=config, variant=variant)


@contextlib.contextmanager
def training_lock(run: Run, folder: str, verbose: bool = True):
    """One process at a time trains a stage in a run folder (an exclusive lock on `<stage>/.training.lock`): a
    second one asking for it waits, then loads what the first wrote. `course` relies on this when it trains
    stages ahead in a background process. Under torchrun every rank trains together, so no lock is taken."""
    if dist_info()[1] > 1 or fcntl is None:
        yield
        return
    with open(run.folder.path(folder, ".training.lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if verbose:
                print(f"[{folder}] another process is training it in {display_path(run.folder.root)}: waiting for it", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# the whole stack
# ---------------------------------------------------------------------------------------------

def load_pipeline(run: Run, train: bool = False, priors=("diffusion", "ar"), upsamplers: int = 2,
                  glide: bool = False, verbose: bool = False):
    """unCLIP (`unclip.UnCLIP`) from the run folder's trained stages: CLIP, the priors, the decoder and the
    upsamplers (and, with `glide`, the GLIDE-style baseline beside it).

    train=False (the `generate` command): every stage must be trained already; a missing one fails naming the
    command that trains it. train=True (notebooks): missing stages are trained first, as `load_or_train` does.
    """
    from .unclip import UnCLIP
    want = ["clip"] + [{"diffusion": "diffusion_prior", "ar": "ar_prior"}[p] for p in priors] + ["decoder"] + \
        [f"upsampler{k}" for k in range(1, upsamplers + 1)] + (["glide"] if glide else [])
    if not train:
        missing = [s for s in want if read_record(run, s) is None]
        if len(missing) == len(want):
            raise ArtifactError(f"no trained unCLIP in {run.folder.root}: train every stage with `python -m "
                                f"unclip_mini course --preset {run.preset} --out {run.folder.root}` (the notebooks) "
                                f"or stage by stage with `python -m unclip_mini train STAGE --preset {run.preset} "
                                f"--run-dir {run.folder.root}` for {', '.join(want)}")
        if missing:
            raise ArtifactError(f"the run folder {run.folder.root} has no trained {', '.join(missing)} stage"
                                f"{'s' if len(missing) > 1 else ''}: train "
                                + " and ".join(f"`python -m unclip_mini train {m} --preset {run.preset} --run-dir "
                                               f"{run.folder.root}`" for m in missing))
    get = (lambda s: load_or_train(run, s, verbose=verbose)) if train else (lambda s: load_stage(run, s))
    parts = {s: get(s) for s in want}
    return UnCLIP(parts["clip"], parts["decoder"],
                  priors={p: parts[{"diffusion": "diffusion_prior", "ar": "ar_prior"}[p]] for p in priors},
                  upsamplers=[parts[f"upsampler{k}"] for k in range(1, upsamplers + 1)],
                  vocabulary={"colours": list(run.cfg.data.colours), "shapes": list(run.cfg.data.shapes)}
                  if run.cfg.data.source == "toy" else None, glide=parts.get("glide"))
