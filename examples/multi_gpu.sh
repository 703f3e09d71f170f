#!/usr/bin/env bash
# DistributedDataParallel on every GPU of one machine: --batch-size is per GPU, validation is
# gathered across ranks, rank 0 writes the run folder. Then evaluate on one GPU as usual.
set -euo pipefail
DATA=${1:-data}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
torchrun --standalone --nproc_per_node "$GPUS" -m retinocli train --data "$DATA" \
  --arch resnet50 --pretrained --img-size 512 --preprocess crop --epochs 10 --batch-size 64 --name ddp-r50
retino evaluate runs/ddp-r50 --split test
retino report runs/ddp-r50 --out reports/ddp-r50
