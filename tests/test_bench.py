"""The benchmarks: every one runs at smoke on fresh networks and writes JSON with the shared keys."""
import json

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
    for part in parts:
        assert {"params", "batch_size", "train_step_s", "sample_step_s"} <= set(part), (name, sorted(part))
        assert part["params"] > 0 and part["train_step_s"] > 0 and part["sample_step_s"] > 0


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
