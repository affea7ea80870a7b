"""Configs, presets, the run, stage records and their provenance checks."""
import dataclasses
import json
import os

import pytest

from unclip_mini import artifacts, config, notebook, stages
from unclip_mini.errors import ArtifactError, ConfigError


@pytest.mark.parametrize("preset", config.PRESETS)
def test_every_component_resolves_for_every_preset(preset):
    cfg = stages.Config(preset=preset)
    for name in stages.COMPONENTS:
        part = getattr(cfg, name)
        assert part is not None, f"component {name} has no config for preset {preset}"
        assert dataclasses.is_dataclass(part)
    assert stages.Config.from_dict(cfg.to_dict()) == cfg, "configs round-trip through plain dicts"


def test_every_stage_has_its_functions():
    import importlib
    for s in stages.STAGES.values():
        module = importlib.import_module(f"unclip_mini.{s.module}")
        assert callable(getattr(module, s.train_fn)) and callable(getattr(module, s.load_fn)), s.name
        for dep in s.needs:
            assert dep in stages.STAGES


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


def test_a_stage_trained_with_another_config_is_refused(tmp_path):
    """A run folder's stage is loaded only by a run with the same config and seed (training steps aside)."""
    run = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    stages.load_or_train(run, "checker", verbose=False)
    longer = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    longer.cfg = longer.cfg.with_steps("checker", 99)
    stages.load_or_train(longer, "checker", verbose=False)  # steps may differ: a run can be extended
    other = stages.Run("smoke", run_dir=tmp_path, device="cpu")
    other.cfg = other.cfg.replace(checker=other.cfg.checker.replace(hidden=other.cfg.checker.hidden + 1))
    with pytest.raises(ArtifactError, match=r"checker\.hidden: .* -> .*another run folder"):
        stages.load_or_train(other, "checker", verbose=False)
    reseeded = stages.Run("smoke", run_dir=tmp_path, device="cpu", seed=1)
    with pytest.raises(ArtifactError, match=r"seed: 0 -> 1.*delete"):
        stages.load_or_train(reseeded, "checker", verbose=False)
