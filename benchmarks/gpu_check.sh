#!/usr/bin/env bash
# On one NVIDIA H100 or H200, in under 6 minutes: the tests that need CUDA, a one-GPU torchrun run (DDP
# over NCCL), and `alexnet benchmark` for the paper and torchvision presets at batch 256 and 512,
# model-only and end-to-end from prepared data (steps replayed from CUDA graphs, the default), and for
# the paper preset without them (--no-cuda-graphs). PROFILE=1 adds step_profile.py (where the paper
# step's time goes: each departure from torchvision, each kernel choice, CUDA graphs, by kernel and by
# operation; about 3 minutes); EXTRAS=1 the prepared loader alone by threads, JPEG end-to-end and fp16
# benchmarks; CANDIDATES=1 the paper preset at the largest batch with LRN's candidate kernels (band
# kernels, alone and with conv1's and conv2's bias and ReLU), against the same baseline (some 2
# minutes). Appends everything, with the device's name and the date, to benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh                # data: ../shared/data/imagenette-dev
#   DATA=folder bash benchmarks/gpu_check.sh    # any ImageNet-layout folder with train/ and val/
#   PROFILE=1 EXTRAS=1 bash benchmarks/gpu_check.sh   # everything (some 10 minutes)
#   QUICK=1 bash benchmarks/gpu_check.sh        # a smoke test of all of it (imagenette-ci), on any machine
#   BATCHES="512" PRESETS=paper ...             # fewer runs
#   CANDIDATES=1 BATCHES=512 PRESETS=paper ...   # a candidate's figures, in one call of the device tool
#
# Python: the project's .venv where there is one, else python3 with src/ on PYTHONPATH (a GPU machine
# with PyTorch installed and no network). The training images are listed COPIES times (3; links, under
# new names) before they are prepared, so that an epoch is long enough for the loader to reach its pace.
# tests/test_prepare.py's GPU test reads ../shared/data/imagenette-ci, and is skipped where it is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=$PWD/.venv/bin/python; else PY=python3; export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}; fi
export PYTHONUNBUFFERED=1
if [ -n "${QUICK:-}" ]; then COPIES=1 BATCHES=16 STEPS=1 ROUNDS=1 PRESETS=paper PROFILE=1 EXTRAS=1 CANDIDATES=1 DATA=${DATA:-../shared/data/imagenette-ci}; fi
DATA=$(realpath "${DATA:-../shared/data/imagenette-dev}")
COPIES=${COPIES:-3} BATCHES=${BATCHES:-256 512} STEPS=${STEPS:-20} ROUNDS=${ROUNDS:-3} PRESETS=${PRESETS:-paper torchvision}
PROFILE=${PROFILE:-0} EXTRAS=${EXTRAS:-0} CANDIDATES=${CANDIDATES:-0}
FORMATS=raw; if [ "$EXTRAS" = 1 ]; then FORMATS="raw jpeg"; fi
SMALL=${BATCHES%% *}  # the first batch size: the torchrun run, the loader and JPEG measurements
LARGE=${BATCHES##* }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RESULTS=benchmarks/RESULTS.md
log() { echo "$@" | tee -a "$RESULTS"; }
run() {  # a command, its output into RESULTS.md as a code block, with its wall time
  local start=$SECONDS
  log ""; log "\`$*\`"; log '```'
  "$@" 2>&1 | grep -v -e '^W[0-9]' -e 'Warning' | tail -n 120 | tee -a "$RESULTS"
  log "exit ${PIPESTATUS[0]}, $((SECONDS - start)) s"; log '```'
}

gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
log ""
log "## $(date -u '+%Y-%m-%d %H:%M UTC'), ${gpu:-no GPU}, $($PY -c 'import torch, sys; print(f"torch {torch.__version__}, Python {sys.version.split()[0]}, {torch.get_num_threads()} CPU threads")')"
log ""
log "Data: $(basename "$DATA"), its training images listed $COPIES times. QUICK=${QUICK:-}"

# 4 processes where pytest-xdist is there: most of the tests' time is Triton compiling and autotuning
# kernels for each new shape (CPU work; one process took 5 minutes on an H200's machine)
XDIST=(); if $PY -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi
run timeout 240 $PY -m pytest -q -p no:cacheprovider "${XDIST[@]}" --durations=10 tests/test_cuda.py tests/test_prepare.py -k "cuda or gpu or bf16 or fp16"
if [ "$PROFILE" = 1 ]; then
  run timeout 420 $PY benchmarks/step_profile.py --batch-size "$LARGE" --steps "$STEPS" --rounds "$ROUNDS"
fi

# the source folder: train/ with every image linked COPIES times under new names, val/ as it is
mkdir -p "$WORK/src/train"
ln -s "$DATA/val" "$WORK/src/val"
for cls in "$DATA"/train/*/; do
  c=$(basename "$cls"); mkdir "$WORK/src/train/$c"
  for k in $(seq "$COPIES"); do for f in "$cls"*; do ln -s "$f" "$WORK/src/train/$c/$k-$(basename "$f")"; done; done
done
for fmt in $FORMATS; do run $PY -m alexnet prepare "$WORK/src" "$WORK/$fmt" --format $fmt --no-progress; done

# the loader alone: batches on the device, per second, by format and threads (second pass: page cache warm)
if [ "$EXTRAS" = 1 ]; then run $PY - "$WORK" "$SMALL" $FORMATS <<'EOF'
import sys, time, torch
from alexnet.data.prepared import PreparedLoader, open_prepared
work, batch = sys.argv[1], int(sys.argv[2])
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
for fmt in sys.argv[3:]:
    split = open_prepared(f"{work}/{fmt}", "train")
    last = max(0, len(split) // batch - 30)  # the epoch's last 30 batches at most
    for threads in (2, 4, 8):
        for epoch in range(2):
            start, n = time.perf_counter(), 0
            for b in PreparedLoader(split, batch, epoch=epoch, start_step=last, device=device,
                                    pin_memory=device.type == "cuda", threads=threads, drop_last=True):
                n += len(b.labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"loader {fmt:4} threads {threads}: {n / (time.perf_counter() - start):8.0f} images/s on {device}")
EOF
fi

run timeout 180 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m alexnet train --data "$WORK/raw" \
    --run-dir "$WORK/run" --epochs 2 --batch-size "$SMALL" --no-progress

for preset in $PRESETS; do
  for batch in $BATCHES; do
    run timeout 120 $PY -m alexnet benchmark --preset $preset --batch-size $batch --data "$WORK/raw" --steps $STEPS --rounds $ROUNDS
  done
done
# eager steps: the host's time to launch each, which CUDA graphs save, competes with the loader's
run timeout 120 $PY -m alexnet benchmark --preset paper --batch-size "$LARGE" --no-cuda-graphs --data "$WORK/raw" --steps $STEPS --rounds $ROUNDS
# kernels that are not yet defaults (lrn.py's "triton-band"; model/net.py's fuse_lrn), each against the baseline
if [ "$CANDIDATES" = 1 ]; then
  for extra in "" "--fuse-lrn"; do
    run timeout 150 $PY -m alexnet benchmark --preset paper --batch-size "$LARGE" --lrn-kernels triton-band $extra --data "$WORK/raw" --steps $STEPS --rounds $ROUNDS
  done
fi
if [ "$EXTRAS" = 1 ]; then
  run timeout 120 $PY -m alexnet benchmark --preset paper --batch-size "$SMALL" --data "$WORK/jpeg" --steps $STEPS --rounds $ROUNDS
  run timeout 120 $PY -m alexnet benchmark --preset paper --batch-size "$LARGE" --precision fp16 --steps $STEPS --rounds $ROUNDS
fi
if [ -n "${OUT:-}" ]; then cp "$RESULTS" "$OUT/"; fi  # the device tool brings $OUT back
