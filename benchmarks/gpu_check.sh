#!/usr/bin/env bash
# On one NVIDIA H100 or H200 (about 5 minutes): the tests that need CUDA, a one-GPU torchrun run (DDP
# over NCCL), and `alexnet benchmark` for the paper and torchvision presets at batch 256 and 512,
# model-only and end-to-end from a prepared dataset. Appends everything to benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh            # DATA=folder to prepare another dataset than the default
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'; fi
PY=.venv/bin/python
WORK=$(mktemp -d)
DATA=${DATA:-../shared/data/imagenette-dev}
if [ ! -d "$DATA" ]; then DATA=$WORK/demo; $PY -c "from alexnet.synthetic import make_demo_dataset as m; m('$DATA')"; fi
RESULTS=benchmarks/RESULTS.md
log() { echo "$@" | tee -a "$RESULTS"; }
run() {  # a command, its output into RESULTS.md as a code block
  log ""; log "\`$*\`"; log '```'
  "$@" 2>&1 | grep -v -e '^W[0-9]' -e 'Warning' | tail -n 25 | tee -a "$RESULTS"
  log '```'
}

log ""
log "## $(date -u '+%Y-%m-%d %H:%M UTC'), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
run $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_prepare.py -k "cuda or gpu or bf16 or fp16"
run $PY -m alexnet prepare "$DATA" "$WORK/prepared" --no-progress
run timeout 120 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m alexnet train --data "$WORK/prepared" \
    --run-dir "$WORK/run" --epochs 1 --batch-size 256 --no-progress
for preset in paper torchvision; do
  for batch in 256 512; do
    run timeout 90 $PY -m alexnet benchmark --preset $preset --batch-size $batch --data "$WORK/prepared" --steps 20 --rounds 3
  done
done
run timeout 120 $PY -m alexnet benchmark --preset paper --batch-size 512 --compile --steps 20 --rounds 3 --no-baseline
rm -rf "$WORK"
