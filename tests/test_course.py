"""The course runner: order, failure report (notebook, cell, error, partial output), summary."""
import json

import nbformat
import pytest

from unclip_mini import course
from unclip_mini.errors import ConfigError


def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_course_runs_in_order_and_summarises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)       # the run folder is given relative to here, as on a command line
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    save = ("import os\nfrom unclip_mini import notebook as nb\n"
            "run = nb.setup()\nnb.save_metrics(run, '{name}', {{'answer': 42.0}}, notes={{'answer': 'a figure'}})")
    _notebook(nbdir / "01_first.ipynb", "x = 1", save.format(name="01_first"))
    _notebook(nbdir / "02_second.ipynb", save.format(name="02_second"))
    out = tmp_path / "run"
    assert course.run_course("smoke", "run", notebook_dir=nbdir) == 0
    assert not (nbdir / "run").exists(), "nothing may land in a run folder under the notebooks' working directory"
    summary = (out / "summary.md").read_text()
    assert "| answer | 42.0 | a figure |" in summary and "02_second" in summary
    assert "bf16 unit: " in summary      # which bf16 kernels the run's figures come from (README, Reliability)
    assert json.loads((out / "metrics" / "course.json").read_text())["machine"]["cpu"]
    assert (out / "notebooks" / "01_first.ipynb").exists()
    rec = json.loads((out / "metrics" / "01_first.json").read_text())
    assert rec["preset"] == "smoke" and rec["metrics"] == {"answer": 42.0}

    # a partial re-run (--only 02) keeps 01's time from the first run, marked, and totals both
    first = json.loads((out / "metrics" / "course.json").read_text())["seconds"]
    assert course.run_course("smoke", out, only=["02"], notebook_dir=nbdir) == 0
    again = json.loads((out / "metrics" / "course.json").read_text())
    assert again["kept_from_previous_run"] == ["01_first"] and again["seconds"]["01_first"] == first["01_first"]
    assert again["seconds"]["total"] == round(again["seconds"]["01_first"] + again["seconds"]["02_second"], 1)
    assert f"| 01_first | {first['01_first']} (previous run) |" in (out / "summary.md").read_text()


def test_course_stops_at_first_failure_and_names_it(tmp_path, capsys):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _notebook(nbdir / "01_ok.ipynb", "x = 1")
    _notebook(nbdir / "02_bad.ipynb", "y = 2", "raise ValueError('boom')", "z = 3")
    _notebook(nbdir / "03_never.ipynb", "w = 4")
    out = tmp_path / "run"
    assert course.run_course("smoke", out, notebook_dir=nbdir) == 1
    said = capsys.readouterr().out
    assert "FAILED: 02_bad.ipynb, cell 2 of 3" in said and "ValueError: boom" in said
    assert (out / "notebooks" / "02_bad.ipynb").exists(), "the partial output notebook is kept"
    assert not (out / "notebooks" / "03_never.ipynb").exists()
    assert "**FAILED** in `02_bad.ipynb`" in (out / "summary.md").read_text()


def test_course_rejects_unknown_preset_and_notebook(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'; valid presets: smoke, toy, small, paper"):
        course.run_course("huge", tmp_path)
    with pytest.raises(ConfigError, match="no notebook matches"):
        course.notebooks(["99"])


def test_live_output_shows_stage_messages_and_throttled_bars():
    import io
    buf = io.StringIO()
    live = course.LiveOutput(buf, every=10.0)
    live.write("some cell output\n[decoder] not trained yet: training it now\n")
    live.write("decoder:   1%|1 | 10/6000 [00:03<30:00,  3.3it/s]\rdecoder:   2%|2 | 20/6000 [00:06<30:00,  3.3it/s]")
    live.write("decoder: 100%|##########| 6000/6000 [30:00<00:00,  3.3it/s]\n")
    shown = buf.getvalue().splitlines()
    assert shown[0].strip() == "[decoder] not trained yet: training it now"
    assert [s.strip()[:13] for s in shown[1:]] == ["decoder:   1%", "decoder: 100%"]   # the 2% line came too soon
    assert "some cell output" not in buf.getvalue()


def test_sweep_runs_a_notebook_per_value_and_gathers_one_table(tmp_path, monkeypatch):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("scale = 1.0\noffset = 0\ntag = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "from unclip_mini import notebook as nb\nrun = nb.setup(tag=tag)\n"
        "nb.save_metrics(run, '05_swept', {'double': 2 * scale + offset, 'scale': scale})")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nbdir / "05_swept.ipynb")
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)       # a relative run folder, as on a command line (papermill changes directory)
    table = course.sweep("05", "scale", [1.0, 3.0], "smoke", "run", notebook_dir=nbdir, live=False)
    assert not (nbdir / "run").exists(), "nothing may land in a run folder under the notebooks' working directory"
    assert sorted(p.name for p in (out / "sweeps" / "05_swept").iterdir()) == ["scale=1.0.ipynb", "scale=3.0.ipynb"]
    assert (out / "metrics" / "05_swept@scale=3.0.json").exists() and not (out / "metrics" / "05_swept.json").exists()
    text = table.read_text()
    assert "| figure | scale=1.0 | scale=3.0 |" in text and "| double | 2 | 6 |" in text
    gathered = json.loads((out / "sweeps" / "05_swept.json").read_text())
    assert gathered["runs"]["scale=3.0"] == {"double": 6.0, "scale": 3.0}
    with pytest.raises(ConfigError, match="has no parameter 'guidance' to set; its parameters: scale, offset$"):
        course.sweep("05", "guidance", [1], "smoke", out, notebook_dir=nbdir)
    # other parameters held fixed are set in every run and named in its tag
    course.sweep("05", "scale", [1.0], "smoke", "run", notebook_dir=nbdir, live=False, fixed={"offset": 10})
    held = json.loads((out / "metrics" / "05_swept@scale=1.0,offset=10.json").read_text())["metrics"]
    assert held == {"double": 12.0, "scale": 1.0}
    with pytest.raises(ConfigError, match="'scale' is the swept parameter"):
        course.sweep("05", "scale", [1.0], "smoke", out, notebook_dir=nbdir, fixed={"scale": 2.0})
    with pytest.raises(ConfigError, match="has no parameter 'tag' to set"):
        course.sweep("05", "scale", [1.0], "smoke", out, notebook_dir=nbdir, fixed={"tag": "x"})
    with pytest.raises(ConfigError, match="no tagged runs of '07_x'"):
        course.gather(out, "07_x")


