# Sourced by the device scripts (gpu_check.sh, gpu_e2e.sh): run from the repository root, results
# and a copy of everything printed under $OUT (default benchmarks/results/gpu), in $OUT/$1.log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
OUT="${OUT:-$ROOT/benchmarks/results/gpu}"
mkdir -p "$OUT"
exec > >(tee "$OUT/$1.log") 2>&1
status=0
stage() { echo; echo "=== $* ($(date -u +%T))"; }
