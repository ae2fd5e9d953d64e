#!/usr/bin/env bash
# Before a run on a GPU machine without network access: put into .whl/ (git-ignored) the wheels its image lacks.
# That image has torch, transformers, accelerate, safetensors, huggingface_hub, tokenizers and numpy (see
# /work/.library/device/KINDS.md) but not diffusers, nor open-clip-torch, whose CLIP BPE vocabulary file our
# offline tokenizer reads (never imported: --no-deps is enough). Versions are the ones in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -E "^$1==" constraints.txt | cut -d' ' -f1; }
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "$(pin diffusers)" "$(pin open_clip_torch)" 2> >(grep -v "^WARNING: Location" >&2)
ls -la .whl
