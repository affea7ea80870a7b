#!/usr/bin/env bash
# The GPU figures a CPU machine cannot measure, in one go (a session with a GPU runs this, then copies the table
# it prints into the README's "Measured figures"):
#
#   .ci/gpu_figures.sh [OUT]           (default OUT=runs/gpu_figures; about 5-10 min on one H100/H200)
#
# 1. `bench` at `small` on the GPU: every benchmark, each training step with its FLOP/s beside the GPU's bf16
#    matmul rate measured in the same run;
# 2. `bench` at `paper` sizes on one GPU, at a small batch (PAPER_BATCH, default 4; bf16 autocast, activation
#    checkpointing as the preset trains): the 3.5 B decoder, both priors, both upsamplers;
# 3. a few real training steps of the small decoder through the CLI, under torchrun on every GPU there is
#    (DDP; `--preset paper` would use FSDP);
# 4. a summary table, OUT/summary.md.
# Tested on the CPU at smoke by tests/test_bench.py (DEVICE=cpu SMALL=smoke PAPER=smoke, fewer benchmarks).
set -euo pipefail
OUT=${1:-runs/gpu_figures}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-small}
PAPER=${PAPER:-paper}
PAPER_BATCH=${PAPER_BATCH:-4}
PY=${PYTHON:-python}
NPROC=${NPROC:-$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")}
mkdir -p "$OUT"

$PY -m unclip_mini bench ${SMALL_BENCH:-data prior ar_prior decoder upsampler pipeline} --preset "$SMALL" \
    --device "$DEVICE" --run-dir "$OUT/$SMALL"
$PY -m unclip_mini bench ${PAPER_BENCH:-prior ar_prior decoder upsampler} --preset "$PAPER" --device "$DEVICE" \
    --batch-size "$PAPER_BATCH" --run-dir "$OUT/$PAPER-batch$PAPER_BATCH"
if [ "$NPROC" -gt 1 ]; then
    launch=(torchrun --standalone --nproc_per_node "$NPROC")
else
    launch=($PY)
fi
SECONDS=0
"${launch[@]}" -m unclip_mini train decoder --preset "$SMALL" --steps "${TRAIN_STEPS:-50}" --device "$DEVICE" \
    --run-dir "$OUT/train-$SMALL"
echo "train decoder --preset $SMALL, ${TRAIN_STEPS:-50} steps on $NPROC process(es): $SECONDS s (with start-up)" \
    > "$OUT/train-$SMALL.txt"

$PY - "$OUT" <<'PYEOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| preset | benchmark | network | params | batch | train step s | train TFLOP/s | vs matmul | sample step s |")
print("|---|---|---|---|---|---|---|---|---|")
for f in sorted(out.glob("*/bench/*.json")):
    d = json.loads(f.read_text())
    def rows(r, name):
        if isinstance(r, dict):
            if "train_step_s" in r or "sample_step_s" in r:
                yield name, r
            for k, v in r.items():
                if isinstance(v, dict) and k not in ("peer",):
                    yield from rows(v, k)
    for name, r in rows(d["result"], d["benchmark"]):
        rate = r.get("train_flop_per_s")
        fmt = lambda x, p: "-" if x is None else f"{x:.{p}g}"
        print(f"| {f.parent.parent.name} | {d['benchmark']} | {name} | {r.get('params', 0) / 1e6:.1f} M | "
              f"{r.get('batch_size', '-')} | {fmt(r.get('train_step_s'), 3)} | {fmt(rate and rate / 1e12, 3)} | "
              f"{fmt(r.get('train_vs_matmul'), 2)} | {fmt(r.get('sample_step_s'), 3)} |")
    if d["benchmark"] == "pipeline":
        for k, v in d["result"].items():
            if k.startswith("batch"):
                print(f"| {f.parent.parent.name} | pipeline | {k} | | | | | | {v['s_per_image']:.3g} s/image |")
m = next(iter(sorted(out.glob("*/bench/*.json"))), None)
if m:
    mach = json.loads(m.read_text())["machine"]
    print(f"\nmachine: {mach.get('cuda') or mach.get('platform')}, torch {mach['torch']}, matmul fp32 "
          f"{mach['matmul_flop_per_s'] / 1e12:.3g} TFLOP/s, bf16 {mach.get('matmul_bf16_flop_per_s', 0) / 1e12:.3g} TFLOP/s")
for t in sorted(out.glob("train-*.txt")):
    print(t.read_text().strip())
PYEOF
