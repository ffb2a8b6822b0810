#!/usr/bin/env bash
# One prepared GPU run (issue "GPU speed"): on a machine with a CUDA torch (no hub, no gradio), build a Stable
# Diffusion 1.5-architecture folder with random weights in diffusers layout, run the protect and attack benchmarks
# and the app's whole loop on it, and print one table. The quick settings' benchmarks took about 6 minutes on one
# H200 (docs/RESULTS.md, "On one GPU"); the loop alone, quick, 107 s; ASPL stopped by its limit there because
# --iterations did not reach its rounds (fixed since); the full settings take longer.
#
#   bash bench/gpu.sh            # full settings: LDU 50 iterations, LoRA 400 steps, 8 generations
#   QUICK=1 bash bench/gpu.sh    # fewer iterations and steps; per-step times extrapolated, and labelled so
#   SMOKE=1 bash bench/gpu.sh    # tiny on this CPU: checks the script in about a minute, times nothing
#   STEP_LIMIT=300               # seconds each benchmark may take (default 300) before it is stopped and reported
#
# Missing pure-Python packages (diffusers, peft, pypng) may travel as wheels in .whl/ (bench/README lines below):
#   python3 -m pip download --no-deps -d .whl diffusers==0.42.1 peft==0.21.2 pypng==0.20220715.0 importlib_metadata
#   (the H200 image of 2026-12 has torch, transformers, peft and accelerate, but not diffusers, pypng, importlib_metadata)
set -uo pipefail  # not -e: one failing benchmark is reported and the others still run
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# SMOKE=1: the same commands on the tiny backbone on this CPU, in seconds (checks the script, measures nothing)
if [ -n "${SMOKE:-}" ]; then
  DEV="--device cpu"; M="--model tiny"; R="--model tiny"; DT=""; GPU="CPU (smoke run, tiny backbone: no timings)"
else
  python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
  SD=${SD:-/tmp/sd15-random}
  [ -f "$SD/model_index.json" ] || python3 bench/make_random_sd.py --out "$SD" || exit 1
  DEV=""; M="--model $SD"; R="--random-weights sd15"; DT="--dtype bf16"
  GPU=$(python3 -c 'import torch; print(torch.cuda.get_device_name())')
fi
OUT=${OUT:-/tmp/ldu-gpu-bench}; mkdir -p "$OUT"
ASPL_IT=""; GEN_PRESET=sd15; GEN_STEPS=3  # the amortised generator: SD 1.5's preset, 3 timed training steps
if [ -n "${SMOKE:-}" ]; then IT=2; STEPS=6; NGEN=2; LABEL="smoke"; ASPL_IT=1; GEN_PRESET=cpu; GEN_STEPS=1;
elif [ -n "${QUICK:-}" ]; then IT=10; STEPS=60; NGEN=8; LABEL="quick (extrapolated from 10 iterations / 60 steps)";
else IT=50; STEPS=400; NGEN=8; LABEL=full; fi
LIMIT=${STEP_LIMIT:-300}  # seconds each benchmark may take before it is stopped and reported as such

step() {  # step NAME COMMAND...: run one benchmark into $OUT/NAME.txt; a failure or overrun is written there too
  local name=$1; shift
  timeout "$LIMIT" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ]; then echo "$name: stopped after ${LIMIT} s (STEP_LIMIT)" | tee -a "$OUT/$name.txt"
  elif [ "$rc" != 0 ]; then echo "$name: failed (exit $rc, see above)" | tee -a "$OUT/$name.txt"; fi
}

step protect python3 bench/protect.py $M $DEV $DT --methods ldu,advdm,photoguard_encoder,mist,pid --iterations $IT
step aspl python3 bench/protect.py $M $DEV $DT --methods aspl --images 4 --iterations ${ASPL_IT:-$IT}
step amortised python3 bench/amortised.py $R $DEV $DT --preset $GEN_PRESET --batch 4 --train-steps $GEN_STEPS --images 1,8
step attack python3 bench/attack.py $M $DEV $DT --steps $((STEPS < 60 ? STEPS : 60))
step loop python3 bench/loop.py $M $DEV $DT --iterations $IT --steps $STEPS --n-gen $NGEN
echo
echo "== LDU Playground on $GPU, $(date -u +%F), settings: $LABEL"
for f in protect aspl amortised attack loop; do echo "-- $f"; cat "$OUT/$f.txt"; done
