#!/usr/bin/env bash
# On a GPU machine, in one call: CLiC on the SDXL architecture at 1024 px (sdxl-random: SDXL base's configs, random
# weights, made in GPU memory; speed and memory do not depend on the weight values). Measures, most-wanted first:
# learning (median step, then 500 steps in one run, peak memory), transfer (50 DDIM steps, 30 guided; unguided) and
# two-stage generation of one image. The FLOP and memory counts of the same step (BENCHMARKS.md, "SDXL") need no GPU.
#   here:   bash scripts/device_wheels.sh
#   device: bash scripts/device_bench_sdxl.sh                       (with .whl carried; not run on a GPU yet:
#                                                                    ~6 minutes on an H100 if SDXL's step runs at
#                                                                    SD1.4's ~90 TFLOP/s, BENCHMARKS.md)
#   dry:    bash scripts/device_bench_sdxl.sh --dry                 (tiny-sdxl on the CPU, a few steps: the script
#                                                                    end to end in a minute; tests/test_scripts.py)
# Writes $OUT/bench.json (after every section: a run cut short keeps what it measured), $OUT/bench.md (the markdown
# tables for BENCHMARKS.md: `clic bench --report`) and $OUT/log.txt.
# BENCH_DTYPE / BENCH_TIMEOUT / BENCH_WALL_STEPS / PYTHON override the defaults. Sections run in this order: the
# median step, the 500-step run, then transfer and generation; BENCH_WALL_STEPS=0 skips the long run when time is
# short (the median step's 500-step estimate stays).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
source scripts/device_env.sh
LIMIT="${BENCH_TIMEOUT:-540}"
if [ "$DRY" = 1 ]; then
  MODEL=tiny-sdxl; DEVICE=cpu; DTYPE="${BENCH_DTYPE:-fp32}"
  SIZES=(--steps 2 --warmup 1 --wall-steps "${BENCH_WALL_STEPS:-3}" --sampling --sampling-steps 4 --images 1)
else
  MODEL=sdxl-random; DEVICE=cuda; DTYPE="${BENCH_DTYPE:-bf16}"
  SIZES=(--steps 10 --warmup 3 --wall-steps "${BENCH_WALL_STEPS:-500}" --sampling --sampling-steps 50 --images 1)
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # smoke test: the same sections on tiny-sdxl in seconds, so a broken install fails here and not minutes in
  "$PY" -m clic bench --model tiny-sdxl --device "$DEVICE" --steps 2 --warmup 1 --sampling --sampling-steps 4 \
    --images 1 --json "$OUT/smoke.json" > /dev/null || { echo "device_bench_sdxl: smoke test failed"; exit 1; }
  echo "device_bench_sdxl: smoke test passed"
fi
timeout "$LIMIT" "$PY" -m clic bench --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" "${SIZES[@]}" \
  --json "$OUT/bench.json" > /dev/null
rc=$?
[ $rc -eq 0 ] || echo "device_bench_sdxl: the benchmark stopped early (exit $rc); bench.json has the sections it finished"
[ -f "$OUT/bench.json" ] && "$PY" -m clic bench --report "$OUT/bench.json" | tee "$OUT/bench.md"
exit $rc
