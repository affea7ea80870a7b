"""The benchmarks: every one runs at smoke on fresh networks and writes JSON with the shared keys."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unclip_mini import bench, stages
from unclip_mini.errors import ConfigError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return stages.Run("smoke", run_dir=tmp_path_factory.mktemp("bench"), device="cpu")


def timed_parts(result: dict):
    """Every dict in a benchmark's result that times a network (it has a train or sample step)."""
    out = []
    for v in result.values():
        if isinstance(v, dict):
            if "train_step_s" in v or "sample_step_s" in v:
                out.append(v)
            out += timed_parts(v)
    if "train_step_s" in result:
        out.append(result)
    return out


@pytest.mark.parametrize("name", bench.BENCHMARKS)
def test_every_benchmark_writes_json_with_the_shared_keys(name, run):
    out = bench.run_benchmark(run, name)
    on_disk = json.loads((run.folder.root / "bench" / f"{name}.json").read_text())
    assert on_disk["benchmark"] == name and on_disk["preset"] == "smoke" and on_disk["wall_s"] > 0
    assert {"threads", "cpu_count", "torch", "load_average_1min"} <= set(on_disk["machine"])
    assert on_disk["result"] == json.loads(json.dumps(out["result"]))
    parts = timed_parts(out["result"])
    assert (name in ("data", "pipeline")) == (not parts), "every network benchmark times a step"
    assert on_disk["machine"]["matmul_flop_per_s"] > 1e8        # measured in the same run
    for part in parts:
        assert {"params", "batch_size", "train_step_s", "sample_step_s"} <= set(part), (name, sorted(part))
        assert part["params"] > 0 and part["train_step_s"] > 0 and part["sample_step_s"] > 0
        assert part["train_flops"] > 0 and 0 < part["train_vs_matmul"] < 5, (name, part)
        assert part["train_flop_per_s"] == pytest.approx(part["train_flops"] / part["train_step_s"])


def test_flops_of_a_training_step_are_counted():
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64)
    seconds, flops = bench.train_step_time(lin, lambda m: m(x).sum(), repeats=1)
    assert seconds > 0 and flops == 2 * (2 * 8 * 64 * 32)   # forward and the weight's gradient (x needs none)


def test_batch_size_option(run):
    out = bench.run_benchmark(run, "decoder", batch_size=2)["result"]
    assert out["ours"]["batch_size"] == 2
    with pytest.raises(ConfigError, match="batch_size = 0 must be a positive int"):
        bench.run_benchmark(run, "decoder", batch_size=0)


@pytest.mark.skipif(not Path(bench.PEER_PYTHON).exists(), reason="the peer's venv (dalle2-pytorch) is not installed")
def test_peer_prior_at_the_same_parameter_count(run):
    out = bench.bench_prior(run, peer=True, rounds=1)
    assert out["peer"]["name"] == "dalle2-pytorch DiffusionPrior" and out["peer"]["depth"] == out["ours"]["layers"]
    assert abs(out["peer"]["params"] / out["ours"]["params"] - 1) < 0.35   # the closest width of the peer's
    assert out["ratio_train"] > 0 and out["ratio_sample"] > 0


def test_gpu_figures_script_runs_on_the_cpu_at_smoke(tmp_path):
    """.ci/gpu_figures.sh, what a GPU session runs in one go, at smoke on the CPU (fewer benchmarks)."""
    env = {**os.environ, "DEVICE": "cpu", "SMALL": "smoke", "PAPER": "smoke", "PAPER_BATCH": "2", "TRAIN_STEPS": "2",
           "SMALL_BENCH": "decoder", "PAPER_BENCH": "prior", "NPROC": "1", "PYTHON": sys.executable,
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    script = Path(__file__).resolve().parent.parent / ".ci" / "gpu_figures.sh"
    proc = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "| smoke | decoder | ours |" in summary and "| smoke-batch2 | prior | ours |" in summary
    assert "train decoder --preset smoke, 2 steps on 1 process(es)" in summary


def test_no_trained_stage_is_needed(run):
    assert not any((run.folder.root / s / "stage.json").exists() for s in stages.STAGES)


def test_timer_and_flops():
    calls = []
    assert bench.timed(lambda: calls.append(1), repeats=3, warmup=2) >= 0 and len(calls) == 5
    lin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    assert bench.transformer_training_flops(lin, positions=10, batch_size=2, steps=3) == 6 * 64 * 10 * 2 * 3


def test_unknown_benchmark(run):
    with pytest.raises(ConfigError, match="unknown benchmark 'gpu'; valid: data, prior"):
        bench.main(run, ["gpu"])


def test_pipeline_benchmark_times_every_stage(run):
    out = bench.run_benchmark(run, "pipeline")["result"]
    for b in ("batch1", "batch16"):
        stage_sum = sum(v for k, v in out[b].items() if k != "s_per_image")
        assert 0 < stage_sum <= out[b]["s_per_image"] * 1.01
        assert {"prior_s_per_image", "decoder_s_per_image", "upsampler1_s_per_image", "upsampler2_s_per_image"} \
            <= set(out[b])
