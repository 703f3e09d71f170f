#!/usr/bin/env bash
# RetinaMNIST (MedMNIST v2, 28 px) from scratch on CPU, selected on its official val split.
# MedMNIST v2 reports ResNet-18 (28): test ACC 0.524, AUC 0.717.
set -euo pipefail
DATA=${1:-../shared/data/retinamnist}
retino stats "$DATA"
retino train --data "$DATA" --arch resnet18 --no-pretrained --img-size 28 --name retinamnist
# the official test split, where the download has one (test/<grade>/*.png); else --split val
retino evaluate runs/retinamnist --split test || retino evaluate runs/retinamnist --split val
retino report runs/retinamnist --out reports/retinamnist
