#!/usr/bin/env bash
# On the GPU machine, in one device-tool call: issue 7's measurement (speed and memory, SD1.4 architecture).
#   here:   bash scripts/device_wheels.sh
#   device: run(command="bash scripts/device_bench.sh", carry=[".whl"], timeout_s=580)
# Writes $OUT/bench.json (after every section: a run cut short keeps what it measured), $OUT/bench.md (the
# markdown tables for BENCHMARKS.md: `clic bench --report`) and $OUT/log.txt. Budget: ~1 min of smoke test and
# model build, then the sections most-wanted first; torch.compile (the last lever) takes the longest.
# BENCH_MODEL / BENCH_DEVICE / BENCH_DTYPE / BENCH_ARGS / BENCH_TIMEOUT / PYTHON override the defaults (a CPU dry run of this script:
# PYTHON=.venv/bin/python BENCH_MODEL=tiny BENCH_DEVICE=cpu BENCH_DTYPE=fp32 OUT=/tmp/dry bash scripts/device_bench.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh
MODEL="${BENCH_MODEL:-sd14-random}"; DEVICE="${BENCH_DEVICE:-cuda}"
DTYPE="${BENCH_DTYPE:-bf16}"; LIMIT="${BENCH_TIMEOUT:-520}"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" - <<'PY' || { echo "device_bench: clic does not import (carry .whl: bash scripts/device_wheels.sh)"; exit 1; }
import importlib.metadata as md
import torch
import clic.builder
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())
print({p: md.version(p) for p in ("diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub")})
print("CLIP vocabulary:", clic.builder.find_bpe_vocab())
PY
# smoke test: every section on the tiny model in seconds, so a broken install fails here and not minutes in
"$PY" -m clic bench --model tiny --device "$DEVICE" --steps 2 --warmup 1 --sampling --sampling-steps 4 \
  --images 2 --flops --json "$OUT/smoke.json" > /dev/null || { echo "device_bench: smoke test failed"; exit 1; }
echo "device_bench: smoke test passed"
# BENCH_ARGS: the sections. Default: what the next lease most needs (BENCHMARKS.md): the fast path (the defaults:
# CUDA graphs on a GPU), a measured 500-step run, transfer and generation, the profile (eager and with graphs), the
# reference, the eager step as a lever (what the graphs gain; its first loss checks they compute the same), then
# Inductor's CUDA graphs (a ~2-minute compile; 500 steps with it if it pays): ~5.5 minutes on an H100 (h100-run2's
# sections). The UNet compiled for sampling too: add --sampling-compile cudagraphs. Every section (FLOP and memory
# counts, all levers): BENCH_ARGS="--all --wall-steps 500 --tensor-memory" (over 10 minutes with the compiles).
DEFAULT_ARGS="--reference --sampling --profile --wall-steps 500 --lever eager --lever compile-cudagraphs"
# shellcheck disable=SC2086
timeout "$LIMIT" "$PY" -m clic bench --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
  ${BENCH_ARGS:-$DEFAULT_ARGS} --json "$OUT/bench.json" > /dev/null
rc=$?
[ $rc -eq 0 ] || echo "device_bench: the benchmark stopped early (exit $rc); bench.json has the sections it finished"
[ -f "$OUT/bench.json" ] && "$PY" -m clic bench --report "$OUT/bench.json" | tee "$OUT/bench.md"
exit $rc
