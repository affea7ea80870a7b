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


def test_course_runs_in_order_and_summarises(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    save = ("import os\nfrom unclip_mini import notebook as nb\n"
            "run = nb.setup()\nnb.save_metrics(run, '{name}', {{'answer': 42.0}}, notes={{'answer': 'a figure'}})")
    _notebook(nbdir / "01_first.ipynb", "x = 1", save.format(name="01_first"))
    _notebook(nbdir / "02_second.ipynb", save.format(name="02_second"))
    out = tmp_path / "run"
    assert course.run_course("smoke", out, notebook_dir=nbdir) == 0
    summary = (out / "summary.md").read_text()
    assert "| answer | 42.0 | a figure |" in summary and "02_second" in summary
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
