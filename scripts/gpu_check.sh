#!/usr/bin/env bash
# make gpu-check: everything that needs a GPU, in one short run (sized for a 15-minute lease).
#   1. the GPU bench: marvis_250m bf16-mixed training tokens/s + MFU, compiled synthesis RTF + first chunk
#   2. int4 / int8 / bf16 synthesis on CUDA (int4: torch's CUDA int4 kernel) against bf16 logits
#   3. DDP with 1 device, bf16-mixed: the demo experiment for a few steps, then synthesis (streamed)
#   4. the whole test suite (default tier) on the GPU machine
# Each step is timed; failures are collected and listed at the end (exit 1 if any). Without CUDA it
# says so and exits 2 before running anything.
set -u
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/gpu_check}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA device here ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')):" \
       "nothing run. Run it on a machine with an NVIDIA GPU (PY=<python with CUDA torch> to pick the interpreter)." >&2
  exit 2
fi
mkdir -p "$OUT"
failed=()
step() {  # step NAME COMMAND...: run, time, log to $OUT/NAME.log, remember failures
  local name=$1; shift
  local start=$SECONDS
  echo "== $name"
  if "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"; tail -n 25 "$OUT/$name.log"
  else
    echo "   FAILED ($((SECONDS - start)) s): $OUT/$name.log"; tail -n 40 "$OUT/$name.log"; failed+=("$name")
  fi
}

nvidia-smi -L || true
step bench "$PY" -m elise.bench part=gpu quick=true out="$OUT/bench_results.json"
step quant_cuda "$PY" - <<'EOF'
import torch
from elise.bench.synth import random_model
from elise.model.kernels import check_candidates
from elise.synthesis.runtime import prepare_model

model = prepare_model(random_model("marvis_250m").cuda(), torch.float32)  # CUDA int4 wants K % 128 == 0
for mode, agreement in check_candidates(model, ["int8", "int4", "bf16"]).items():
    print(mode, "vs fp32 (random weights, teacher-forced):", agreement)
EOF
step ddp_bf16 "$PY" -m elise.demo out="$OUT/demo" trainer=ddp trainer.devices=1 trainer.accelerator=gpu \
  trainer.precision=bf16-mixed trainer.max_steps=30
step tests "$PY" -m pytest -q -x -n 8 -p no:cacheprovider tests

if ((${#failed[@]})); then
  echo "gpu-check: FAILED steps: ${failed[*]} (logs in $OUT)"; exit 1
fi
echo "gpu-check: all steps passed on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); logs in $OUT"
