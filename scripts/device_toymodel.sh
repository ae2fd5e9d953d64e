#!/usr/bin/env bash
# Retrain the toy model (the procedural world's text-to-image model) on the lent GPU machine, same recipe at GPU
# scale, in one device-tool call; then unpack it here and measure it:
#   here:   bash scripts/device_wheels.sh
#   device: run(command="bash scripts/device_toymodel.sh", carry=[".whl"], timeout_s=600)
#   here:   bash scripts/device_toymodel.sh --unpack FILES_AT runs/toymodel-gpu    # FILES_AT: the reply's files_at
#           .venv/bin/python -m clic_lab.toyworld.train --evaluate runs/toymodel-gpu/pipeline   # vs the bundled model
# The pipeline comes back as at most 8 files (the device tool's limit): one .tgz per heavy folder, the rest, and
# the training report, sample grid and log. TOY_MINUTES (default 5) is the training budget; TOY_ARGS adds options.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--unpack" ]; then
  src="${2:?--unpack FILES_AT DEST}"; dest="${3:?--unpack FILES_AT DEST}"
  mkdir -p "$dest/pipeline" && for f in "$src"/*.tgz; do tar xzf "$f" -C "$dest/pipeline"; done
  cp "$src"/samples.png "$src"/loss.png "$src"/training.json "$src"/log.txt "$dest"/ 2>/dev/null
  ls "$dest/pipeline"; exit 0
fi
source scripts/device_env.sh
RUN="${TOY_RUN:-/tmp/toymodel}"
# GPU scale: 8x the batch (a model this small leaves a GPU idle at 32), steps capped by time; 16 processes render
# the dataset, the VAE gets 1 minute, the decoder half a minute, the UNet the rest (~3 minutes of the default 5)
# shellcheck disable=SC2086
"$PY" -m clic_lab.toyworld.train --out "$RUN" --device "${TOY_DEVICE:-cuda}" --threads "${TOY_THREADS:-16}" \
  --max-minutes "${TOY_MINUTES:-5}" --vae-minutes 1 --vae-steps 20000 --unet-steps 1000000 --unet-batch 256 \
  --decoder-minutes 0.5 ${TOY_ARGS:-}
rc=$?
if [ -d "$RUN/pipeline" ]; then
  for d in unet text_encoder vae; do tar czf "$OUT/$d.tgz" -C "$RUN/pipeline" "$d"; done
  (cd "$RUN/pipeline" && tar czf "$OUT/rest.tgz" --exclude unet --exclude text_encoder --exclude vae .)
  cp "$RUN"/samples.png "$RUN"/loss.png "$RUN"/training.json "$OUT"/ 2>/dev/null
fi
ls -la "$OUT"; exit $rc
