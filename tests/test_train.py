"""The shared training loop: exact resume after SIGKILL, atomic checkpoints, NaN stops, EMA."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from unclip_mini import train
from unclip_mini.errors import CheckpointError, ConfigError, DeviceError, TrainingDiverged

# A tiny training job that exercises every random state the loop must restore: model dropout (torch
# global RNG), the loop's generator (noise), numpy and python RNGs, and the data order.
WORKER = textwrap.dedent("""
    import random, sys, time
    import numpy as np
    import torch
    from unclip_mini import train
    torch.set_num_threads(1)
    ckpt, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.2), torch.nn.GELU(),
                                torch.nn.Linear(32, 8))
    data = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))

    def loss_fn(model, x, g):
        time.sleep(0.01)  # a step long enough for the kill to land inside one
        noise = torch.randn(x.shape, generator=g)
        jitter = float(np.random.rand()) * 1e-3 + random.random() * 1e-3
        return ((model(x + noise) - x) ** 2).mean() * (1 + jitter), {}

    cfg = train.TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=3, ckpt_every=1,
                            log_every=1, lr_schedule="cosine", ema_decay=0.99)
    t = train.Trainer(model, loss_fn, lambda idx: data[idx], len(data), cfg, ckpt, stage="toy",
                      config={"what": "resume test"}, seed=3, device="cpu", progress=False,
                      on_checkpoint=lambda s: print(f"step {s}", flush=True))
    t.fit()
""")


def _run_worker(tmp_path, ckpt, steps, kill_at=None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(steps)], stdout=subprocess.PIPE,
                            text=True, env=env)
    if kill_at is None:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        return
    for line in proc.stdout:
        if line.strip() == f"step {kill_at}":
            time.sleep(random.uniform(0, 0.015))  # land anywhere: mid-step or mid-checkpoint-write
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    steps = 25
    _run_worker(tmp_path, tmp_path / "full.pt", steps)
    kill_at = random.Random().randint(3, steps - 8)
    _run_worker(tmp_path, tmp_path / "killed.pt", steps, kill_at=kill_at)
    partial = torch.load(tmp_path / "killed.pt", weights_only=True)
    assert kill_at <= partial["step"] < steps, "the run was killed before it finished"
    _run_worker(tmp_path, tmp_path / "killed.pt", steps)  # resumes
    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "killed.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume (killed at {kill_at})"
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
    assert a["history"]["loss"] == b["history"]["loss"]


def _tiny_trainer(tmp_path, loss_fn, steps=4, **kw):
    model = torch.nn.Linear(4, 4)
    data = torch.randn(16, 4)
    cfg = train.TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=1, ckpt_every=2, log_every=1)
    return train.Trainer(model, loss_fn, lambda i: data[i], len(data), cfg, tmp_path / "ckpt.pt",
                         stage="tiny", config={"a": 1, "train": {"steps": steps}}, progress=False, **kw)


def test_nan_loss_names_step_and_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_fn(model, x, g):
        calls["n"] += 1
        loss = (model(x) ** 2).mean()
        return (loss * float("nan") if calls["n"] == 4 else loss), {}

    t = _tiny_trainer(tmp_path, loss_fn, steps=6)
    with pytest.raises(TrainingDiverged, match=r"step 4.*ckpt\.pt \(step 2\).*learning rate"):
        t.fit()


def test_resume_refuses_other_stage_and_config(tmp_path):
    def loss_fn(model, x, g):
        return (model(x) ** 2).mean(), {}
    _tiny_trainer(tmp_path, loss_fn).fit()
    path = tmp_path / "ckpt.pt"
    with pytest.raises(CheckpointError, match="holds a 'tiny' checkpoint, not a 'decoder'"):
        train.load_checkpoint(path, stage="decoder")
    with pytest.raises(CheckpointError, match=r"another config \(a: 1 -> 2\)"):
        train.load_checkpoint(path, stage="tiny", config={"a": 2, "train": {"steps": 4}})
    # extending training (more steps) is allowed: only train.steps may differ
    assert train.load_checkpoint(path, stage="tiny", config={"a": 1, "train": {"steps": 99}})["step"] == 4


def test_truncated_and_foreign_checkpoints(tmp_path):
    def loss_fn(model, x, g):
        return (model(x) ** 2).mean(), {}
    _tiny_trainer(tmp_path, loss_fn).fit()
    path = tmp_path / "ckpt.pt"
    blob = path.read_bytes()
    (tmp_path / "torn.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        train.load_checkpoint(tmp_path / "torn.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an unclip_mini training checkpoint"):
        train.load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train.load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact and no temporary file behind."""
    from unclip_mini import artifacts
    path = tmp_path / "c.pt"
    artifacts.atomic_torch_save({"v": torch.ones(3)}, path)

    def crash(obj, f):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        artifacts.atomic_torch_save({"v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_ema_warmup_follows_model_early():
    model = torch.nn.Linear(2, 2)
    ema = train.EMA(model, max_decay=0.999)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)  # decay 0.1: the average moves 90% of the way
    torch.testing.assert_close(ema.model.weight, model.weight - 0.1)


def test_epoch_sampler_covers_each_epoch_and_resumes():
    s = train.EpochSampler(10, 4, seed=0)
    first = torch.cat([s.next() for _ in range(5)])  # 20 indices = two epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    s2 = train.EpochSampler(10, 4, seed=0)
    s2.next(), s2.next()
    s3 = train.EpochSampler(10, 4, seed=0)
    s3.load_state_dict(s2.state_dict())
    assert torch.equal(s2.next(), s3.next())


def test_config_and_device_errors():
    with pytest.raises(ConfigError, match="precision = 'fp16' is not a valid choice; valid choices: 'fp32', 'bf16'"):
        train.TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="lr = -1"):
        train.TrainConfig(lr=-1)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU.*device='cpu'"):
            train.resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        train.resolve_device("gpu0")


def _bf16_job(tmp_path, name):
    """Six steps of a small bf16 job on the CPU; returns (dtype the loss saw, final weights)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    data = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    seen = []

    def loss_fn(model, x, g):
        out = model(x + torch.randn(x.shape, generator=g))
        seen.append(out.dtype)
        return ((out.float() - x) ** 2).mean(), {}

    cfg = train.TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=1, ckpt_every=3, log_every=1,
                            precision="bf16")
    t = train.Trainer(model, loss_fn, lambda idx: data[idx], len(data), cfg, tmp_path / f"{name}.pt",
                      stage="toy", config={"what": "bf16 test"}, seed=3, device="cpu", progress=False)
    t.fit()
    return set(seen), [p.detach().clone() for p in model.parameters()]


def test_bf16_autocasts_on_a_cpu_with_bf16_kernels_and_stays_fp32_elsewhere(tmp_path, monkeypatch):
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert train.bf16_runs_natively("cpu") is native
    dtypes, weights = _bf16_job(tmp_path, "a")
    assert dtypes == {torch.bfloat16 if native else torch.float32}
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in weights)  # fp32 master weights
    if native:  # bf16 on the CPU is as deterministic as fp32: the same job gives the same weights
        _, again = _bf16_job(tmp_path, "b")
        assert all(torch.equal(a, b) for a, b in zip(weights, again))
    # a CPU without bf16 kernels would emulate it (slower than fp32): autocast stays off there
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not train.bf16_runs_natively("cpu")
    dtypes, _ = _bf16_job(tmp_path, "c")
    assert dtypes == {torch.float32}
    with train.autocast("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
