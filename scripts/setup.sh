#!/usr/bin/env bash
# Create .venv and install clic with everything it needs (idempotent; fast when already done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first, pinned: on our machines this resolves to the CPU build on local disk; anywhere else pip picks a
# build for your platform (set TORCH_SPEC to choose another, e.g. TORCH_SPEC="torch" for the latest).
"${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
# open-clip-torch only for its CLIP BPE vocabulary file (the offline tokenizer); --no-deps keeps torchvision out.
"${PIP[@]}" --no-deps "open_clip_torch==3.3.0"
"${PIP[@]}" -c constraints.txt -e ".[test,ui]"
