#!/usr/bin/env bash
# Paper row without published numbers: OTOv2 on ResNet-50 / ImageNet. No pretraining: one sweep.
# Base / +SP / +SR over SEEDS (default 0,1,2) as two Hydra multiruns: pretrained baselines, then the
# pruning sweep (experiments/run_table.py; README there). Config: conf/experiment/paper/otov2_resnet50_imagenet.yaml.
#   SEEDS=0,1,2,3,4 experiments/paper/otov2_resnet50_imagenet.sh [overrides...]
#   LAUNCHER="hydra/launcher=slurm hydra.launcher.partition=gpu" experiments/paper/otov2_resnet50_imagenet.sh
#   SMOKE=1 experiments/paper/otov2_resnet50_imagenet.sh          # seconds on a CPU: tiny model, synthetic data
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" experiments/run_table.py paper/otov2_resnet50_imagenet "$@"
