"""Training on 2 processes (torchrun, gloo, CPU) is training on one: every stage, at smoke.

One 2-process job and one 1-process job train every stage through the CLI (`train STAGE --steps 4`) in two run
folders, plus a CLIP with hard negatives (tests/dist_worker.py). The 1-process job goes on from its own CLIP to a
copy of the 2-process job's, so every later stage is compared on the same inputs. Then:

- after training, the two ranks hold identical weights (gradients were averaged), and they equal the
  1-process run's on the same global batches, to float tolerance (the random draws of a step do not depend
  on how the batch is split; distributed.py);
- rank 1 wrote no file: records, the CLIP export and embeddings cache, the PCA file, checkpoints are rank 0's;
- a 2-process run of a decoder with dropout (one random stream per rank), SIGKILLed after a checkpoint and
  resumed, ends with the weights of the same run left alone.

About a minute on 2 CPU cores (most of it starting 5 jobs of 2-3 Python processes).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("dist_worker.py")
sys.path.insert(0, str(WORKER.parent))
from dist_worker import DROPOUT_CKPT, DROPOUT_STEPS, GRAD_STEPS, STAGES, STEPS  # noqa: E402


def command(world: int, *args):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] \
        if world > 1 else [sys.executable]
    return launch + [str(WORKER), *map(str, args)]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "UNCLIP_PROGRESS": "off"}


def run_job(world: int, *args, timeout=300):
    proc = subprocess.run(command(world, *args), capture_output=True, text=True, env=env(), timeout=timeout)
    assert proc.returncode == 0, f"{world}-process job {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    t0 = time.perf_counter()
    run_job(2, "stages", root / "run2", root / "out2")
    # the 1-process job trains its own CLIP (compared below), then goes on with the 2-process job's, so that each
    # later stage is compared on the same inputs: embeddings that differ in the 7th digit move the AR prior's
    # bucket edges and flip a few of its target codes (2 of 2,560 in one run), a difference of data, not of training
    run_job(1, "stages", root / "run1", root / "out1", "--clip-from", root / "run2")
    print(f"2-process and 1-process jobs: {time.perf_counter() - t0:.1f} s")
    return root


def update_error(a: dict, b: dict, init: dict, live: dict | None = None) -> float:
    """|a - b| / |b - init| over every float tensor: how far run a's training moved from run b's, per unit of b's.
    `live` (name -> bool mask) keeps only the elements that received a real gradient."""
    keys = [k for k in b if b[k].is_floating_point()]
    m = lambda k, x: x[live[k]] if live is not None and k in live else x
    diff = sum(float((m(k, a[k] - b[k]).double() ** 2).sum()) for k in keys) ** 0.5
    return diff / sum(float((m(k, b[k] - init[k]).double() ** 2).sum()) for k in keys) ** 0.5


def worst(a: dict, b: dict, live: dict, n: int = 3) -> list:
    """The `n` tensors with the largest |a - b| over live elements (for failure messages)."""
    d = {k: float((a[k] - b[k])[live[k]].abs().max()) if k in live and live[k].any() else 0.0
         for k in b if b[k].is_floating_point()}
    return sorted(d.items(), key=lambda kv: -kv[1])[:n]


def live_elements(one: list[dict], two: list[dict]) -> dict:
    """Elements whose gradient the two runs agree on (within 10%) at every recorded step. Adam divides a gradient
    by its own running size, so at the first steps an element whose gradient is nearly zero in exact arithmetic
    (a code embedding row no batch used, a bias before a norm) moves by up to the learning rate in the direction
    its float rounding happens to take; such elements cannot agree between two runs and are left out."""
    out = {}
    for g1, g2 in zip(one, two):
        for k, v in g1.items():
            ok = (g2[k] - v).abs() <= 0.1 * v.abs()
            out[k] = out.get(k, torch.ones_like(v, dtype=torch.bool)) & ok
    return out


@pytest.mark.parametrize("stage", STAGES + ("clip-hardneg",))
def test_ranks_agree_and_equal_one_process(jobs, stage):
    two, one = jobs / "out2", jobs / "out1"
    rank0, rank1, single = (load(p / f"{stage}.rank{r}.pt") for p, r in ((two, 0), (two, 1), (one, 0)))
    assert rank0.keys() == rank1.keys() == single.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"{stage}: {k} differs between the two ranks"
    init = load(one / f"{stage}.init.rank0.pt")
    assert all(torch.equal(init[k], v) for k, v in load(two / f"{stage}.init.rank0.pt").items())
    # the averaged gradients of the first steps are the single process's, to float rounding (step 2's see the
    # rounding of step 1's update too)
    for step in range(1, GRAD_STEPS + 1):
        g2, g1 = load(two / f"{stage}.grad{step}.rank0.pt"), load(one / f"{stage}.grad{step}.rank0.pt")
        assert g2.keys() == g1.keys()
        scale = max(float(g.abs().max()) for g in g1.values())
        for k in g1:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-3, atol=2e-4 * scale,
                                       msg=lambda m: f"{stage}: gradient of {k} at step {step}, 2 processes vs 1: {m}")
    # after STEPS steps the weights agree up to what Adam makes of rounding: parameters whose gradient is zero
    # in exact arithmetic (a bias before a norm, attention key biases) move by noise-driven steps of up to lr
    live = live_elements([load(one / f"{stage}.grad{s}.rank0.pt") for s in range(1, GRAD_STEPS + 1)],
                         [load(two / f"{stage}.grad{s}.rank0.pt") for s in range(1, GRAD_STEPS + 1)])
    assert sum(int(m.sum()) for m in live.values()) > 0.5 * sum(m.numel() for m in live.values()), \
        f"{stage}: the two runs' gradients disagree on most elements"
    # (the strict check is the gradients' above; 4 Adam steps amplify their rounding to a few % of the update)
    assert update_error(rank0, single, init, live) < 5e-2, \
        f"{stage}: 2 processes trained other weights than 1; most different: {worst(rank0, single, live)}"
    own = "clip.own" if stage == "clip" else stage  # the 1-process job's own CLIP (it went on with a copy)
    a, b = load(jobs / "run2" / stage / "checkpoint.pt"), load(jobs / "run1" / own / "checkpoint.pt")
    assert a["step"] == b["step"] == STEPS
    assert update_error(a["ema"], b["ema"], init, live) < 5e-2, f"{stage}: the EMA weights differ"
    assert a["history"]["loss"] == pytest.approx(b["history"]["loss"], rel=1e-3)   # the global batch's loss (last step)


def test_rank0_alone_writes(jobs):
    writes = {r: json.loads((jobs / "out2" / f"writes.rank{r}.json").read_text())
              if (jobs / "out2" / f"writes.rank{r}.json").exists() else [] for r in (0, 1)}
    in_run = lambda paths: [p for p in paths if str(jobs / "run2") in p]
    assert in_run(writes[1]) == [], f"rank 1 wrote {in_run(writes[1])[:5]}"
    names = {Path(p).relative_to(jobs / "run2").as_posix() for p in in_run(writes[0])}
    for stage in STAGES:
        assert {f"{stage}/stage.json", f"{stage}/checkpoint.pt"} <= names, stage
    assert {"clip/embeddings.pt", "clip/open_clip/open_clip_pytorch_model.bin", "ar_prior/pca.pt"} <= names


def _kill_after_checkpoint(run_dir, out, at_step):
    proc = subprocess.Popen(command(2, "dropout", run_dir, out, "--slow"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env(), start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.strip().endswith(f"checkpoint decoder-dropout {at_step}"):
                time.sleep(random.uniform(0, 0.25))  # anywhere inside the next step
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, f"the job was not killed mid-run:\n{''.join(seen)[-2000:]}"


def test_killed_and_resumed_equals_uninterrupted(jobs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(jobs / "run2" / "clip", run_dir / "clip")  # the decoder needs the CLIP
    kill_at = random.choice(range(DROPOUT_CKPT, DROPOUT_STEPS - DROPOUT_CKPT + 1, DROPOUT_CKPT))
    _kill_after_checkpoint(run_dir, tmp_path / "out", kill_at)
    partial = load(run_dir / "decoder-dropout" / "checkpoint.pt")
    assert kill_at <= partial["step"] < DROPOUT_STEPS, "killed after the run had finished"
    assert not (run_dir / "decoder-dropout" / "stage.json").exists()
    run_job(2, "dropout", run_dir, tmp_path / "out")  # resumes
    resumed = load(run_dir / "decoder-dropout" / "checkpoint.pt")
    whole = load(jobs / "run2" / "decoder-dropout" / "checkpoint.pt")
    assert resumed["step"] == whole["step"] == DROPOUT_STEPS
    for part in ("model", "ema"):
        for k in whole[part]:
            assert torch.equal(resumed[part][k], whole[part][k]), \
                f"{part}.{k} differs after a kill at step {kill_at} and a resume"
    assert resumed["history"]["loss"] == whole["history"]["loss"]
    assert len(partial["rng_ranks"]) == 2  # each rank's random states were in the checkpoint
    rank0, rank1 = (load(tmp_path / "out" / f"decoder-dropout.rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the resumed ranks disagree"
