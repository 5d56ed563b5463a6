#!/usr/bin/env bash
# One command that measures everything a GPU is needed for (GPU tests, throughput ratios, compile gain, CUDA re-ID
# evaluation) in under 8 minutes on one H100, and writes one JSON: $OUT/gpu_check.json when $OUT is set, else
# --out PATH (default ./gpu_check.json). Steps and options: benchmarks/gpu_check.py; --cpu checks it on a CPU.
#
#   bash benchmarks/gpu_check.sh [--cpu] [--out PATH] [--budget-s 450] [--steps env,gpu_tests,...]
#
# Packages the GPU machine lacks travel as wheels in .whl/ (made here by benchmarks/gpu_wheels.sh); when that folder
# holds any they are installed into a private folder first, ahead of the machine's own packages.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  site=${TMPDIR:-/tmp}/vistrain-gpu-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || echo "[gpu_check] installing the carried wheels failed; going on with the machine's packages" >&2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
