#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu to an object with nvcc against the installed torch headers
# (sm_80 and sm_90), so a broken CUDA file fails CI on machines without a GPU. Skips, saying so,
# where nvcc is absent or there is nothing to compile.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "no CUDA sources in csrc/cuda: nothing to compile"
  exit 0
fi
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "SKIPPED: nvcc not found; ${#sources[@]} CUDA file(s) were not compile-checked"
  exit 0
fi
includes=$(python -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))')
pyinc=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
out=build/cuda-check
mkdir -p "$out"
compile_one() {  # one .cu -> build/cuda-check/<name>.o; nvcc's --threads splits the two targets
  echo "nvcc $1"
  "$NVCC" -c "$1" -o "$out/$(basename "$1" .cu).o" -std=c++17 -O2 --threads 2 \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Icsrc $includes -I"$pyinc" -Iscripts/cuda_check_shim -DRYZEN_LLM_CUDA --expt-relaxed-constexpr \
    -diag-suppress 3306 -Xcompiler -Wno-c++20-extensions \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
}
export -f compile_one
export NVCC includes pyinc out
# Two files at a time (the machines here have 2 cores); any failure fails the script.
printf '%s\0' "${sources[@]}" | xargs -0 -n 1 -P 2 bash -c 'compile_one "$0"'
echo "compiled ${#sources[@]} CUDA file(s) for sm_80 and sm_90"
