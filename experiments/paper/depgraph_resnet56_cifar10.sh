#!/usr/bin/env bash
# Paper table: DepGraph on ResNet-56 / CIFAR-10 with sparse learning (paper: 93.84 / 93.96 / 94.13 %).
# Base / +SP / +SR over SEEDS (default 0,1,2) as two Hydra multiruns: pretrained baselines, then the
# pruning sweep (experiments/run_table.py; README there). Config: conf/experiment/paper/depgraph_resnet56_cifar10.yaml.
#   SEEDS=0,1,2,3,4 experiments/paper/depgraph_resnet56_cifar10.sh [overrides...]
#   LAUNCHER="hydra/launcher=slurm hydra.launcher.partition=gpu" experiments/paper/depgraph_resnet56_cifar10.sh
#   SMOKE=1 experiments/paper/depgraph_resnet56_cifar10.sh          # seconds on a CPU: tiny model, synthetic data
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" experiments/run_table.py paper/depgraph_resnet56_cifar10 "$@"
