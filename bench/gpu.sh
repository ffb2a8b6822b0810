#!/usr/bin/env bash
# One prepared GPU run (issue "GPU speed"): on a machine with a CUDA torch (no hub, no gradio), build a Stable
# Diffusion 1.5-architecture folder with random weights in diffusers layout, run the protect and attack benchmarks
# and the app's whole loop on it, and print one table. Designed for about 9 minutes on an H100-class GPU (not yet
# run on one: no GPU was lent to the sessions that wrote it).
#
#   bash bench/gpu.sh            # full settings: LDU 50 iterations, LoRA 400 steps, 8 generations
#   QUICK=1 bash bench/gpu.sh    # fewer iterations and steps; per-step times extrapolated, and labelled so
#
# Missing pure-Python packages (diffusers, peft, pypng) may travel as wheels in .whl/ (bench/README lines below):
#   python3 -m pip download --no-deps -d .whl diffusers==0.42.1 peft==0.21.2 pypng==0.20220715.0
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())"
SD=${SD:-/tmp/sd15-random}
[ -f "$SD/model_index.json" ] || python3 bench/make_random_sd.py --out "$SD"
OUT=${OUT:-/tmp/ldu-gpu-bench}; mkdir -p "$OUT"
if [ -n "${QUICK:-}" ]; then IT=10; STEPS=60; LABEL="quick (extrapolated from 10 iterations / 60 steps)"; else IT=50; STEPS=400; LABEL=full; fi
python3 bench/protect.py --model "$SD" --dtype bf16 --methods ldu,advdm,photoguard_encoder,mist,pid --iterations $IT \
  | tee "$OUT/protect.txt"
python3 bench/protect.py --model "$SD" --dtype bf16 --methods aspl --images 4 | tee "$OUT/aspl.txt"
python3 bench/amortised.py --random-weights sd15 --dtype bf16 --preset sd15 --batch 4 --train-steps 3 --images 1,8 \
  | tee "$OUT/amortised.txt" || echo "amortised benchmark failed (see above)" | tee -a "$OUT/amortised.txt"
python3 bench/attack.py --model "$SD" --dtype bf16 --steps $((STEPS < 60 ? STEPS : 60)) | tee "$OUT/attack.txt"
python3 bench/loop.py --model "$SD" --dtype bf16 --iterations $IT --steps $STEPS --n-gen 8 | tee "$OUT/loop.txt"
echo
echo "== LDU Playground on $(python3 -c 'import torch; print(torch.cuda.get_device_name())'), $(date -u +%F), settings: $LABEL"
for f in protect aspl amortised attack loop; do echo "-- $f"; cat "$OUT/$f.txt"; done
