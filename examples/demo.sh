#!/usr/bin/env bash
# The demo end to end on built-in procedural data (what `make demo` runs); CPU is enough.
set -euo pipefail
retino synth demo/data --n 400 --size 128 --seed 0 --force
retino stats demo/data --plot reports/demo-balance.png --force
retino train --data demo/data --img-size 64 --epochs 8 --batch-size 32 --project demo/runs --name train --force
retino evaluate demo/runs/train --split test --force          # confusion table, clinical metrics
retino report demo/runs/train --out reports/demo --force      # figures + report.md
retino export demo/runs/train --force                         # demo/runs/train/model.onnx
retino predict demo/data/test --model demo/runs/train/model.onnx --out demo/predictions.csv --force
