#!/usr/bin/env bash
# The full-scale recipe: the three stage commands (README) on CIFAR-100 with ResNet-32 (width 4, 7.45 M
# parameters, 2.20 GFLOPs per image) on one GPU, then the headline table, then what the switches add on
# the 10,000 test images (evaluation/crossfit.py's deconfounded evaluation: static + dynamic against static pruning
# and the best fixed route at equal GFLOPs and epochs; results/cifar100/crossfit/own/report.md).
#
#   DATA=/path/to/cifar100 RESULTS=results/cifar100 bash bench/run_cifar100.sh
#
# DATA holds CIFAR-100 as PNG class folders (train/<class>/*.png, test/<class>/*.png, the original
# --img_type png) or as the official python pickles (cifar-100-python/); if DATA does not exist, stage 1
# downloads the pickles into it (needs the internet). CUDA_VISIBLE_DEVICES picks the GPU.
#
# Expected time on one modern GPU (H100 class), ESTIMATES from FLOPs, not measured (no GPU was available
# when this was written): each training step costs about 3x the forward FLOPs; we assume an effective
# 100 TFLOP/s under bf16 autocast, and for the pruned nets, whose convs are small and three times as many
# (rotation, core, rotation), that kernel launches rather than FLOPs bound a step (~10-15 ms).
#   stage 1  200 epochs x 50,000 images x 3 x 2.20 GFLOPs = 6.6e16 FLOPs      -> about 12 min (10-25 min)
#   stage 2  factor pass (200 batches) + eigh: ~1-2 min; 100 fine-tuning epochs of the 0.51-GFLOPs net,
#            391 steps each, launch-bound                                       -> about 8 min (5-15 min)
#   stage 3  100 epochs at batch 256 (196 steps), every block computed in training (masked), launch-bound,
#            plus the default controller's counterfactual pass: 4 of the 14 gated blocks flipped per step,
#            about 4 x 7.5 extra block evaluations per image forward-only in float32 without TF32 (not on
#            tensor cores), with the taken route: ~0.4 TFLOP per step for the pruned net, ~10 ms at ~40 TFLOP/s
#            (on the CPU the step costs 1.9-2.4x a REINFORCE step, docs/speed.md)            -> about 8 min (5-15 min)
# On a CPU the same recipe takes days; evaluation/study.py is the CPU-sized study.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/cifar100}
RESULTS=${RESULTS:-results/cifar100}
WORKERS=${WORKERS:-16}
# The original stage 1 fine-tunes at lr 1e-4, which presumes a trained dense ResNet-32 to start from:
# give it as PRETRAINED (a checkpoint or a state dict; switch weights may be missing). Without one,
# train from scratch instead: SP_LR=0.1.
PRETRAINED=${PRETRAINED:-}
SP_LR=${SP_LR:-0.0001}
# Every stage holds out VAL_SPLIT of the training images (the same ones: same seed), where the evaluation
# chooses the fixed route; the test split is only ever reported on. 0 runs the commands exactly as written
# and skips the evaluation.
VAL_SPLIT=${VAL_SPLIT:-0.1}

download=()
[ -d "$DATA" ] || download=(--download)
pretrained=()
[ -n "$PRETRAINED" ] && pretrained=(--pretrained "$PRETRAINED")
if [ -z "$PRETRAINED" ] && [ "$SP_LR" = "0.0001" ]; then
  echo "warning: stage 1 at the original lr 1e-4 without PRETRAINED barely trains from scratch; set SP_LR=0.1" >&2
fi
mkdir -p "$RESULTS"

stage() {  # name, then the command; prints and records its wall time
  local name=$1; shift
  local t0=$SECONDS
  echo "+ $*"
  "$@"
  echo "[$name] $((SECONDS - t0)) s" | tee -a "$RESULTS/stage_times.txt"
}

stage "stage 1" python main_sp.py --network resnet --depth 32 --epochs 200 --lr "$SP_LR" --bs 128 \
  --num_workers "$WORKERS" --momentum 0.9 --weight_decay 0.0005 --img_type png --resize 32 \
  --val_split "$VAL_SPLIT" --result_dir "$RESULTS" --data_dir "$DATA" "${download[@]}" "${pretrained[@]}"

# config.json holds the original stage-2 settings (compression 0.6, 100 epochs at lr 0.01, 200 factor
# batches); the flags only say where the data and results are.
stage "stage 2" python main_prune.py --config_path config.json --result_dir "$RESULTS" --data_dir "$DATA" \
  --set val_split="$VAL_SPLIT"

stage "stage 3" python main_rl_prune.py --network resnet --depth 32 --epochs 100 --lr 0.001 --bs 256 \
  --num_workers "$WORKERS" --momentum 0.9 --weight_decay 0.0005 --img_type png --resize 32 \
  --val_split "$VAL_SPLIT" --result_dir "$RESULTS" --data_dir "$DATA" --alpha 0.1 --gamma 1 --rl_weight 0.1

cat "$RESULTS/table.md"
[ "$VAL_SPLIT" = "0" ] && exit 0

# What the switches add, deconfounded: evaluation/crossfit.py's protocol on the official split (its own stage 1;
# at three budgets of the unpruned GFLOPs static pruning, static + dynamic, the best fixed route and the
# unpruned network, every arm as many epochs after stage 1; the static curve; the doubling check of
# convergence; wall-clock), about 1,800 epochs of the networks above in all: hours on one GPU.
# Results: $RESULTS/crossfit/own/report.md.
python -m evaluation.crossfit --scale cifar100 --data_dir "$DATA" --out "$RESULTS/crossfit" --results "$RESULTS/crossfit" \
  --jobs 1 --speed
