#!/usr/bin/env bash
# Builds benchmarks/kernels/tower_attention_sweep.cu with nvcc alone (no torch)
# and runs it on the current GPU: the wgmma probes, then each case's rows
# (mma.sync kernel, sm90 kernel per key-tile width): time, TFLOP/s and max
# error against an fp32 reference. The binary goes to $SWEEP_BIN (default: a
# temporary file); extra arguments are passed to nvcc (e.g. -Xptxas -v).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${SWEEP_BIN:-$(mktemp -t tower_attention_sweep.XXXXXX)}
nvcc -O3 -std=c++20 --use_fast_math --expt-relaxed-constexpr \
  -gencode=arch=compute_90a,code=sm_90a -I csrc "$@" \
  -o "$bin" benchmarks/kernels/tower_attention_sweep.cu
"$bin"
