#!/usr/bin/env bash
# Kaggle 2015 EyePACS (trainLabels.csv + train/, testLabels.csv + test/) at 512 px on one GPU.
# Cropping to the fundus once per image is the expensive part of a 4k photo; bf16 autocast and
# channels_last are on by default on CUDA.
set -euo pipefail
DATA=${1:-../kaggle}
retino stats "$DATA"
retino train --data "$DATA" --arch resnet50 --pretrained --img-size 512 --preprocess crop \
  --augment strong --epochs 15 --batch-size 64 --patience 4 --name eyepacs-r50
retino evaluate runs/eyepacs-r50 --split test --tta      # 8-view test-time augmentation
retino report runs/eyepacs-r50 --out reports/eyepacs-r50
retino export runs/eyepacs-r50 --fp16                    # runs/eyepacs-r50/model-fp16.onnx
retino predict "$DATA/test" --model runs/eyepacs-r50/model-fp16.onnx --provider cuda --batch-size 64
