#!/usr/bin/env bash
# Ablation over T_rate on the DepGraph ResNet-56 / CIFAR-10 table (conf/experiment/ablation/depgraph_T_rate.yaml:
# the sweep and its seeds). Two Hydra multiruns: the pretrained and sparse-learning baselines per seed,
# then the sweep, ending in its report with plots/ablation_T_rate.png (experiments/run_table.py).
#   experiments/ablation/depgraph_T_rate.sh [overrides...]     SEEDS=0,1 to change the seeds
#   LAUNCHER="hydra/launcher=slurm hydra.launcher.partition=gpu" experiments/ablation/depgraph_T_rate.sh
#   SMOKE=1 experiments/ablation/depgraph_T_rate.sh            # seconds on a CPU: tiny model, synthetic data
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" experiments/run_table.py ablation/depgraph_T_rate "$@"
