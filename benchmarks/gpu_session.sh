#!/usr/bin/env bash
# One GPU session in one command: build the extension with CUDA, run the CUDA
# tests and the kernel benchmark. Logs and tables go to $OUT (the device tool
# brings them back). Usage on the GPU machine, from the repository root:
#   bash benchmarks/gpu_session.sh [pytest args...]
set -uo pipefail
OUT=${OUT:-/tmp/pyvlm_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYVLM_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export PYVLM_CUDA_ARCHS=${PYVLM_CUDA_ARCHS:-90a}
# The image's default g++ wrapper links a libstdc++ that crashes when our error
# messages format integers; the system compiler links the one torch uses.
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
start=$(date +%s)
if ! python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
python3 -m pytest -m cuda -q -p no:cacheprovider -rf "$@" tests 2>&1 | tee "$OUT/pytest_cuda.log" | tail -40
python3 benchmarks/bench_kernels.py --device cuda 2>&1 | tee "$OUT/bench_cuda.md"