def test_report_has_every_section_and_embeds_every_image(tmp_path):
    import base64
    import io
    import re

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from unclip_mini import report
    (tmp_path / "metrics").mkdir()
    (tmp_path / "figures").mkdir()
    for name in ("08_gallery", "02_similarity"):
        fig, ax = plt.subplots(figsize=(1, 1))
        ax.plot([0, 1])
        fig.savefig(tmp_path / "figures" / f"{name}.png")
        plt.close(fig)
    (tmp_path / "metrics" / "02_clip.json").write_text(json.dumps(
        {"preset": "smoke", "device": "cpu", "metrics": {"zero_shot": 0.97}, "notes": {"zero_shot": "accuracy"}}))
    (tmp_path / "metrics" / "course.json").write_text(json.dumps(
        {"preset": "smoke", "seconds": {"02_clip": 12.0, "total": 12.0}, "machine": {"cpu_count": 2}}))
    (tmp_path / "claims.json").write_text(json.dumps({"claims": [
        {"claim": "PCA", "paper": "319 of 1,024", "ours": "14 of 64", "verdict": "yes", "why": ""}]}))
    page = report.write_report(tmp_path).read_text()
    for section in report.SECTIONS:
        assert f">{section}<" in page.replace("&#39;", "'"), section
    assert "| zero_shot |" not in page and "<td>zero_shot</td>" in page and "319 of 1,024" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    assert not re.findall(r'(?:src|href)="https?://', page), "the report must load nothing from the network"


def test_background_trains_each_stage_once_its_needs_exist(tmp_path, monkeypatch):
    """`course` trains `AHEAD` in a background process: the GLIDE-style baseline needs no CLIP, so it trains at once
    (beside the CLIP, in a course); a prior waits until the CLIP exists, then trains."""
    import time

    from unclip_mini import stages
    assert course.AHEAD[0] == "glide" and set(course.AHEAD) <= set(stages.STAGES) | set(stages.VARIANTS)
    (tmp_path / "nbs").mkdir()
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    # a relative run folder, and the working directory changed while the trainer runs (papermill runs each notebook
    # inside the notebook folder that way): its stages must still land in the folder it was given
    background = course.AheadTrainer("smoke", "run", stages=("glide", "diffusion_prior"))
    monkeypatch.chdir(tmp_path / "nbs")
    run_dir = tmp_path / "run"
    run = stages.Run("smoke", run_dir=run_dir, device="cpu")
    background.start()
    try:
        deadline = time.monotonic() + 300
        while "glide" not in background.done and time.monotonic() < deadline:
            assert not background.failed, (run_dir / "ahead.log").read_text()
            time.sleep(0.5)
        assert "glide" in background.done, "the baseline must train without a CLIP"
        time.sleep(3)                                   # longer than the trainer's 2 s wait for a stage's needs
        assert background.is_alive() and not (run_dir / "diffusion_prior").exists(), "no CLIP yet: the prior waits"
        stages.load_or_train(run, "clip", verbose=False)
        background.join(timeout=300)
        assert not background.is_alive() and not background.failed, (run_dir / "ahead.log").read_text()
        assert list(background.done) == ["glide", "diffusion_prior"]
        assert not (tmp_path / "nbs" / "run").exists(), "trained into the folder of the working directory"
        record = stages.read_record(run, "diffusion_prior")
        assert record["requires"] == {"clip": stages.read_record(run, "clip")["id"]}
    finally:
        background.stop()
