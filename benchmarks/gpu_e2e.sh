#!/usr/bin/env bash
# One-shot end-to-end GPU run of benchmarks/e2e.py for a lent H100/H200 (torch and triton
# preinstalled; diffusers/transformers possibly absent and no internet): SD-1.5 from configs at
# 512 px (latent 64), every method in a fresh process, then the same at 256 px. Needs diffusers and
# transformers: installed from wheels carried in benchmarks/wheels/ when the image lacks them
# (pip download diffusers transformers safetensors tokenizers huggingface_hub regex -d benchmarks/wheels).
# Writes $OUT/gpu_e2e.log, $OUT/e2e_sd15_64.csv, $OUT/e2e_sd15_32.csv. Under 8 minutes on an H100.
# The library's methods run with bf16 autocast (e2e.py's default --amp), trust-naive in float32.
# Usage: OUT=/some/dir benchmarks/gpu_e2e.sh
# Dry run on a CPU (what CI tests): DRY_RUN=1 OUT=/some/dir benchmarks/gpu_e2e.sh runs the same
# stages on tiny configs of the same structure at 8x8 latents, one step each.
# shellcheck source=benchmarks/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh" gpu_e2e
stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if ! python -c "import diffusers, transformers" 2>/dev/null; then
  if [ -d benchmarks/wheels ]; then
    pip install -q --no-index --find-links benchmarks/wheels diffusers transformers || exit 3
  else
    echo "diffusers/transformers missing and no benchmarks/wheels to install them from"; exit 3
  fi
fi
if [ "${DRY_RUN:-0}" != 1 ]; then  # a dry run uses the checkout as installed
  pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 || echo "note: editable install failed; using PYTHONPATH"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "${DRY_RUN:-0}" = 1 ]; then  # tiny configs at small latents: 4096-token attention is no CPU test
  RUN=(--device cpu --tiny --steps 1); L512=8; L256=8
else
  RUN=(--device cuda --steps 3); L512=64; L256=32
fi
stage "SD-1.5, 512 px, batch 8 + 8"
timeout 300 python benchmarks/e2e.py "${RUN[@]}" --latent "$L512" --batch 8 8 --x0-steps 4 \
  --out "$OUT/e2e_sd15_64.csv" --overwrite || status=1
stage "SD-1.5, 256 px, batch 4 + 4"
timeout 150 python benchmarks/e2e.py "${RUN[@]}" --latent "$L256" --batch 4 4 --x0-steps 4 \
  --out "$OUT/e2e_sd15_32.csv" --overwrite || status=1
exit $status
