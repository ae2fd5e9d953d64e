# Sourced by the device_*.sh scripts on the GPU machine: OUT, PY, a log in $OUT/log.txt, and clic importable
# (the wheels carried in .whl/ installed into /tmp/clic-site, src/ on PYTHONPATH).
OUT="${OUT:-out/device}"; mkdir -p "$OUT"; PY="${PYTHON:-python3}"
exec > >(tee "$OUT/log.txt") 2>&1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/clic-site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH="/tmp/clic-site:$PWD/src"
else
  export PYTHONPATH="$PWD/src"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# what torch.compile did and why (recompilations, graphs kept off CUDA graphs) goes to the log
export TORCH_LOGS="${TORCH_LOGS-recompiles,cudagraphs}"
