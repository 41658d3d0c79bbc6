#!/usr/bin/env bash
# One GPU session for the runtime: build the extension with CUDA, run the
# CUDA-marked runtime tests (engine, models, layers), then the offline engine
# benchmark on a random-weight LLaVA-OneVision-7B. Outputs go to $OUT.
#   bash benchmarks/gpu_runtime_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/pyvlm_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYVLM_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export PYVLM_CUDA_ARCHS=${PYVLM_CUDA_ARCHS:-90a}
if [ -x /usr/bin/g++ ]; then  # see gpu_session.sh: the image's g++ wrapper crashes on errors
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"; git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
start=$(date +%s)
if ! python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
python3 -m pytest -m cuda -q -p no:cacheprovider -rf -x tests/entrypoints tests/models tests/layers \
  2>&1 | tee "$OUT/pytest_cuda_runtime.log" | tail -25
python3 benchmarks/bench_offline.py --device cuda --model llava-onevision-7b-random \
  --num-requests ${NUM_REQUESTS:-16} --output-len ${OUTPUT_LEN:-64} 2>&1 \
  | grep -v "^\[" | tee "$OUT/bench_offline_cuda.md" | tail -20
