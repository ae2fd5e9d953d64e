#!/usr/bin/env bash
# Train the toy model (the procedural world's text-to-image model) on this machine's CPU, in as many sittings as it
# takes: each call trains TOY_MINUTES more (default 120) and measures the result; the bundled model is the
# checkpoint that travels between machines.
#   bash scripts/toymodel_cpu.sh [RUN]             # RUN: default runs/toymodel-cpu; call again to continue
#   bash scripts/toymodel_cpu.sh --install RUN     # after reading RUN/eval.json: RUN's model becomes the bundled one
# A RUN folder continues from its own checkpoint (RUN/work/diffusion.pt: weights, EMA, optimiser, random state).
# A new RUN starts from the bundled model's UNet and text encoder when they are this world's (128 px; their
# training.json counts the steps so far), else from scratch; the VAE is always the shipped one
# (src/clic_lab/toyworld/assets/vae.safetensors), so the latents and the model stay compatible across sittings.
# TOY_THREADS (default: the CPU count), TOY_EVAL_N (patterned prompts measured, default 120) and TOY_ARGS (more
# options of python -m clic_lab.toyworld.train) tune it.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLED="${TOY_BUNDLED:-src/clic/assets/toymodel}"
if [ "${1:-}" = "--install" ]; then
  run="${2:?--install RUN}"
  [ -f "$run/pipeline/model_index.json" ] && [ -f "$run/eval.json" ] || { echo "$run: no measured pipeline" >&2; exit 2; }
  rm -rf "$BUNDLED.partial" && cp -r "$run/pipeline" "$BUNDLED.partial"
  cp "$run/eval.json" "$run/samples.png" "$run/loss.png" "$BUNDLED.partial/"
  cp "$run/eval/eval_sheet.png" "$BUNDLED.partial/eval_sheet.png"
  rm -rf "$BUNDLED.old" && mv "$BUNDLED" "$BUNDLED.old" && mv "$BUNDLED.partial" "$BUNDLED" && rm -rf "$BUNDLED.old"
  du -sh "$BUNDLED"; exit 0
fi
bash scripts/setup.sh >/dev/null
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=.venv/bin/python
RUN="${1:-runs/toymodel-cpu}"
THREADS="${TOY_THREADS:-$(nproc)}"
init=()
if [ ! -f "$RUN/work/diffusion.pt" ] && "$PY" - "$BUNDLED/training.json" <<'EOF'
import json, sys
raise SystemExit(0 if json.load(open(sys.argv[1]))["config"]["size"] == 128 else 1)
EOF
then
  init=(--init-diffusion "$BUNDLED")
fi
# shellcheck disable=SC2086
"$PY" -m clic_lab.toyworld.train --out "$RUN" --resume --threads "$THREADS" --max-minutes "${TOY_MINUTES:-120}" \
  --init-vae src/clic_lab/toyworld/assets/vae.safetensors --n-scenes 20000 --unet-steps 1000000 --vae-eval-n 100 \
  "${init[@]}" ${TOY_ARGS:-}
"$PY" -m clic_lab.toyworld.train --evaluate "$RUN/pipeline" --n-eval "${TOY_EVAL_N:-120}" --n-plain 24 \
  --threads "$THREADS" --eval-out "$RUN/eval" > "$RUN/eval.json"
"$PY" - "$RUN/eval.json" <<'EOF'
import json, sys
g = json.load(open(sys.argv[1]))["generated"]
print(f"pattern accuracy {g['pattern_accuracy']} {g['pattern_accuracy_ci95']}, colour {g['colour_accuracy']}, "
      f"plain {g['plain_accuracy']}; per pattern {g['per_pattern']}")
EOF
