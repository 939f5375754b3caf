#!/usr/bin/env bash
# Ablation over release_rule on the DepGraph ResNet-56 / CIFAR-10 table (conf/experiment/ablation/depgraph_release_rule.yaml:
# the sweep and its seeds). Two Hydra multiruns: the pretrained and sparse-learning baselines per seed,
# then the sweep, ending in its report with plots/ablation_release_rule.png (experiments/run_table.py).
#   experiments/ablation/depgraph_release_rule.sh [overrides...]     SEEDS=0,1 to change the seeds
#   LAUNCHER="hydra/launcher=slurm hydra.launcher.partition=gpu" experiments/ablation/depgraph_release_rule.sh
#   SMOKE=1 experiments/ablation/depgraph_release_rule.sh            # seconds on a CPU: tiny model, synthetic data
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" experiments/run_table.py ablation/depgraph_release_rule "$@"
