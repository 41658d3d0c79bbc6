#!/usr/bin/env bash
# Builds benchmarks/kernels/paged_decode_sweep.cu with nvcc alone (no torch) and runs
# it on the current GPU: a markdown table of every decode plan variant per
# case (time, share of copy bandwidth, max error against an fp32 reference).
# About 40 s to build and well under a minute to run on an H100/H200.
# The binary goes to $SWEEP_BIN (default: a temporary file); extra
# arguments are passed to nvcc (e.g. -lineinfo for a profiler).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${SWEEP_BIN:-$(mktemp -t paged_decode_sweep.XXXXXX)}
nvcc -O3 -std=c++20 --use_fast_math -gencode=arch=compute_90a,code=sm_90a -I csrc "$@" \
  -o "$bin" benchmarks/kernels/paged_decode_sweep.cu
"$bin"
