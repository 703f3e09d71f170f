#!/usr/bin/env bash
# One GPU session's checks for issue #16 (and the CUDA paths nobody had run), in one call each:
#
#   bash scripts/device_check.sh full       (the first call of a session)
#     1. retino bench on the GPU alone (data rows per augmentation preset, GPU decode, synthetic
#        training steps, the real input pipeline feeding them), --json;
#     2. then together: the augmentation-equivalence and CUDA tests, the recipes' three seeds
#        with augmentation on the device and in the workers (RetinaMNIST and EyePACS-256), and
#        one end-to-end run with --decode gpu (train, evaluate, explain, export, predict).
#   bash scripts/device_check.sh followup   (a second call)
#     1. alone: the batched augmentation by itself with its profile (scripts/gpu_augment_speed.py)
#        and ResNet18 training with torch.compile at batch 256;
#     2. together: --decode gpu end to end and one EyePACS-256 recipe seed per augmentation path.
#
# Everything lands in $OUT: env.txt, bench*.json, augment.jsonl, profile-*.txt, pytest.log,
# runs.tgz (json/csv/md of every run, no weights), logs.tgz.
# Where: DATA=folder holding retinamnist/ and eyepacs-256/ (default .devdata, carried); wheels
# the machine lacks in .whl (torchcam); DRY=1 shrinks everything for a CPU rehearsal.
set -u
MODE=${1:-full}
OUT=${OUT:-/tmp/device-out}
DATA=${DATA:-.devdata}
DRY=${DRY:-0}
PY=${PY:-python3}
mkdir -p "$OUT" logs
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/env.txt"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc
  "$PY" -c "import torch, torchvision, sys; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
} >>"$OUT/env.txt" 2>&1

if [ "$DRY" = 1 ]; then
  BENCH=(--quick); EP=(--epochs 1); RM=(--epochs 1); SEEDS=0; E2E=(--epochs 1 --img-size 64); T=()
  TESTS=(tests/test_jpeg_decode.py); DEC=cpu; AUG=(--batches 4 --size 64 --seconds 0.2); B18=(--quick)
else
  BENCH=(--min-seconds 1.5); EP=(); RM=(); SEEDS=0,1,2; E2E=(--epochs 3 --img-size 256); T=(--timeout 150)
  TESTS=(tests/test_jpeg_decode.py tests/test_augment.py tests/test_augment_equivalence.py tests/test_train.py
         tests/test_explain.py tests/test_evaluate.py tests/test_seeds.py tests/test_machine.py tests/test_bench.py)
  DEC=gpu; AUG=(); B18=(--arch resnet18 --batch-size 256 --min-seconds 1.5)
fi

recipe() {  # name, seed, train seconds, config, data, extra...: one seed in its own process, then its val numbers
  local name=$1 seed=$2 limit=$3 cfg=$4 data=$5; shift 5
  timeout "$limit" "$PY" -m retinocli train --config "$cfg" --data "$data" --seeds "$seed" --name "$name" \
    --project runs "$@" >"logs/$name-s$seed.out" 2>"logs/$name-s$seed.err"
  echo "$name-s$seed rc=$?" >>logs/rc.txt
  timeout 40 "$PY" -m retinocli evaluate "runs/$name-s$seed" --split val --json --bootstrap 200 \
    >"logs/$name-s$seed-val.json" 2>>"logs/$name-s$seed.err"
}
end_to_end() {  # train with --decode gpu, then every command on its run
  set -x
  timeout 110 "$PY" -m retinocli train --data "$DATA/eyepacs-256" --decode "$DEC" --augment-on device --workers "$1" \
    "${E2E[@]}" --name e2e --project runs --json
  timeout 30 "$PY" -m retinocli evaluate runs/e2e --split val --json
  ls "$DATA"/eyepacs-256/train | head -8 | sed "s|^|$DATA/eyepacs-256/train/|" \
    | xargs timeout 30 "$PY" -m retinocli explain runs/e2e --out runs/e2e/explain --json
  timeout 30 "$PY" -m retinocli export runs/e2e --json
  timeout 40 "$PY" -m retinocli predict "$DATA/eyepacs-256/train" --model runs/e2e/model.onnx --out runs/e2e/pred.csv \
    --provider cpu
  head -3 runs/e2e/pred.csv
}

if [ "$MODE" = full ]; then
  stamp "bench"
  timeout 150 "$PY" -m retinocli bench --only data,train,pipeline --json "${BENCH[@]}" >"$OUT/bench.json" 2>logs/bench.err
  stamp "bench rc=$?"
  for seed in ${SEEDS//,/ }; do
    recipe rm-device "$seed" 200 examples/recipes/retinamnist.toml "$DATA/retinamnist" --workers 1 "${RM[@]}" &
    recipe rm-workers "$seed" 200 examples/recipes/retinamnist.toml "$DATA/retinamnist" --augment-on workers --workers 1 "${RM[@]}" &
    recipe ep-device "$seed" 200 examples/recipes/eyepacs-256.toml "$DATA/eyepacs-256" --workers 2 "${EP[@]}" &
    recipe ep-workers "$seed" 200 examples/recipes/eyepacs-256.toml "$DATA/eyepacs-256" --augment-on workers --workers 2 "${EP[@]}" &
  done
  end_to_end 4 >logs/e2e.out 2>logs/e2e.err &
  timeout 220 "$PY" -m pytest -q -rfE -p no:cacheprovider -n 3 "${T[@]}" "${TESTS[@]}" >"$OUT/pytest.log" 2>&1
  stamp "pytest rc=$?"
else
  stamp augment
  timeout 60 "$PY" scripts/gpu_augment_speed.py --out "$OUT" "${AUG[@]}" >"$OUT/augment.jsonl" 2>logs/augment.err
  stamp "augment rc=$?"
  timeout 80 "$PY" -m retinocli bench --only train --compile --json "${B18[@]}" >"$OUT/bench-compile.json" 2>logs/bench-compile.err
  stamp "compile rc=$?"
  for path in device workers; do
    recipe "ep-$path" 0 230 examples/recipes/eyepacs-256.toml "$DATA/eyepacs-256" --augment-on "$path" --workers 6 "${EP[@]}" &
  done
  ( end_to_end 3 ) >logs/e2e.out 2>logs/e2e.err
fi
wait
stamp "all done"
find runs -type f \( -name '*.json' -o -name '*.csv' -o -name '*.md' -o -name '*.txt' -o -name '*.log' \) -print0 \
  | tar -czf "$OUT/runs.tgz" --null -T -
tar -czf "$OUT/logs.tgz" logs
nvidia-smi --query-gpu=memory.used --format=csv >>"$OUT/env.txt" 2>&1
