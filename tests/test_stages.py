"""Configs, presets, the run, the one stage lifecycle: records, provenance checks, variants, the layering."""
import dataclasses
import json
import os

import pytest

from unclip_mini import artifacts, config, diffusion_prior, notebook, stages
from unclip_mini.errors import ArtifactError, ConfigError


@pytest.mark.parametrize("preset", config.PRESETS)
def test_every_component_resolves_for_every_preset(preset):
    cfg = stages.Config(preset=preset)
    for name in stages.COMPONENTS:
        part = getattr(cfg, name)
        assert part is not None, f"component {name} has no config for preset {preset}"
        assert dataclasses.is_dataclass(part)
    assert stages.Config.from_dict(cfg.to_dict()) == cfg, "configs round-trip through plain dicts"


def test_every_stage_is_a_spec_of_its_component():
    for name, s in stages.STAGES.items():
        assert s.name == name and hasattr(stages.Config(preset="smoke"), s.field), name
        for fn in (s.build, s.batches, s.loss, s.wrap):
            assert callable(fn), name
        for dep in s.needs:
            assert dep in stages.STAGES
        cfg = getattr(stages.Config(preset="smoke"), s.field)
        assert all(f in cfg.to_dict() for f in s.sampling_fields), name


def test_components_never_import_the_lifecycle():
    """The dependency graph runs one way: components export a spec; only stages.py (and the entry points
    above it) import stages."""
    import ast
    from pathlib import Path
    lib = Path(stages.__file__).parent
    above = {"stages.py", "notebook.py", "course.py", "bench.py", "__main__.py", "report.py"}
    for f in sorted(lib.glob("*.py")):
        if f.name in above:
            continue
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
                assert not (node.module in ("stages", "unclip_mini.stages") or
                            (node.module in (None, "unclip_mini") and "stages" in names)), \
                    f"{f.name} imports stages (line {node.lineno}): components must not"


def test_unknown_preset_stage_and_field():
    with pytest.raises(ConfigError, match="unknown preset 'tiny'; valid presets: smoke, toy, small, paper"):
        stages.Run("tiny")
    with pytest.raises(ConfigError, match="valid choices: 'smoke', 'toy', 'small', 'paper'"):
        stages.Config(preset="huge")
    with pytest.raises(ConfigError, match="unknown stage 'vae'; valid stages: clip, "):
        stages.get_stage("vae")
    with pytest.raises(ConfigError, match="has no field 'widht'; valid fields: "):
        stages.Config(preset="smoke").clip.replace(widht=3)
    with pytest.raises(ConfigError, match="steps = 0 must be a positive int"):
        stages.Config(preset="smoke").with_steps("clip", 0)


def test_mismatched_clip_and_data_resolution():
    cfg = stages.Config(preset="smoke")
    with pytest.raises(ConfigError, match="clip.image_size = 32 but data.resolution = 16"):
        stages.Config(preset="smoke", clip=cfg.clip.replace(image_size=32))


