#!/usr/bin/env bash
# Compile-only check of the CUDA sources, so CUDA code never rots on CPU-only CI.
#  1. every csrc/cuda/*.cu (raw pointers, no torch headers) with nvcc for sm_80 and sm_90;
#  2. the ATen binding csrc/cuda/*.cpp with -fsyntax-only against the installed torch
#     headers (a CPU wheel lacks one CMake-generated CUDA header: an empty stand-in is used).
# Usage: scripts/compile_cuda_check.sh   (NVCC=/path/to/nvcc to override)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [[ ! -x "$NVCC" ]]; then
  echo "compile_cuda_check: nvcc not found (set NVCC)" >&2
  exit 1
fi
if [[ -z "${CUDA_HOME:-}" ]]; then
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$NVCC")")")"; do
    if [[ -f "$candidate/include/cuda_runtime.h" ]]; then CUDA_HOME="$candidate"; break; fi
  done
fi
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
shopt -s nullglob
cu=(csrc/cuda/*.cu)
if (( ${#cu[@]} == 0 )); then
  echo "compile_cuda_check: no .cu files under csrc/cuda" >&2
  exit 1
fi
for arch in sm_80 sm_90; do
  for f in "${cu[@]}"; do
    "$NVCC" -arch="$arch" -O3 -std=c++17 -Icsrc -Icsrc/cuda -c "$f" -o "$tmp/$(basename "$f" .cu).$arch.o"
    echo "ok  nvcc -arch=$arch $f"
  done
done
torch_inc="$(python -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null || true)"
py_inc="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)"
if [[ -n "$torch_inc" ]]; then
  mkdir -p "$tmp/stub/c10/cuda/impl"
  first_inc="${torch_inc%% *}"
  if [[ ! -f "$first_inc/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
    echo "#pragma once" > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
  fi
  inc_flags=(-I"$tmp/stub")
  for d in $torch_inc; do inc_flags+=(-I"$d"); done
  for f in csrc/cuda/*.cpp; do
    ${CXX:-g++} -fsyntax-only -std=c++20 "${inc_flags[@]}" -I"$py_inc" -Icsrc -Icsrc/cuda -I"$CUDA_HOME/include" "$f"
    echo "ok  syntax $f (torch headers)"
  done
else
  echo "skip syntax check of csrc/cuda/*.cpp: torch not importable"
fi
