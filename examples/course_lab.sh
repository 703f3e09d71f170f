#!/usr/bin/env bash
# The course lab's four models on the course layout (train_img.csv, ... with images in data/).
# Run on a GPU; each line is one report figure's curve.
set -euo pipefail
DATA=${1:-data}
retino stats "$DATA"
for arch in resnet18 resnet50; do
  retino train --data "$DATA" --arch "$arch" --pretrained --img-size 512 --epochs 10 --name "$arch-pretrained"
  retino train --data "$DATA" --arch "$arch" --no-pretrained --img-size 512 --epochs 10 --name "$arch-scratch"
done