def test_run_folder_not_writable(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/unclip_mini_run"  # root can write anywhere on disk, but not into /proc
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    with pytest.raises(ArtifactError, match="is not writable.*pass another folder"):
        stages.Run("smoke", run_dir=target)


def test_stage_records_and_requires(tmp_path):
    run = stages.Run("smoke", run_dir=tmp_path)
    assert stages.read_record(run, "clip") is None
    clip = stages.write_record(run, "clip", {"a": 1})
    prior = stages.write_record(run, "diffusion_prior", {"b": 2}, requires={"clip": clip["id"]})
    assert set(prior) >= {"stage", "id", "config", "data", "seed", "dims", "requires", "variant", "code_version"}
    assert prior["data"] == run.cfg.data.to_dict() and prior["seed"] == 0
    stages.check_requires(run, "diffusion_prior", prior)
    stages.write_record(run, "clip", {"a": 2})  # the CLIP was retrained with another config
    with pytest.raises(ArtifactError, match="was trained from clip clip-.* but the clip there is now"):
        stages.check_requires(run, "diffusion_prior", prior)
    (tmp_path / "clip" / "stage.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        stages.read_record(run, "clip")


def test_artifacts_refuse_other_config_and_inputs(tmp_path):
    folder = artifacts.RunFolder(tmp_path, "smoke")
    folder.save("ar_prior", "pca", {"x": 1}, config={"n": 4}, requires={"clip": "clip-1"})
    payload, meta = folder.load("ar_prior", "pca", config={"n": 4}, requires={"clip": "clip-1"})
    assert payload == {"x": 1} and meta["code_version"]
    with pytest.raises(ArtifactError, match=r"another config \(n: 4 -> 8\)"):
        folder.load("ar_prior", "pca", config={"n": 8})
    with pytest.raises(ArtifactError, match="made from clip 'clip-1', but the current clip is 'clip-2'"):
        folder.load("ar_prior", "pca", requires={"clip": "clip-2"})
    path = tmp_path / "ar_prior" / "pca.pt"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(Exception, match="corrupt, truncated"):
        folder.load("ar_prior", "pca")


def test_metrics_are_written_atomically_with_context(tmp_path):
    run = stages.Run("smoke", run_dir=tmp_path)
    notebook.save_metrics(run, "99_test", {"acc": 0.123456}, notes={"acc": "accuracy"})
    rec = json.loads((tmp_path / "metrics" / "99_test.json").read_text())
    assert rec["metrics"] == {"acc": 0.1235} and rec["preset"] == "smoke" and rec["device"] == "cpu"
    assert not [p for p in (tmp_path / "metrics").iterdir() if p.suffix == ".tmp"]


@pytest.mark.parametrize("name,value,hint", [
    ("steps", "100", "-p steps 500"), ("preset", 3, "-p preset toy"), ("seed", 1.5, "-p seed 0"),
    ("interactive", "yes", "-p interactive True"),
])
def test_notebook_parameters_of_the_wrong_type(name, value, hint):
    with pytest.raises(ConfigError, match=f"notebook parameter {name}=.* has type .*{hint}"):
        notebook.setup(**{name: value})


@pytest.fixture(scope="module")
def trained_smoke(tmp_path_factory):
    """Every registered stage trained once at smoke, in one folder (a few seconds)."""
    root = tmp_path_factory.mktemp("every_stage")
    run = stages.Run("smoke", run_dir=root, device="cpu")
    for name in stages.STAGES:
        stages.load_or_train(run, name, verbose=False)
    return root


# one trained field of every stage, and a value it was not trained with
CHANGES = {
    "clip": ("vision_layers", 2), "diffusion_prior": ("layers", 2), "ar_prior": ("n_buckets", 32),
    "checker": ("hidden", 33), "decoder": ("p_drop_text", 0.3), "glide": ("p_drop_text", 0.3),
    "upsampler1": ("degradation", "none"), "upsampler2": ("degradation", "blur"),
}


def test_changes_cover_every_stage():
    assert set(CHANGES) == set(stages.STAGES)


@pytest.mark.parametrize("name", list(CHANGES))
def test_a_changed_config_of_every_stage_is_refused_naming_the_field(name, trained_smoke):
    run = stages.Run("smoke", run_dir=trained_smoke, device="cpu")
    loaded = stages.load_stage(run, name)                                   # the run's own config loads
    assert loaded.record["id"] == stages.read_record(run, name)["id"]
    field, value = CHANGES[name]
    part = getattr(run.cfg, name)
    assert getattr(part, field) != value
    run.cfg = run.cfg.replace(**{name: part.replace(**{field: value})})
    with pytest.raises(ArtifactError, match=rf"{name}\.{field}: .* -> {value!r}.*another run folder"):
        stages.load_stage(run, name)


@pytest.mark.parametrize("name", [n for n, s in stages.STAGES.items() if s.sampling_fields])
def test_sampling_fields_change_without_retraining(name, trained_smoke):
    run = stages.Run("smoke", run_dir=trained_smoke, device="cpu")
    spec, part = stages.STAGES[name], getattr(run.cfg, name)
    field = spec.sampling_fields[0]
    value = getattr(part, field)
    new = {"sample_steps": 3, "guidance_scale": 2.0, "temperature": 0.5}.get(field, value)
    run.cfg = run.cfg.replace(**{name: part.replace(**{field: new})})
    assert getattr(stages.load_stage(run, name).cfg, field) == new


def test_a_stage_trained_with_another_seed_or_world_is_refused(trained_smoke):
    reseeded = stages.Run("smoke", run_dir=trained_smoke, device="cpu", seed=1)
    with pytest.raises(ArtifactError, match=r"seed: 0 -> 1.*delete"):
        stages.load_stage(reseeded, "checker")
    other = stages.Run("smoke", run_dir=trained_smoke, device="cpu")
    was = other.cfg.data.p_text
    other.cfg = other.cfg.replace(data=other.cfg.data.replace(p_text=0.9))
    with pytest.raises(ArtifactError, match=rf"data\.p_text: {was!r} -> 0\.9"):
        stages.load_stage(other, "upsampler1")


def test_steps_may_differ_a_run_can_be_extended(tmp_path):
    run = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    stages.load_or_train(run, "checker", verbose=False)
    longer = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    longer.cfg = longer.cfg.with_steps("checker", 99)
    assert stages.load_or_train(longer, "checker", verbose=False).record["steps"] == run.cfg.checker.train.steps


def test_a_variant_has_its_own_folder_and_record(trained_smoke):
    run = stages.Run("smoke", run_dir=trained_smoke, device="cpu")
    cfg = run.cfg.checker.replace(hidden=40)
    v = stages.load_or_train(run, "checker", config=cfg, variant="wide", verbose=False)
    assert v.record["stage"] == "checker-wide" and v.record["variant"] == "wide" and v.cfg.hidden == 40
    assert stages.load_stage(run, "checker", config=cfg, variant="wide").record["id"] == v.record["id"]
    with pytest.raises(ArtifactError, match=r"checker\.hidden: 40 -> 32"):
        stages.load_stage(run, "checker", variant="wide")                  # the run's own config differs
    with pytest.raises(ConfigError, match="variant"):
        stages.load_or_train(run, "checker", variant="a/b")
    with pytest.raises(ConfigError, match="must be a CheckerConfig"):
        stages.load_or_train(run, "checker", config=run.cfg.decoder, variant="x")


def test_named_variants_train_through_the_command_as_the_notebooks_build_them(trained_smoke, tmp_path):
    """The variants notebooks 07 and 10 train for their comparisons (`stages.VARIANTS`), which `course` trains
    ahead: `train <stage>-<variant>` writes the folder and record that the notebook's own call then loads."""
    import shutil
    import subprocess
    import sys
    for name in ("clip", "upsampler1", "diffusion_prior"):
        shutil.copytree(trained_smoke / name, tmp_path / name)
    env = {**os.environ, "PYTHONPATH": str(stages.REPO_ROOT)}
    for name in stages.VARIANTS:
        out = subprocess.run([sys.executable, "-m", "unclip_mini", "train", name, "--preset", "smoke",
                              "--run-dir", str(tmp_path), "--device", "cpu"], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert stages.read_record(stages.Run("smoke", run_dir=tmp_path, device="cpu"), name)["stage"] == name
    run = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    noblur = stages.load_or_train(run, "upsampler1", config=run.cfg.upsampler1.replace(degradation="none"),
                                  variant="noblur", verbose=False)                           # as notebook 07 asks
    assert noblur.record["id"] == stages.read_record(run, "upsampler1-noblur")["id"]
    gap = stages.variant_config(run, "diffusion_prior-gap").text_gap
    emb = run.embeddings("train")
    assert gap == diffusion_prior.gap_for_cosine(emb["image_embed"], emb["text_embed"], stages.GAP_TARGET_COSINE)
    prior = stages.load_or_train(run, "diffusion_prior", config=run.cfg.diffusion_prior.replace(text_gap=gap),
                                 variant="gap", verbose=False)                               # as notebook 10 asks
    assert prior.record["id"] == stages.read_record(run, "diffusion_prior-gap")["id"]
    assert stages.needs_of("diffusion_prior-gap") == ("clip",) and stages.needs_of("upsampler1-noblur") == ()
    with pytest.raises(ConfigError, match="variants: upsampler1-noblur"):
        stages.needs_of("upsampler1-sharp")


def test_a_second_process_waits_for_the_one_training_a_stage(tmp_path):
    """`course` trains stages ahead in a background process; a notebook that asks for the same stage meanwhile
    waits for it (an exclusive lock per stage) instead of training it a second time into the same folder."""
    import subprocess
    import sys
    env = {**os.environ, "UNCLIP_PROGRESS": "off", "OMP_NUM_THREADS": "1"}
    run_py = f"from unclip_mini import stages\nrun = stages.Run('smoke', run_dir={str(tmp_path)!r}, device='cpu')\n"
    holder = subprocess.Popen([sys.executable, "-c", run_py + (
        "import sys\nwith stages.training_lock(run, 'checker'):\n    print('locked', flush=True)\n"
        "    sys.stdin.readline()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    waiter = subprocess.Popen([sys.executable, "-c", run_py + "stages.load_or_train(run, 'checker')\n"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = waiter.stdout.readline()
    assert "another process is training it" in first, first
    assert waiter.poll() is None, "it must wait while the lock is held"
    holder.communicate("release\n", timeout=60)                   # the holder lets go (without training)
    rest, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    assert "[checker] not trained yet" in rest                     # it then trains the stage itself, once
    assert stages.read_record(stages.Run("smoke", run_dir=tmp_path, device="cpu"), "checker") is not None
