"""A training job for tests/test_distributed.py, run by `torchrun --nproc_per_node 2` (gloo, CPU) or by plain
python (one process). Not a test module itself.

    python dist_worker.py stages RUN_DIR OUT_DIR [--clip-from OTHER_RUN_DIR]
                                                   every stage at smoke through the CLI (`train STAGE --steps 4`);
                                                   with 2 processes also the decoder with dropout (see DROPOUT_STEPS);
                                                   --clip-from: after training its own CLIP, the job continues on a
                                                   copy of OTHER_RUN_DIR's (so later stages see the same inputs);
                                                   its own is kept in RUN_DIR/clip.own
    python dist_worker.py dropout RUN_DIR OUT_DIR [--slow]   only the decoder with dropout (RUN_DIR holds a CLIP);
                                                   --slow: each step sleeps, so a test can kill the job mid-run
    python dist_worker.py fsdp RUN_DIR OUT_DIR     a smoke decoder by the training loop with DDP, and with FSDP
                                                   stopped after 2 steps and resumed (tests/test_scale.py)

It records, per rank, what a test cannot see from outside: each stage's raw weights when its training loop
starts and ends (OUT_DIR/<stage>.init.rank<r>.pt, <stage>.rank<r>.pt), the gradients of its first step as the
optimizer sees them (<stage>.grad.rank<r>.pt), and every file the rank wrote through the library
(OUT_DIR/writes.rank<r>.json).
Rank 0 prints "checkpoint <stage> <step>" after each checkpoint. Only library APIs that every version of
the code has are used, so the same job runs against older code (to show what the test catches there).
"""
import json
import os
import shutil
import sys
import time

import torch

torch.set_num_threads(1)

from unclip_mini import artifacts, stages, train  # noqa: E402
from unclip_mini.__main__ import main  # noqa: E402

STAGES = ("clip", "diffusion_prior", "ar_prior", "checker", "decoder", "glide", "upsampler1", "upsampler2")
STEPS = 4
GRAD_STEPS = 2
DROPOUT_STEPS, DROPOUT_CKPT = 8, 2


def dropout_config(run):
    """The smoke decoder with U-Net dropout (torch's global RNG: one stream per rank) and a checkpoint every
    DROPOUT_CKPT steps: what a resume must restore rank by rank."""
    d = run.cfg.decoder
    return d.replace(unet=d.unet.replace(dropout=0.3),
                     train=d.train.replace(steps=DROPOUT_STEPS, ckpt_every=DROPOUT_CKPT, log_every=1))


