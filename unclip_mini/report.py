"""The course report: one self-contained HTML page gathering what a run measured (`<run>/report.html`).

    the paper's claims, one table (written by notebook 10 as `<run>/claims.json`)
    a gallery of text -> image samples at the largest size (notebook 08)
    each notebook's key figure and every number it measured (`<run>/metrics/NN_*.json`, `<run>/figures/`)
    the time each notebook took, and the machine it ran on (`<run>/metrics/course.json`)

The page is a notebook built from those files and converted by nbconvert's HTML exporter: figures are embedded
as base64 PNGs and the page loads nothing from the network (the exporter's MathJax and require.js script tags,
which it would fetch from a CDN, are removed; the report has no math and no widgets). `course` rewrites it at the
end of every run, also of `--only` runs, so it always shows what the folder holds now.
"""
from __future__ import annotations

import base64
import html
import json
import re
import time
from pathlib import Path

from .artifacts import atomic_write_text

KEY_FIGURES = {  # the figure that stands for each notebook in the report
    "01_data": "01_samples", "02_clip": "02_similarity", "03_gaussian_diffusion": "03_reverse_process",
    "04_diffusion_prior": "04_nearest", "05_ar_prior": "05_ar_vs_diffusion", "06_decoder": "06_reconstructions",
    "07_upsamplers": "07_upsampler2_zoom", "08_text_to_image": "08_accuracy", "09_manipulations": "09_text_diffs",
    "10_claims": "10_guidance_tradeoff",
}
SECTIONS = ("The paper's claims", "Gallery", "The notebooks", "Time and machine")


def _image(path: Path) -> dict:
    """A display_data output holding the PNG at `path`."""
    import nbformat
    data = base64.b64encode(path.read_bytes()).decode()
    return nbformat.v4.new_output("display_data", data={"image/png": data, "text/plain": path.name})


def _md_table(header, rows) -> str:
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows])


def build_report_notebook(run_dir):
    """The report as a notebook (markdown cells, and code cells holding only image outputs)."""
    import nbformat
    out = Path(run_dir)
    figures, metrics = out / "figures", out / "metrics"
    course = json.loads((metrics / "course.json").read_text()) if (metrics / "course.json").exists() else {}
    machine = course.get("machine", {})
    md = nbformat.v4.new_markdown_cell
    cells = [md(f"# unclip_mini: course report ({course.get('preset', '?')} preset)\n\n"
                f"Run folder `{out.name}`, written {time.strftime('%Y-%m-%d %H:%M')}. Every number and figure below "
                f"was measured by the notebooks of this run; each section says which.\n\n"
                + "\n".join(f"- [{s}](#{s.replace(' ', '-')})" for s in SECTIONS))]  # nbconvert's heading ids

    cells.append(md("## The paper's claims\n"))
    claims = out / "claims.json"
    if claims.exists():
        rows = json.loads(claims.read_text())["claims"]
        cells.append(md(_md_table(["#", "claim", "the paper", "this run", "reproduced", "why, where not"],
                                  [[i + 1, r["claim"], r["paper"], r["ours"], r["verdict"], r["why"]]
                                   for i, r in enumerate(rows)])))
    else:
        cells.append(md("*Notebook 10 has not run in this folder yet: no claims table.*"))

    cells.append(md("## Gallery\n\nText -> image samples for held-out captions (colour–shape pairs never seen in "
                    "training), several per caption, at the largest size the run makes (notebook 08)."))
    gallery = figures / "08_gallery.png"
    if gallery.exists():
        code = nbformat.v4.new_code_cell("")
        code.outputs = [_image(gallery)]
        cells.append(code)
    else:
        cells.append(md("*Notebook 08 has not run in this folder yet: no gallery.*"))

    cells.append(md("## The notebooks\n\nEach notebook's key figure, then every number it recorded with what it "
                    "means."))
    for f in sorted(p for p in metrics.glob("[0-9][0-9]_*.json") if "@" not in p.stem):
        rec = json.loads(f.read_text())
        notes = rec.get("notes", {})
        cells.append(md(f"### {f.stem}\n\nMeasured on {rec.get('device', '?')} ({rec.get('torch_threads', '?')} torch "
                        f"threads), preset {rec.get('preset')}, code {rec.get('code_version')}, {rec.get('created')}."))
        fig = figures / f"{KEY_FIGURES.get(f.stem, '')}.png"
        if fig.exists():
            code = nbformat.v4.new_code_cell("")
            code.outputs = [_image(fig)]
            cells.append(code)
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else v
        cells.append(md(_md_table(["figure", "value", "what"],
                                  [[k, fmt(v), notes.get(k, "")] for k, v in rec["metrics"].items()])))

    cells.append(md("## Time and machine\n"))
    secs = course.get("seconds", {})
    if secs:
        kept = set(course.get("kept_from_previous_run", []))
        rows = [[k, f"{v:.0f}" + (" (previous run)" if k in kept else "")] for k, v in secs.items()]
        text = _md_table(["notebook", "wall time (s)"], rows)
        if course.get("wall_seconds"):
            text += f"\n\nWall time of the last course run: {course['wall_seconds'] / 60:.1f} min."
        ahead = course.get("trained_ahead") or {}
        if ahead.get("stages"):
            text += ("\n\nTrained in a background process meanwhile (s): "
                     + ", ".join(f"{k} {v:.0f}" for k, v in ahead["stages"].items()) + ".")
        cells.append(md(text))
    cells.append(md(_md_table(["machine", ""], [[k, v] for k, v in machine.items()]) if machine else
                    "*No course record in this folder.*"))
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["title"] = f"unclip_mini course report ({course.get('preset', '?')})"
    return nb


def write_report(run_dir) -> Path:
    """Write `<run>/report.html` (atomically) from the run folder's metrics, figures and claims."""
    from nbconvert import HTMLExporter
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(build_report_notebook(run_dir))
    # self-contained: drop the script tags that would fetch MathJax and require.js from a CDN
    body = re.sub(r'<script[^>]*src="https?://[^"]*"[^>]*>\s*</script>', "", body)
    body = re.sub(r"<title>.*?</title>", f"<title>{html.escape('unclip_mini course report')}</title>", body, count=1)
    return atomic_write_text(body, Path(run_dir) / "report.html")
