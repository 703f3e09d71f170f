#!/usr/bin/env bash
# The second GPU call of a session (after scripts/device_check.sh): the batched augmentation
# alone with its profile, ResNet18 training with torch.compile, then --decode gpu end to end
# (the nvJPEG stream fix) beside one EyePACS-256 recipe seed per augmentation path.
set -u
OUT=${OUT:-/tmp/device-out}; DATA=${DATA:-.devdata}; DRY=${DRY:-0}; PY=${PY:-python3}
mkdir -p "$OUT" logs
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/times.txt"; }
if [ "$DRY" = 1 ]; then
  AUG=(--batches 4 --size 64 --seconds 0.2); B18=(--quick); EP=(--epochs 1); E2E=(--epochs 1 --img-size 64); DEC=cpu
else
  AUG=(); B18=(--arch resnet18 --batch-size 256 --min-seconds 1.5); EP=(); E2E=(--epochs 3 --img-size 256); DEC=gpu
fi
stamp augment
timeout 60 "$PY" scripts/gpu_augment_speed.py --out "$OUT" "${AUG[@]}" >"$OUT/augment.jsonl" 2>logs/augment.err
stamp "augment rc=$?"
timeout 80 "$PY" -m retinocli bench --only train --compile --json "${B18[@]}" >"$OUT/bench-compile.json" 2>logs/bench-compile.err
stamp "compile rc=$?"
for path in device workers; do
  ( timeout 230 "$PY" -m retinocli train --config examples/recipes/eyepacs-256.toml --data "$DATA/eyepacs-256" \
      --seeds 0 --name "ep-$path" --augment-on "$path" --workers 6 --project runs "${EP[@]}" >"logs/ep-$path.out" 2>"logs/ep-$path.err"
    echo "ep-$path rc=$?" >>logs/rc.txt
    timeout 30 "$PY" -m retinocli evaluate "runs/ep-$path-s0" --split val --json --bootstrap 200 >"logs/ep-$path-val.json" 2>>"logs/ep-$path.err" ) &
done
(
  set -x
  timeout 110 "$PY" -m retinocli train --data "$DATA/eyepacs-256" --decode "$DEC" --augment-on device --workers 3 "${E2E[@]}" \
    --name e2e --project runs --json
  timeout 30 "$PY" -m retinocli evaluate runs/e2e --split val --json
  ls "$DATA"/eyepacs-256/train | head -8 | sed "s|^|$DATA/eyepacs-256/train/|" | xargs timeout 30 "$PY" -m retinocli explain runs/e2e --out runs/e2e/explain --json
  timeout 30 "$PY" -m retinocli export runs/e2e --json
  timeout 40 "$PY" -m retinocli predict "$DATA/eyepacs-256/train" --model runs/e2e/model.onnx --out runs/e2e/pred.csv --provider cpu
  head -3 runs/e2e/pred.csv
) >logs/e2e.out 2>logs/e2e.err
stamp "e2e done"
wait
stamp "all done"
find runs -type f \( -name '*.json' -o -name '*.csv' -o -name '*.md' -o -name '*.txt' \) -print0 | tar -czf "$OUT/runs.tgz" --null -T -
tar -czf "$OUT/logs.tgz" logs