def install_probes(out, slow=False):
    rank = int(os.environ.get("RANK", "0"))
    writes = []
    atomic = artifacts._atomic

    def spy(path, write):
        writes.append(str(path))
        with open(os.path.join(out, f"writes.rank{rank}.json"), "w") as f:
            json.dump(writes, f)
        return atomic(path, write)
    artifacts._atomic = spy

    fit, save, init = train.Trainer.fit, train.Trainer.save, train.Trainer.__init__

    def fit_and_dump(self):
        history = fit(self)
        torch.save({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                   os.path.join(out, f"{self.stage}.rank{rank}.pt"))
        return history

    def save_and_say(self):
        save(self)
        if rank == 0:
            print(f"checkpoint {self.stage} {self.step}", flush=True)

    def init_slow(self, model, loss_fn, *args, **kw):
        def slow_loss(*a):
            time.sleep(0.25)
            return loss_fn(*a)
        init(self, model, slow_loss if slow else loss_fn, *args, **kw)
        dump = lambda what, sd: torch.save({k: v.detach().cpu().clone() for k, v in sd.items()},
                                           os.path.join(out, f"{self.stage}.{what}rank{rank}.pt"))
        dump("init.", self.model.state_dict())
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

        def first_grads(optimizer, args, kwargs):
            if self.step < GRAD_STEPS:  # the U-Nets' zero-initialised output layers leave step 1's other grads at 0
                dump(f"grad{self.step + 1}.", {n: p.grad for n, p in named if p.grad is not None})
        self.optimizer.register_step_pre_hook(first_grads)

    train.Trainer.fit, train.Trainer.save, train.Trainer.__init__ = fit_and_dump, save_and_say, init_slow


def fsdp_vs_ddp(run_dir, out, steps=4):
    """The same smoke decoder trained `steps` steps with DDP, and with FSDP in two goes (stopped after 2 steps,
    then resumed from its sharded run's checkpoint); rank 0 keeps FSDP's EMA network as train_stage gets it."""
    from unclip_mini import decoder, distributed
    device = train.init_distributed() or "cpu"
    cfg = decoder.DecoderConfig.smoke()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(32, 3, 16, 16, generator=g) * 2 - 1
    z = torch.nn.functional.normalize(torch.randn(32, cfg.clip_dim, generator=g), dim=-1)
    tokens = torch.zeros(32, 8, dtype=torch.long)
    tokens[:, :6] = torch.randint(1, 400, (32, 6), generator=g)
    tokens[:, 6] = decoder.CLIP_VOCAB_SIZE - 1

    def trainer(parallel, n):
        torch.manual_seed(0)
        tc = cfg.train.replace(steps=n, batch_size=8, ckpt_every=2, log_every=1, parallel=parallel)
        return train.Trainer(decoder.Decoder(cfg), decoder.loss_fn, lambda i: (x[i], z[i], tokens[i]), len(x), tc,
                             os.path.join(run_dir, f"{parallel}.pt"), stage="fsdp-test", seed=1, device=device,
                             config={"what": "fsdp vs ddp", "train": {"steps": n}}, progress=False)
    os.makedirs(run_dir, exist_ok=True)
    trainer("ddp", steps).fit()
    first = trainer("fsdp", 2)
    assert first.sharded and distributed.is_sharded(first.model)
    first.fit()
    resumed = trainer("fsdp", steps)
    assert resumed.resumed_from == 2
    resumed.fit()
    network = resumed.ema_network(lambda: decoder.Decoder(cfg))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(network.state_dict(), os.path.join(out, "fsdp_ema_network.pt"))


def hard_negative_clip(run_dir):
    """The smoke CLIP with hard negatives (off in every preset): its loss gathers every rank's negatives."""
    run = stages.Run("smoke", run_dir=run_dir, device=train.init_distributed() or "cpu")
    stages.load_or_train(run, "clip", steps=STEPS, config=run.cfg.clip.replace(hard_negatives=0.375),
                         variant="hardneg", verbose=False)


def dropout_decoder(run_dir):
    run = stages.Run("smoke", run_dir=run_dir, device=train.init_distributed() or "cpu")
    stages.load_or_train(run, "decoder", config=dropout_config(run), variant="dropout", verbose=False)


if __name__ == "__main__":
    mode, run_dir, out = sys.argv[1:4]
    os.makedirs(out, exist_ok=True)
    if mode != "fsdp":
        install_probes(out, slow="--slow" in sys.argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "stages":
        for stage in STAGES:
            rc = main(["train", stage, "--preset", "smoke", "--run-dir", run_dir, "--device", "cpu",
                       "--steps", str(STEPS)])
            assert rc == 0, f"train {stage} failed"
            if stage == "clip" and "--clip-from" in sys.argv:
                other = sys.argv[sys.argv.index("--clip-from") + 1]
                os.rename(os.path.join(run_dir, "clip"), os.path.join(run_dir, "clip.own"))  # kept for the test
                shutil.copytree(os.path.join(other, "clip"), os.path.join(run_dir, "clip"))
        hard_negative_clip(run_dir)
        if world > 1:
            dropout_decoder(run_dir)
    elif mode == "dropout":
        dropout_decoder(run_dir)
    elif mode == "fsdp":
        fsdp_vs_ddp(run_dir, out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
