#!/usr/bin/env bash
# The GPU check for the first GPU this project is lent (15 minutes at a time; this takes <= 8 on one
# H100-class GPU). From the repository root, with the suite installed (README "Quickstart"):
#
#   bash experiments/benchmarks/gpu_check.sh            # on the GPU: writes results/benchmarks/*_cuda.*
#   bash experiments/benchmarks/gpu_check.sh --dry-run  # the same steps on CPU with tiny sizes (CI runs it)
#
# Steps, each printed as it starts:
#   1. the CUDA tests (tests/test_cuda.py and the CUDA fast-path test);
#   2. experiments/benchmarks/throughput.py on CUDA (suite vs a plain torchvision loop, and the
#      DPM controller overhead against the fast step);
#   3. experiments/benchmarks/core_overhead.py on CUDA (batches 128 and 32, with and without SR);
#   4. one pretrain and one fine-tune epoch of each paper model (ResNet-56, VGG-16-BN, VGG-16) at
#      CIFAR-10 size, timed by the suite itself (metrics.json history[].epoch_time_s), gathered in
#      epoch_times_cuda.json: the measured epoch times that replace experiments/README.md's assumed ones.
#      The data are synthetic images of CIFAR-10's size (50,000 train, 10,000 test, augmented on the
#      device): the GPU machine cannot reach the real copy, and an epoch's cost does not depend on
#      the pixels. The fine-tune epoch trains the unpruned model (pruner=none): an upper bound on a
#      pruning run's fine-tune epoch, as experiments/README.md assumes.
# Outputs go to OUT_DIR (default results/benchmarks; --dry-run: a temporary folder unless given).
set -euo pipefail
cd "$(dirname "$0")/../.."

dry=0
out=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $arg (valid: --dry-run, OUT_DIR)" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done

if [ "$dry" = 1 ]; then
  device=cpu
  out="${out:-$(mktemp -d)}"
  throughput_args=(--smoke --threads 1)
  overhead_args=(--batches 8 --repeats 1 --warmup 0 --threads 1)
  epoch_args=(dataset.synthetic_train=64 dataset.synthetic_test=32 trainer.pretrain.batch_size=16
              trainer.finetune.batch_size=16 trainer.max_steps_per_epoch=2)
else
  device=cuda
  out="${out:-results/benchmarks}"
  python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "error: no CUDA device: run on a GPU machine, or use --dry-run")'
  throughput_args=()
  overhead_args=()
  epoch_args=(dataset.synthetic_train=50000 dataset.synthetic_test=10000)
fi
mkdir -p "$out"
step() { echo "== gpu_check ($device): $* ($(date +%T))"; }
start=$(date +%s)

step "1/4 CUDA tests"
python -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  "tests/test_fast_path.py::test_cuda_fast_path_defaults_and_compile"

step "2/4 throughput"
python experiments/benchmarks/throughput.py --device "$device" --out-dir "$out" "${throughput_args[@]}"

step "3/4 controller overhead"
python experiments/benchmarks/core_overhead.py --device "$device" --out "$out/core_overhead_$device.json" \
  "${overhead_args[@]}"

step "4/4 one pretrain and one fine-tune epoch per paper model"
runs="$(mktemp -d)"  # run dirs and their baseline cache stay out of results/: only the JSON is kept
for model in resnet56 vgg16_bn vgg16; do
  DPM_CACHE_DIR="$runs/cache" python -m dpm experiment=cifar10_resnet56 model="$model" dpm=base pruner=none dataset=synthetic \
    dataset.augment=true trainer.device="$device" trainer.pretrain.epochs=1 trainer.finetune.epochs=1 \
    trainer.progress=false "${epoch_args[@]}" hydra.run.dir="$runs/$model"
done
python - "$runs" "$out/epoch_times_$device.json" "$dry" <<'PY'
import json, sys
from pathlib import Path

runs, target, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
models = {}
for run in sorted(p for p in runs.iterdir() if (p / "metrics.json").exists()):  # cache/ has none
    m = json.loads((run / "metrics.json").read_text())
    (pretrain,), (finetune,) = m["history"]["pretrain"], m["history"]["finetune"]
    models[run.name] = {"pretrain_epoch_s": pretrain["epoch_time_s"], "finetune_epoch_s": finetune["epoch_time_s"],
                        "train_images": m["train_size"], "device": m["device"], "bf16": m["bf16"],
                        "channels_last": m["channels_last"], "compile": m["compile"]}
assert sorted(models) == ["resnet56", "vgg16", "vgg16_bn"], f"missing runs: {sorted(models)}"
record = {"benchmark": "epoch_times", "dry_run": dry, "data": "synthetic, CIFAR-10 sized", "models": models}
target.write_text(json.dumps(record, indent=2) + "\n")
for name, r in models.items():
    print(f"{name}: pretrain epoch {r['pretrain_epoch_s']:.1f} s, fine-tune epoch {r['finetune_epoch_s']:.1f} s "
          f"({r['train_images']} images, {r['device']})")
PY
echo "gpu_check: done in $(( $(date +%s) - start )) s; outputs in $out"
