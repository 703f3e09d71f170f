#!/usr/bin/env bash
# Every CUDA path of retino, run once, and its speed measured: scripts/gpu_check.py OUTDIR [options].
# On a bare GPU machine (python3 with torch, no internet): installs retino without dependencies,
# and any wheels carried in .whl/, then runs the checks. Dry run on a CPU:
#   scripts/gpu-check.sh /tmp/gpu-dry --device cpu --tiny
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: scripts/gpu-check.sh OUTDIR [--device cuda] [--data gpu-data] [--tiny] [--budget SECONDS]" >&2
  exit 2
fi
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/retino-site .whl/*.whl \
    && export PYTHONPATH=/tmp/retino-site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import retinocli" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . \
  || echo "note: pip could not install retino; running it from the checkout (PYTHONPATH)" >&2
exec $PY scripts/gpu_check.py "$@"
