"""The notebooks: committed with the outputs of one clean top-to-bottom run, and executable at `smoke`.

Each notebook is executed by nbval (lax mode: only cells marked `# NBVAL_CHECK_OUTPUT` are compared)
in a subprocess, at the `smoke` preset chosen through the environment variable its parameters cell
reads. They run in reading order and share one run folder, as in the course, so later notebooks load
what earlier ones trained.

Output hygiene: a committed notebook stays under 1 MB, stores a progress bar as a few lines (not hundreds of
stream chunks), holds no stray object reprs (`<torch._C.Generator at 0x...>`) and no absolute paths of the
machine that ran it, and neither it nor the library refers to documents outside the repository.
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from unclip_mini import course
from unclip_mini.stages import REPO_ROOT, display_path

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


# ---------------------------------------------------------------------------------------------
# output hygiene
# ---------------------------------------------------------------------------------------------

MAX_BYTES = 1_000_000          # a committed notebook, outputs included
MAX_BAR_FRAMES = 40            # progress-bar states stored by one cell (a stored text bar prints about a dozen)
MAX_STREAM_OUTPUTS = 100       # stream outputs of one cell
OUTSIDE_DOCS = re.compile(r"DESIGN\.md|\bthe brief\b|\bthe issue\b|\bdesign notes\b|\(issue\)|\bissue's\b", re.I)
STRAY_REPR = re.compile(r"<[\w.]+(?: object)? at 0x[0-9a-fA-F]+>")
ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])(?:/(?:home|Users|root|tmp|private|var/folders|work|mnt|scratch|opt)/\S*"
                           r"|[A-Za-z]:\\\S+)")
BAR_FRAME = re.compile(r"\d+/\d+ \[")   # a tqdm state: "120/2000 [00:41<..."

# notebooks whose committed outputs predate the hygiene fixes of their sources (progress bars, reprs, paths, figure
# sizes): their outputs pass once the notebooks are re-executed (`python -m unclip_mini course --publish`); then
# empty this set
AWAITING_RERUN: set[str] = set()   # notebooks whose committed outputs predate a hygiene rule (none now)


def _output_texts(out):
    if out.output_type == "stream":
        return [out.text]
    if out.output_type == "error":
        return ["\n".join(out.get("traceback", []))]
    data = out.get("data", {})
    return [data[k] for k in ("text/plain", "text/html", "text/markdown") if k in data]


def source_problems(nb) -> list[str]:
    """What the cells' sources must not hold: references to documents outside the repository."""
    found = []
    for i, cell in enumerate(nb.cells):
        m = OUTSIDE_DOCS.search(cell.source)
        if m:
            found.append(f"cell {i} ({cell.cell_type}) refers to a document outside the repository: {m.group()!r}")
    return found


def output_problems(nb, size_bytes: int) -> list[str]:
    """What the stored outputs must not hold (size, progress chunks, stray reprs, absolute paths, outside documents)."""
    found = []
    if size_bytes > MAX_BYTES:
        found.append(f"{size_bytes / 1e6:.2f} MB > {MAX_BYTES / 1e6:.0f} MB: lower the dpi or the panel count of its figures")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        streams = [o for o in cell.outputs if o.output_type == "stream"]
        frames = sum(len(BAR_FRAME.findall(o.text)) for o in streams)
        if frames > MAX_BAR_FRAMES or len(streams) > MAX_STREAM_OUTPUTS:
            found.append(f"cell {i} stores {len(streams)} stream outputs holding {frames} progress-bar states: keep the "
                         f"final state (UNCLIP_PROGRESS=text prints a stored bar a dozen times)")
        for text in (t for o in cell.outputs for t in _output_texts(o)):
            for pattern, what in ((STRAY_REPR, "a stray object repr (end the line with ';')"),
                                  (ABSOLUTE_PATH, "an absolute path of the machine that ran it"),
                                  (OUTSIDE_DOCS, "a reference to a document outside the repository")):
                m = pattern.search(text)
                if m:
                    found.append(f"cell {i} output holds {what}: {m.group()[:80]!r}")
    return found


def _notebook(cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    return nb


def test_hygiene_checks_catch_each_problem():
    clean = _notebook([nbformat.v4.new_markdown_cell("# A notebook\nThe paper's Figure 7, the README's table."),
                       nbformat.v4.new_code_cell("torch.manual_seed(0);", outputs=[
                           nbformat.v4.new_output("stream", text="preset toy | run folder runs/toy\n"),
                           nbformat.v4.new_output("display_data", data={"text/plain": "<Figure size 640x480 with 1 Axes>"}),
                           nbformat.v4.new_output("stream", text="clip: 100%|#####| 2000/2000 [11:17<00:00, loss=0.28]\n")])])
    assert source_problems(clean) == [] and output_problems(clean, 1000) == []
    bad_source = _notebook([nbformat.v4.new_markdown_cell("As DESIGN.md says"),
                            nbformat.v4.new_markdown_cell("the design notes measured it")])
    assert len(source_problems(bad_source)) == 2
    frames = [nbformat.v4.new_output("stream", text=f"\rclip: {i}%| | {i * 20}/2000 [00:01<00:10]") for i in range(100)]
    cases = {
        "MB": (clean, MAX_BYTES + 1),
        "progress": (_notebook([nbformat.v4.new_code_cell("train()", outputs=frames)]), 1000),
        "repr": (_notebook([nbformat.v4.new_code_cell("torch.manual_seed(0)", outputs=[nbformat.v4.new_output(
            "execute_result", data={"text/plain": "<torch._C.Generator at 0x7fa4c83b6170>"}, execution_count=1)])]), 1000),
        "absolute path": (_notebook([nbformat.v4.new_code_cell("run", outputs=[nbformat.v4.new_output(
            "stream", text="[clip] loaded from /work/main/runs/toy/clip (id clip-1)\n")])]), 1000),
        "outside the repository": (_notebook([nbformat.v4.new_code_cell("goal", outputs=[nbformat.v4.new_output(
            "stream", text="goal (issue): cos >= 0.85\n")])]), 1000),
    }
    for what, (nb, size) in cases.items():
        problems = output_problems(nb, size)
        assert len(problems) == 1 and (what in problems[0] or what == "progress" and "progress-bar" in problems[0]), \
            (what, problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_notebook_sources_refer_only_to_the_repository(path):
    problems = source_problems(nbformat.read(path, as_version=4))
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.xfail(
    p.stem in AWAITING_RERUN, strict=False, reason="committed outputs predate the hygiene fixes: re-execute the notebook"))
    for p in NOTEBOOKS], ids=IDS)
def test_committed_notebook_output_hygiene(path):
    problems = output_problems(nbformat.read(path, as_version=4), path.stat().st_size)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_library_docstrings_refer_only_to_the_repository():
    found = [f"{p.name}:{n}: {line.strip()}" for p in sorted((REPO_ROOT / "unclip_mini").glob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE_DOCS.search(line)]
    assert not found, "\n".join(found)


def test_messages_show_run_folders_relative_to_the_repository(tmp_path):
    assert display_path(REPO_ROOT / "runs" / "toy" / "clip") == str(Path("runs") / "toy" / "clip")
    assert display_path(tmp_path) == str(tmp_path)          # outside the repository: as given
