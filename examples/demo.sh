#!/usr/bin/env bash
# The demo end to end on built-in procedural data (what `make demo` runs), CPU is enough.
set -euo pipefail
retino synth demo/data --n 400 --size 128 --seed 0 --force
retino stats demo/data --plot reports/demo-balance.png --force
retino train --data demo/data --img-size 64 --epochs 8 --batch-size 32 --project demo/runs
