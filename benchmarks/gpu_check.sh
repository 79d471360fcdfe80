#!/usr/bin/env bash
# One-shot GPU check of the trust_fast kernels, for a lent H100/H200 (torch and
# triton preinstalled; diffusers, pytest, internet possibly absent):
#   1. build trust_fast._C (CPU + CUDA kernels) against the machine's torch;
#   2. check every CUDA backend against the reference (benchmarks/gpu_bench.py --check,
#      then the CUDA cases of tests/ops/test_ops_kernels.py when pytest is installed);
#   3. time reference / cuda / triton with triton.testing.do_bench on SD 1.5 shapes,
#      with achieved bandwidth against a measured device-to-device copy.
# Everything is written to $OUT (gpu_check.log, gpu_bench.csv).
# Usage: OUT=/some/dir benchmarks/gpu_check.sh
# shellcheck source=benchmarks/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh" gpu_check

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
python - <<'PY'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
PY

# trust_fast/__init__.py imports diffusers; without it, expose the package
# without running __init__ so that trust_fast.ops and trust_fast.optim import.
SHIM="$(mktemp -d)"
cat > "$SHIM/sitecustomize.py" <<PY
import importlib.util, os, sys, types
if importlib.util.find_spec("diffusers") is None and "trust_fast" not in sys.modules:
    pkg = types.ModuleType("trust_fast")
    pkg.__path__ = [os.path.join("$ROOT", "trust_fast")]
    pkg.__file__ = os.path.join("$ROOT", "trust_fast", "__init__.py")
    sys.modules["trust_fast"] = pkg
PY
export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

stage "build trust_fast._C"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
export MAX_JOBS="${MAX_JOBS:-16}"
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST  nvcc: $(command -v nvcc || echo none)  CUDA_HOME=${CUDA_HOME:-unset}"
time timeout 150 python setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build exit $? (log: build.log, last lines below)"; tail -n 5 "$OUT/build.log"
python - <<'PY'
import trust_fast.ops as ops
from trust_fast.ops import registry
for b in ("reference", "cpp", "cuda", "triton"):
    print(f"  {b:9s} cuda: {registry.get_backend(b).unavailable_reason('cuda') or 'available'}")
print("  backend_for(cuda) =", ops.backend_for("cuda"))
PY
export TRUST_FAST_NO_JIT=1

stage "check: CUDA backends vs reference and float64 oracle"
timeout 60 python benchmarks/gpu_bench.py --check || status=1

stage "tests: CUDA cases of tests/ops/test_ops_kernels.py"
if python -c 'import pytest' 2>/dev/null; then
  timeout 70 python -m pytest -x -q -p no:cacheprovider tests/ops/test_ops_kernels.py -k cuda || status=1
else
  echo "pytest is not installed here and there is no network: the --check stage above is the pytest-free"
  echo "equivalent of these tests (same oracles, shapes and error rule)"
fi

stage "benchmark (triton.testing.do_bench, median)"
timeout 110 python benchmarks/gpu_bench.py --bench --sets a b c --out "$OUT/gpu_bench.csv" || status=1

stage "done, status $status"
exit $status
