#!/usr/bin/env bash
# Paper row without published numbers: DepGraph on VGG-19-BN / CIFAR-100 (8.84x, with sparse learning).
# Base / +SP / +SR over SEEDS (default 0,1,2) as two Hydra multiruns: pretrained baselines, then the
# pruning sweep (experiments/run_table.py; README there). Config: conf/experiment/paper/depgraph_vgg19_cifar100.yaml.
#   SEEDS=0,1,2,3,4 experiments/paper/depgraph_vgg19_cifar100.sh [overrides...]
#   LAUNCHER="hydra/launcher=slurm hydra.launcher.partition=gpu" experiments/paper/depgraph_vgg19_cifar100.sh
#   SMOKE=1 experiments/paper/depgraph_vgg19_cifar100.sh          # seconds on a CPU: tiny model, synthetic data
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" experiments/run_table.py paper/depgraph_vgg19_cifar100 "$@"
