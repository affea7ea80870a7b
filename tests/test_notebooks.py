"""The notebooks: committed with the outputs of one clean top-to-bottom run, and executable at `smoke`.

Each notebook is executed by nbval (lax mode: only cells marked `# NBVAL_CHECK_OUTPUT` are compared)
in a subprocess, at the `smoke` preset chosen through the environment variable its parameters cell
reads. They run in reading order and share one run folder, as in the course, so later notebooks load
what earlier ones trained.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from unclip_mini import course

NOTEBOOKS = course.notebooks()
IDS = [p.stem for p in NOTEBOOKS]


def test_there_is_a_notebook_per_stage():
    stems = [p.stem[:2] for p in NOTEBOOKS]
    assert stems == sorted(stems) and len(set(stems)) == len(stems), "numbers must be unique, in order"
    assert len(NOTEBOOKS) >= 7


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_notebook_was_run_top_to_bottom(path):
    """Outputs come from one run in order (execution counts 1..n), with no error outputs."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: execution counts {counts} are not 1..n"
    errors = [i for i, c in enumerate(code, 1) if any(o.output_type == "error" for o in c.outputs)]
    assert not errors, f"{path.name}: code cells {errors} have error outputs"
    assert sum(len(c.outputs) for c in code) > 0
    assert "widgets" not in nb.metadata and "papermill" not in nb.metadata, "strip widget/papermill metadata"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_shape(path):
    """Cell 1: imports + seed; cell 2: the `parameters` cell, plain literals only."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    first, params = code[0], code[1]
    assert "import" in first.source and "manual_seed" in first.source
    assert "parameters" in params.metadata.get("tags", [])
    for node in ast.parse(params.source).body:
        assert isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant), \
            f"{path.name}: parameters cell must assign plain literals, got {ast.unparse(node)}"
    names = {n.targets[0].id for n in ast.parse(params.source).body}
    assert {"preset", "device", "run_dir", "steps", "seed"} <= names
    assert "from unclip_mini import *" not in "".join(c.source for c in code)


@pytest.fixture(scope="module")
def smoke_run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke_run")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes_at_smoke(path, smoke_run_dir):
    env = {**os.environ, "UNCLIP_PRESET": "smoke", "UNCLIP_RUN_DIR": str(smoke_run_dir),
           "UNCLIP_PROGRESS": "off", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:python",
           "-p", "no:cacheprovider", "--nbval-cell-timeout=600", "-x", "-q", str(path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(path).parent.parent)
    assert res.returncode == 0, f"{path.name} failed at smoke:\n{res.stdout[-6000:]}\n{res.stderr[-2000:]}"
