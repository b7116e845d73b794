#!/usr/bin/env bash
# The whole GPU verification in one go (at most about 10 minutes on one H100), results under $OUT
# (default ./gpu_results), at most 8 files:
#   env.txt      torch / CUDA versions and nvidia-smi
#   install.log  the editable build of ryzen_llm._C with the CUDA kernels
#   doctor.log   python -m ryzen_llm.doctor --device cuda
#   tests.log    pytest tests/ops tests/test_convergence.py -k cuda (the CUDA cases; the CUDA
#                graph of level 3 against its eager step)
#   bench.log    benchmarks/bench_cuda.py (fused vs eager vs torch.compile vs SDPA; micro-steps)
#   bench.json   the same numbers, machine-readable
#   train.log    the quick preset on the GPU: baseline (level 0) and optimized (level 4, the
#                default: the int8 linear of csrc/cuda/linear.cu)
#   summary.txt  each step's exit code (0 = passed) and wall time
# Every step runs under a time limit and may fail without stopping the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
# The interpreter that holds the CUDA torch (python3 where no `python` is on the PATH).
PY=${PYTHON:-$(command -v python || command -v python3)}
# Build only for the GPU that is here (halves nvcc time); set it to "8.0;9.0" for both.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export RYZEN_LLM_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: > "$summary"

step() {  # step NAME LIMIT_S LOG COMMAND...
  local name=$1 limit=$2 log=$3
  shift 3
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$OUT/$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc ($((SECONDS - start)) s)$([ "$rc" = 124 ] && echo ' TIMED OUT')" | tee -a "$summary"
}

{
  date -u
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  command -v nvcc && nvcc --version | tail -2
  nvidia-smi
} > "$OUT/env.txt" 2>&1

# --no-deps: the GPU machine has no network; its own CUDA torch must stay (setup.py pins the
# torch it builds against, so an index lookup could only fail or replace it).
# The system compiler: a separately installed GCC in $CXX (the lent H100 had /opt/gcc/bin/g++)
# may link libstdc++ statically into the extension, beside torch's copy (see the README).
step install 200 install.log env CXX="${GPU_CHECK_CXX:-g++}" CC="${GPU_CHECK_CC:-gcc}" \
  $PY -m pip install --no-build-isolation --no-deps -e ".[test]"
step doctor 40 doctor.log $PY -m ryzen_llm.doctor --device cuda
# pytest-xdist where it is installed: a worker that crashes is replaced and the run goes on.
xdist=$($PY -c 'import xdist' 2>/dev/null && echo "-n 4")
step tests 150 tests.log $PY -m pytest tests/ops tests/test_convergence.py -k cuda -q -rfEs \
  --tb=short -p no:cacheprovider $xdist
step bench 170 bench.log $PY benchmarks/bench_cuda.py --json "$OUT/bench.json"
runs=$(mktemp -d)
step train 100 train.log $PY -m ryzen_llm.train --preset quick training.device=cuda --no-progress \
  --output-dir "$runs" --name gpu
for m in "$runs"/gpu/*/metrics.json; do
  [ -f "$m" ] && { echo "--- $m"; $PY -c 'import json,sys; m=json.load(open(sys.argv[1])); [m.pop(k, None) for k in ("step_losses", "grad_norms")]; print(json.dumps(m, indent=1))' "$m"; } >> "$OUT/train.log" 2>&1
done
cat "$summary"
! grep -qv "rc=0" "$summary"
