"""The command line, run as a user runs it (`python -m unclip_mini ...` in a subprocess)."""
import os
import subprocess
import sys

import pytest
from PIL import Image

from unclip_mini import stages

ENV = {**os.environ, "UNCLIP_PROGRESS": "off", "OMP_NUM_THREADS": "1"}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "unclip_mini", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_run")
    run = stages.Run("smoke", run_dir=root, device="cpu")
    for name in ("clip", "diffusion_prior", "ar_prior", "decoder", "upsampler1", "upsampler2"):
        stages.load_or_train(run, name, verbose=False)
    return root


def test_generate_writes_a_png_grid(trained, tmp_path):
    out = tmp_path / "grid.png"
    res = cli("generate", "a red circle", "a blue star left of a green square", "-n", "2", "--preset", "smoke",
              "--run-dir", str(trained), "--size", "64", "--prior", "ar", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}: 4 images of 64 px" in res.stdout
    with Image.open(out) as im:
        w, h = im.size
        im.load()
    assert w >= 2 * 96 and h > 2 * 96      # two columns, two rows of images with their captions under them
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


def test_generate_takes_a_separate_caption_guidance(trained, tmp_path):
    out = tmp_path / "grid.png"
    res = cli("generate", "a red circle", "-n", "1", "--preset", "smoke", "--run-dir", str(trained), "--size", "16",
              "--guidance", "3", "--text-guidance", "5", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}: 1 image of 16 px" in res.stdout


def test_generate_warns_on_a_caption_outside_the_world(trained, tmp_path):
    res = cli("generate", "a photo of a dog", "-n", "1", "--preset", "smoke", "--run-dir", str(trained),
              "--size", "16", "--out", str(tmp_path / "dog.png"))
    assert res.returncode == 0, res.stderr
    assert "warning: caption 'a photo of a dog' names no colour or shape" in res.stderr
    assert "shapes circle, square" in res.stderr


@pytest.mark.parametrize("args,message", [
    (["generate", "a red circle", "--run-dir", "{missing}"], "no trained unCLIP in"),
    (["generate", "", "--run-dir", "{run}"], "empty caption ''"),
    (["generate", "a red circle " * 10, "--run-dir", "{run}"], "has 32 tokens but the text encoder reads at most 24"),
    (["generate", "a red circle", "--run-dir", "{run}", "--prior", "gan"], "unknown prior 'gan'"),
    (["generate", "a red circle", "--run-dir", "{run}", "--size", "100"], "this stack makes 16, 64, 256 px"),
    (["generate", "a red circle", "--run-dir", "{run}", "-n", "0"], "ask for at least 1 image per caption"),
    (["generate", "a red circle", "--run-dir", "{run}", "--out", "{tmp}/nowhere/x.png"], "does not exist"),
    (["generate", "a red circle", "--run-dir", "{run}", "--out", "{tmp}/x.jpg"], "must be a .png file"),
    (["generate", "a red circle", "--run-dir", "{run}", "--preset", "tiny"], "unknown preset 'tiny'"),
    (["generate", "a red circle", "--run-dir", "{run}", "--text-guidance", "-1"], "the caption's scale must be >= 0"),
])
def test_generate_refuses_bad_input_and_writes_nothing(args, message, trained, tmp_path):
    fill = {"missing": str(tmp_path / "no_run"), "run": str(trained), "tmp": str(tmp_path)}
    args = [a.format(**fill) for a in args]
    if "--preset" not in args:
        args += ["--preset", "smoke"]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "samples.png")]
    before = sorted(p.name for p in trained.iterdir())
    res = cli(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.startswith("error: ") and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == [], "a refused command wrote a file"
    assert sorted(p.name for p in trained.iterdir()) == before


def test_stages_lists_every_stage():
    res = cli("stages")
    assert res.returncode == 0
    for name in stages.STAGES:
        assert name in res.stdout


def test_sweep_refuses_a_parameter_the_notebook_lacks(tmp_path):
    res = cli("sweep", "08", "--param", "prior_candidates", "1", "2", "--set", "n_evl", "192",
              "--preset", "smoke", "--out", str(tmp_path / "run"))
    assert res.returncode != 0
    assert "08_text_to_image.ipynb has no parameter 'n_evl' to set; its parameters: preset," in res.stderr
    assert "n_eval" in res.stderr and not (tmp_path / "run" / "sweeps").exists()
