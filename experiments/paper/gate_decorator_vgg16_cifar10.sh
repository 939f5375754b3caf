#!/usr/bin/env bash
# Paper table: Gate Decorator on VGG16 / CIFAR-10 (paper: 91.50 / 91.58 / 91.74 %).
# Base / +SP / +SR over SEEDS (default 0,1,2) as two Hydra multiruns: pretrained baselines, then the
# pruning sweep (experiments/run_table.py; README there). Config: conf/experiment/paper/gate_decorator_vgg16_cifar10.yaml.
#   SEEDS=0,1,2,3,4 experiments/paper/gate_decorator_vgg16_cifar10.sh [overrides...]
#   LAUNCHER="hydra/launcher=slurm hydra.launcher.partition=gpu" experiments/paper/gate_decorator_vgg16_cifar10.sh
#   SMOKE=1 experiments/paper/gate_decorator_vgg16_cifar10.sh          # seconds on a CPU: tiny model, synthetic data
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" experiments/run_table.py paper/gate_decorator_vgg16_cifar10 "$@"
