#!/usr/bin/env bash
# On a GPU machine without network access, in one command: the speed a user feels in fresh processes (SD1.4 architecture,
# random init, bf16 frozen weights, 512 px, batch 1), then optionally `clic bench` sections.
#   here:   bash scripts/device_wheels.sh
#   there:  bash scripts/device_bench.sh      (the working tree and .whl/ copied there; output under $OUT; ~560 s)
# What it does (~6 minutes on an H100):
#   1. a smoke test on the tiny model (a broken install fails here, in seconds);
#   2. `clic make-model sd14-random` into a local folder, bf16 (untimed; the fresh processes load from it);
#   3. for each --cuda-graphs value of BENCH_FRESH (default: capture off auto), one fresh process of
#      scripts/fresh_process.py: import, model load (split), time to the first step, capture, 500 steps to the saved
#      concept, the steady step, peak memory, and (capture only) two guided transfers (50 DDIM steps, 30 guided)
#      through the captured loop, then one through the plain loop (its time; the largest latent difference).
#      $OUT/fresh-<value>.json each; the same seed gives each the same draws, so their loss_first / loss_last
#      compare the paths (capture vs off: the eager fp32-master path);
#   4. BENCH_ARGS, if given: `clic bench` with them ($OUT/bench.json, $OUT/bench.md), e.g.
#      BENCH_ARGS="--steps 20 --lever capture --lever eager --sampling".
# BENCH_FRESH / BENCH_STEPS / BENCH_MODEL / BENCH_DEVICE / BENCH_DTYPE / BENCH_ARGS / BENCH_TIMEOUT / PYTHON override
# the defaults (a CPU dry run: PYTHON=.venv/bin/python BENCH_MODEL=tiny BENCH_DEVICE=cpu BENCH_DTYPE=fp32
# BENCH_STEPS=4 OUT=/tmp/dry bash scripts/device_bench.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh
KIND="${BENCH_MODEL:-sd14-random}"; DEVICE="${BENCH_DEVICE:-cuda}"; DTYPE="${BENCH_DTYPE:-bf16}"
STEPS="${BENCH_STEPS:-500}"; LIMIT="${BENCH_TIMEOUT:-200}"; FRESH="${BENCH_FRESH-capture off auto}"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" - <<'PY' || { echo "device_bench: clic does not import (carry .whl: bash scripts/device_wheels.sh)"; exit 1; }
import importlib.metadata as md
import torch
import clic.builder
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())
print({p: md.version(p) for p in ("diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub")})
print("CLIP vocabulary:", clic.builder.find_bpe_vocab())
PY
# smoke test: learning (the whole step captured too) and a transfer on the tiny model in seconds
"$PY" -m clic bench --model tiny --device "$DEVICE" --steps 2 --warmup 1 --sampling --sampling-steps 4 \
  --images 2 --lever capture --json "$OUT/smoke.json" > /dev/null || { echo "device_bench: smoke test failed"; exit 1; }
echo "device_bench: smoke test passed"
MODEL_DIR="${TMPDIR:-/tmp}/clic-bench-$KIND-$DTYPE"
[ -f "$MODEL_DIR/model_index.json" ] || "$PY" -m clic make-model "$KIND" "$MODEL_DIR" --dtype "$DTYPE" > /dev/null \
  || { echo "device_bench: make-model $KIND failed"; exit 1; }
echo "device_bench: model folder $MODEL_DIR ($(du -sh "$MODEL_DIR" | cut -f1))"
sync; rc=0
for graphs in $FRESH; do
  extra=""; [ "$graphs" = capture ] && extra="--transfer"
  # shellcheck disable=SC2086
  timeout "$LIMIT" "$PY" scripts/fresh_process.py --model "$MODEL_DIR" --device "$DEVICE" --dtype "$DTYPE" \
    --steps "$STEPS" --cuda-graphs "$graphs" $extra --json "$OUT/fresh-$graphs.json" > /dev/null
  r=$?; [ $r -eq 0 ] || { echo "device_bench: fresh process --cuda-graphs $graphs stopped (exit $r)"; rc=$r; }
  [ -f "$OUT/fresh-$graphs.json" ] && "$PY" - "$OUT/fresh-$graphs.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
L, imp, load = r["learning"], r["import"], r["load"]
print(f"--cuda-graphs {L['cuda_graphs']}: import {imp['torch_s'] + imp['clic_s']:.1f} s, load {load['total_s']:.2f} s "
      f"{ {k: v for k, v in load.items() if k != 'total_s'} }, to first step {L['to_first_step_s']:.2f} s, first step "
      f"{L['first_step_s']:.2f} s, capture {L['capture_s']} s, steady step {L['steady_step_s']} s, "
      f"{L['steps']} steps to the saved concept {L['wall_s']:.2f} s, peak {r['peak_memory_gib']}, "
      f"loss first/last {L['loss_first']:.6f} / {L['loss_last']:.6f}, transfer {r.get('transfer')}")
PY
done
if [ -n "${BENCH_ARGS:-}" ]; then
  # shellcheck disable=SC2086
  timeout "${BENCH_ARGS_TIMEOUT:-300}" "$PY" -m clic bench --model "$KIND" --device "$DEVICE" --dtype "$DTYPE" \
    $BENCH_ARGS --json "$OUT/bench.json" > /dev/null
  r=$?; [ $r -eq 0 ] || { echo "device_bench: the benchmark stopped early (exit $r)"; rc=$r; }
  [ -f "$OUT/bench.json" ] && "$PY" -m clic bench --report "$OUT/bench.json" | tee "$OUT/bench.md"
fi
exit $rc
