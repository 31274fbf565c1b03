#!/usr/bin/env bash
# Run GPU benchmarks on the device machine (its python3 has CUDA torch). Prepare first, on the CPU machine:
#   bash scripts/device_bundle.sh      then carry: .cache/comfyui-0.3.75 .cache/device
# Usage there: bash bench/gpu.sh pag tstitch ...   (results land in $OUT/<NAME>_SPEED_GPU.md)
#             bash bench/gpu.sh evidence          (every full-size benchmark in one process: $OUT/EVIDENCE_GPU.md)
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --no-index --find-links .cache/device/wheels torchsde trampoline
python3 -c "import av" 2>/dev/null || export PYTHONPATH=$PWD/.cache/device/stubs${PYTHONPATH:+:$PYTHONPATH}
export COMFYUI_PATH=$PWD/.cache/comfyui-0.3.75
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for name in "$@"; do
  started=$(date +%s)
  if [ "$name" = evidence ]; then
    timeout "${BENCH_TIMEOUT:-480}" python3 bench/gpu_evidence.py --out "${OUT:-docs}/EVIDENCE_GPU.md" \
      || echo "bench ${name}: failed or timed out"
  else
    timeout "${BENCH_TIMEOUT:-420}" python3 "bench/${name}_speed.py" --device cuda \
      --out "${OUT:-docs}/${name^^}_SPEED_GPU.md" || echo "bench ${name}: failed or timed out"
  fi
  echo "bench ${name}: $(( $(date +%s) - started )) s"
done
