#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the offline demo (CPU, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/clic demo --out "${1:-out/demo}"
