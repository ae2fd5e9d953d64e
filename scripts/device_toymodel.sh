#!/usr/bin/env bash
# Retrain the toy model (the procedural world's text-to-image model) on a GPU machine without network access, same
# recipe at GPU scale, in one command of at most 10 minutes; then unpack it here and measure it:
#   here:   bash scripts/device_wheels.sh
#   there:  bash scripts/device_toymodel.sh      (the working tree and .whl/ copied there; output under $OUT)
#   here:   bash scripts/device_toymodel.sh --unpack FILES_AT runs/toymodel-gpu    # FILES_AT: the reply's files_at
#           .venv/bin/python -m clic_lab.toyworld.train --evaluate runs/toymodel-gpu/pipeline   # vs the bundled model
# The pipeline comes back as 6 files: one .tgz per heavy folder, the rest, the reports (training.json, samples,
# loss curve, eval.json and vae-eval.json with their per-image rows) and the log. TOY_MINUTES (default 8) is the training budget; TOY_ARGS adds options.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--unpack" ]; then
  src="${2:?--unpack FILES_AT DEST}"; dest="${3:?--unpack FILES_AT DEST}"
  mkdir -p "$dest/pipeline" && for f in "$src"/*.tgz; do tar xzf "$f" -C "$dest/pipeline"; done
  tar xzf "$src"/report.tgz -C "$dest" && cp "$src"/log.txt "$dest"/
  ls "$dest/pipeline"; exit 0
fi
source scripts/device_env.sh
RUN="${TOY_RUN:-/tmp/toymodel}"
# GPU scale: 8x the batch (a model this small leaves a GPU idle at 32), steps capped by time. The VAE is the one
# trained on the CPU (src/clic_lab/toyworld/assets/vae.safetensors, 128 px, 32x32x4 latents), so the budget goes to
# the UNet: 16 processes render the dataset (~2-3 minutes), the latents are encoded, the UNet trains until
# TOY_MINUTES (default 8) is nearly spent, the decoder is fine-tuned for half a minute, then the sample grid.
VAE="${TOY_VAE:-src/clic_lab/toyworld/assets/vae.safetensors}"
# shellcheck disable=SC2086
"$PY" -m clic_lab.toyworld.train --out "$RUN" --device "${TOY_DEVICE:-cuda}" --threads "${TOY_THREADS:-16}" \
  --max-minutes "${TOY_MINUTES:-8}" --init-vae "$VAE" --vae-eval-n 200 --unet-steps 1000000 --unet-batch 256 \
  --decoder-minutes 0.5 --decoder-batch 64 ${TOY_ARGS:-}
rc=$?
if [ -d "$RUN/pipeline" ]; then
  # measured there, where it takes seconds: text-to-image accuracy per pattern and colour, and the VAE per pattern
  "$PY" -m clic_lab.toyworld.train --evaluate "$RUN/pipeline" --n-eval "${TOY_EVAL_N:-400}" --n-plain 40 \
    --device "${TOY_DEVICE:-cuda}" --eval-out "$RUN/eval" > "$RUN/eval.json"
  "$PY" -m clic_lab.toyworld.train --evaluate-vae "$RUN/pipeline" --n-eval "${TOY_VAE_EVAL_N:-600}" --device "${TOY_DEVICE:-cuda}" \
    > "$RUN/vae-eval.json"
  for d in unet text_encoder vae; do tar czf "$OUT/$d.tgz" -C "$RUN/pipeline" "$d"; done
  (cd "$RUN/pipeline" && tar czf "$OUT/rest.tgz" --exclude unet --exclude text_encoder --exclude vae .)
  (cd "$RUN" && tar czf "$OUT/report.tgz" samples.png loss.png training.json eval.json vae-eval.json eval)
fi
ls -la "$OUT"; exit $rc
