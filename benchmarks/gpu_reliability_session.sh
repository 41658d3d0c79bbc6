#!/usr/bin/env bash
# The reliability issue's GPU runs, in phases that each fit one device call
# (10 minutes). Logs go to $OUT. From the repository root on the GPU machine:
#   bash benchmarks/gpu_reliability_session.sh build        # the CUDA build alone (kept while warm)
#   bash benchmarks/gpu_reliability_session.sh build-test   # CUDA build + pytest -m cuda (whole tree)
#   bash benchmarks/gpu_reliability_session.sh bench        # bench_offline, random LLaVA-OneVision-7B
#   bash benchmarks/gpu_reliability_session.sh soak [s]     # soak through the server, 7B shape
#   bash benchmarks/gpu_reliability_session.sh build-soak [s]  # the build, then the soak
#   bash benchmarks/gpu_reliability_session.sh latency [MODEL...]  # bench_latency_vs_transformers
#   bash benchmarks/gpu_reliability_session.sh build-latency [MODEL...]  # the build, then latency
#   bash benchmarks/gpu_reliability_session.sh e2e [MODEL...]    # bench_e2e_gpu, then host overhead
# latency: MODEL qwen2-vl-7b (default), llava-onevision-7b, llama-3.2-11b-vision, llava-1.5-7b
# and/or llava-next-7b (bench_latency_vs_transformers.py is bench_e2e_gpu.py without its step
# phase, 64 throughput requests: transformers' random model, then pyvlm's server on
# --load-format dummy), ~3 min each for the 7Bs, ~4-5 min estimated for the 11B
# (transformers' batch 64 runs 64 x 4 tiles through its tower at once, or is reported OOM).
# Estimated, not yet run on a GPU: llava-1.5-7b ~2-3 min (Vicuna-7B, 13.2 GB of decoder
# weights, a 607-token prompt, one 577-row CLIP tile per image; its 32 K/V heads make 512 KiB
# of KV per token, 25 GB at transformers' batch 64), llava-next-7b ~3-4 min (Mistral-7B, a
# 2348-token prompt, 5 CLIP tiles per 644x476 image: transformers' batch 64 runs 320 tiles and
# 150k prompt tokens at once, or is reported OOM). One model per device call, after `build`
# when the build is not already there; $LATENCY_FLAGS adds flags (e.g. "--num-requests 256").
# e2e: benchmarks/bench_e2e_gpu.py (issue 12 item 9: TTFT, batch-1 decode, the decode step at 64 x
# ~3k context, 256 requests @ 64 against transformers and the floors, with the targets), one
# MODEL per device call after `build`: estimated ~4 min for qwen2-vl-7b, ~5 for llava-onevision-7b,
# ~6-7 for llama-3.2-11b-vision (killed at $E2E_TIMEOUT, 510 s: the rows print as phases end, so
# e2e_MODEL.md keeps those done; $E2E_FLAGS adds flags, e.g. "--skip transformers" or
# "--hf-batch-sizes 32"). Then, when the e2e JSON was written and $HOST_OVERHEAD is not 0,
# benchmarks/bench_host_overhead.py on MODEL-narrow (CPU, instant runner, ~40 s) against its rates.
# steps: what the slowest steps hold (simulate_steps.py on the real runner, a closed loop of 64,
# the slowest 16 with their place in the run; $STEPS_FLAGS adds server flags), then
# profile_decode.py --throughput 128 (kernels by time; per step kind the device time's
# p50/p90/p99/max and the slowest steps by device time), one MODEL each, ~1.5 min for a 7B.
# tower: benchmarks/kernels/run_tower_attention_sweep.sh (no build needed, ~10 s to compile): the
# wgmma probes, then the sm_90a varlen attention kernel against an fp32 reference and timed next to
# the mma.sync kernel on the towers' shapes. tower-test, after `build`: the varlen and packed
# attention CUDA tests (both kernels, every wgmma form, against float64), then bench_kernels'
# prefill group (the op on the wgmma kernel, form $SM90_FORM, against FlashAttention and cuDNN).
# beside: bench_tower_beside_steps.py, after `build` (the extension makes the green contexts): a
# decode-like step while a tower-like call runs after it, beside it on a lower-priority stream, or
# on a green context of N SMs.
# sweep: benchmarks/kernels/run_paged_decode_sweep.sh (no build needed, ~40 s to compile, well
# under a minute a run) twice: the L2 flushed by a read (the sweep's way since 2026-12-08), then by
# a write (SWEEP_DIRTY_FLUSH=1, the way of the earlier tables), for the A/B of the flush itself.
# first: the next session's first call under one deadline: tower, build, tower-test, beside, the
# decode sweep (read flush), the green-context stream tests. ab, after `build`: 256 @ 64 and TTFT
# through the server for Llama-3.2-Vision (towers on cuDNN, then on the wgmma kernel in the form
# $SM90_FORM names: bn128 by default, or what the tower sweep found fastest) and Qwen2-VL-7B
# (defaults, then the tower on a green context of $SMS SMs, default 32).
# .whl/ holds the orjson wheel (the device image lacks it); .device_photos/ the shared photos.
set -uo pipefail
OUT=${OUT:-/tmp/pyvlm_gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD PYVLM_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export PYVLM_CUDA_ARCHS=${PYVLM_CUDA_ARCHS:-90a}
if [ -x /usr/bin/g++ ]; then  # see gpu_session.sh: the image's g++ wrapper crashes on errors
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null
build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  start=$(date +%s)
  if ! python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -40
    exit 1
  fi
  echo "build: $(( $(date +%s) - start )) s"
}
case "${1:-}" in
  build)
    build
    ;;
  build-test)
    build
    timeout ${TEST_TIMEOUT:-420} python3 -m pytest -m cuda -q -p no:cacheprovider -rf tests 2>&1 \
      | tee "$OUT/pytest_cuda.log" | tail -30
    ;;
  bench)
    python3 benchmarks/bench_offline.py --device cuda --model llava-onevision-7b-random \
      --num-requests ${NUM_REQUESTS:-16} --output-len ${OUTPUT_LEN:-64} --photos .device_photos 2>&1 \
      | grep -v "^\[" | tee "$OUT/bench_offline_cuda.md" | tail -8
    ;;
  build-soak)
    build
    exec bash "$0" soak "${2:-300}"
    ;;
  soak)
    python3 benchmarks/soak.py --serve-random llava-onevision-7b --device cuda \
      --seconds ${2:-300} --concurrency 32 --max-tokens 64 --photos .device_photos \
      --log-dir "$OUT" --json-out "$OUT/soak.json" 2>&1 | tee "$OUT/soak.md" | tail -60
    ;;
  build-latency)
    build
    shift
    exec bash "$0" latency "$@"
    ;;
  latency)
    shift
    for model in "${@:-qwen2-vl-7b}"; do
      timeout ${LATENCY_TIMEOUT:-540} python3 benchmarks/bench_latency_vs_transformers.py \
        --model "$model" --device cuda --photos .device_photos --json-out "$OUT/latency_$model.json" \
        ${LATENCY_FLAGS:-} 2> "$OUT/latency_$model.log" | tee "$OUT/latency_$model.md"
      tail -5 "$OUT/latency_$model.log"
    done
    ;;
  e2e)
    shift
    for model in "${@:-qwen2-vl-7b}"; do
      timeout ${E2E_TIMEOUT:-510} python3 benchmarks/bench_e2e_gpu.py --model "$model" \
        --device cuda --photos .device_photos --json-out "$OUT/e2e_$model.json" ${E2E_FLAGS:-} \
        2> "$OUT/e2e_$model.log" | tee "$OUT/e2e_$model.md"
      tail -5 "$OUT/e2e_$model.log"
      if [ -s "$OUT/e2e_$model.json" ] && [ "${HOST_OVERHEAD:-1}" != 0 ]; then
        timeout ${HOST_TIMEOUT:-75} python3 benchmarks/bench_host_overhead.py \
          --model "$model-narrow" --photos .device_photos --gpu-json "$OUT/e2e_$model.json" \
          --json-out "$OUT/host_$model.json" 2> "$OUT/host_$model.log" | tee "$OUT/host_$model.md"
      fi
    done
    ;;
  steps)
    shift
    for model in "${@:-qwen2-vl-7b}"; do
      timeout ${STEPS_TIMEOUT:-200} python3 benchmarks/simulate_steps.py --device cuda \
        --model "$model" --policy pyvlm --slowest 16 --server-args="${STEPS_FLAGS:-}" \
        > "$OUT/steps_$model.md" 2> "$OUT/steps_$model.log"
      grep -v "^\[" "$OUT/steps_$model.md" | tail -40
      timeout ${STEPS_TIMEOUT:-200} python3 benchmarks/profile_decode.py --model "$model" \
        --batches "" --throughput 128 --photos .device_photos --top 30 \
        > "$OUT/profile_$model.md" 2> "$OUT/profile_$model.log"
      grep -v "^\[" "$OUT/profile_$model.md" | tail -70
    done
    ;;
  beside)
    timeout ${BESIDE_TIMEOUT:-120} python3 benchmarks/bench_tower_beside_steps.py \
      2>&1 | tee "$OUT/tower_beside_steps.md" | tail -12
    ;;
  sweep)
    SWEEP_BIN=/tmp/paged_decode_sweep timeout ${SWEEP_TIMEOUT:-150} \
      bash benchmarks/kernels/run_paged_decode_sweep.sh > "$OUT/sweep_read.md" 2>&1
    grep -E "device|flushed|default plan" "$OUT/sweep_read.md"
    SWEEP_DIRTY_FLUSH=1 timeout ${SWEEP_TIMEOUT:-150} /tmp/paged_decode_sweep \
      > "$OUT/sweep_dirty.md" 2>&1
    grep -E "flushed|default plan" "$OUT/sweep_dirty.md"
    ;;
  tower)
    SWEEP_BIN=/tmp/tower_attention_sweep timeout ${SWEEP_TIMEOUT:-150} \
      bash benchmarks/kernels/run_tower_attention_sweep.sh > "$OUT/tower_sweep.md" 2>&1
    grep -E "^\||device|probes|checks" "$OUT/tower_sweep.md" | grep -v "^|---"
    ;;
  tower-test)
    timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m cuda -q -p no:cacheprovider -rf \
      tests/ops/test_prefill.py tests/layers/test_packed_attention.py 2>&1 \
      | tee "$OUT/pytest_tower.log" | tail -15
    PYVLM_SM90_ATTENTION=${SM90_FORM:-1} timeout ${BENCH_TIMEOUT:-150} \
      python3 benchmarks/bench_kernels.py --device cuda --only prefill \
      2>&1 | tee "$OUT/bench_prefill.md" | grep -E "varlen|TFLOP" | tail -20
    ;;
  first)
    # The next device session's first call, phase by phase under one deadline ($DEADLINE s,
    # default 570): each phase runs only while the time left covers it.
    start=$(date +%s)
    left() { echo $(( ${DEADLINE:-570} - ($(date +%s) - start) )); }
    SWEEP_TIMEOUT=90 bash "$0" tower
    echo "tower sweep done at $(( $(date +%s) - start )) s"
    ls pyvlm/_C.cpython-*.so > /dev/null 2>&1 || bash "$0" build || exit 1
    echo "build done at $(( $(date +%s) - start )) s"
    t=$(left); [ "$t" -gt 100 ] && TEST_TIMEOUT=$(( t < 260 ? t - 60 : 200 )) BENCH_TIMEOUT=80 \
      bash "$0" tower-test
    t=$(left); [ "$t" -gt 90 ] && BESIDE_TIMEOUT=80 bash "$0" beside
    t=$(left); [ "$t" -gt 80 ] && SWEEP_BIN=/tmp/paged_decode_sweep timeout $(( t - 5 )) \
      bash benchmarks/kernels/run_paged_decode_sweep.sh > "$OUT/sweep_read.md" 2>&1
    grep -E "device|flushed|default plan" "$OUT/sweep_read.md" 2>/dev/null
    t=$(left); [ "$t" -gt 60 ] && timeout $(( t - 5 )) python3 -m pytest -m cuda -q \
      -p no:cacheprovider -rfs tests/ops/test_streams.py tests/runner/test_encode_ahead_cuda.py \
      2>&1 | tail -8
    echo "first: done at $(( $(date +%s) - start )) s"
    ;;
  ab)
    # The A/Bs through the server, after `build` (256 @ 64 and TTFT, pyvlm only): Llama-3.2-Vision's
    # towers on cuDNN (default) and on pyvlm's wgmma kernel (PYVLM_PACKED_ATTENTION=wgmma), then
    # Qwen2-VL-7B by default and with its tower on a green context of $SMS SMs beside the steps.
    start=$(date +%s)
    left() { echo $(( ${DEADLINE:-570} - ($(date +%s) - start) )); }
    run_ab() {  # NAME MODEL PACKED_ATTENTION SERVER_ARGS
      local t; t=$(left)
      [ "$t" -lt 100 ] && { echo "skip $1: $t s left"; return; }
      PYVLM_PACKED_ATTENTION=$3 PYVLM_SM90_ATTENTION=${SM90_FORM:-1} \
        timeout $(( t < 200 ? t - 5 : 195 )) python3 \
        benchmarks/bench_e2e_gpu.py --model "$2" --device cuda --photos .device_photos \
        --skip transformers,step,decode --num-ttft 8 --server-args="$4" \
        --json-out "$OUT/ab_$1.json" > "$OUT/ab_$1.log" 2>&1
      echo "== $1 ($2, PYVLM_PACKED_ATTENTION=$3, args: $4) rc=$?"
      grep "^|" "$OUT/ab_$1.log" | grep -v -- "---" | tail -6
    }
    run_ab llama_cudnn llama-3.2-11b-vision "" ""
    run_ab llama_wgmma llama-3.2-11b-vision wgmma ""
    run_ab qwen_defaults qwen2-vl-7b "" ""
    run_ab qwen_sms qwen2-vl-7b "" \
      "--vision-side-stream --vision-encode-ahead --vision-tower-sms ${SMS:-32}"
    ;;
  *) echo "usage: $0 build|build-test|bench|soak|build-soak [seconds]" \
       "| latency|build-latency|e2e|steps [MODEL...] | beside | sweep | tower | tower-test" \
       "| first | ab"
     exit 2 ;;
esac
