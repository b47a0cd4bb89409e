#!/usr/bin/env bash
# Everything this project reports from a GPU, one stage per call (each fits a 10-minute slot):
#
#   bash bench/gpu_run.sh kernels   # kernel tests on CUDA (bf16 included), kernel benchmark tables
#   bash bench/gpu_run.sh distill   # the default model answers the training prompts (self-distillation)
#   bash bench/gpu_run.sh warmup    # Medusa-1 heads on those answers, then their tree from head accuracies
#   bash bench/gpu_run.sh joint     # Medusa-2: backbone + heads from the warm-up heads, then their tree
#   bash bench/gpu_run.sh bench     # end-to-end benchmark: ours AR, Medusa-1, Medusa-2, transformers, 7B steps
#
# Variables: PROMPTS (default ../shared/data/prompts-train.jsonl), WORK (data and checkpoints, default
# work/), OUT (logs and result files, default $WORK/out), MODEL (a checkpoint; default the built-in
# model, which must be prepared: `python -m weights.default_model`, with NANOMEDUSA_GGUF=/path/to/the.gguf
# to convert a local file), NUM_PROMPTS (use the first N prompts of each bench set; default all), BENCH_FLAGS (more flags for the bench).
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPTS=${PROMPTS:-../shared/data/prompts-train.jsonl}
WORK=${WORK:-work}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1
HEADS_FLAGS="--num-heads 4 --num-layers 1 --shared-lm-head"
MODEL_FLAG=${MODEL:+--model $MODEL}

case "${1:-}" in
  kernels)
    python -m pytest -q -p no:cacheprovider tests/test_kernel_*.py 2>&1 | tee "$OUT/kernel_tests.log"
    python -m kernels.bench_small_kernels 2>&1 | tee "$OUT/bench_small.txt"
    python -m kernels.bench_tree_attention --out "$OUT/tree_attention.json" 2>&1 | tee "$OUT/bench_tree_attention.txt"
    ;;
  distill)
    python train.py --stage distill $MODEL_FLAG --data "$PROMPTS" --out "$WORK/answers.jsonl" --max-new-tokens 256 \
        --distill-batch-size 128 2>&1 | tr '\r' '\n' | grep -v '^distill:.*it/s' | tail -n 20 | tee "$OUT/distill.log"
    ;;
  warmup)
    python train.py --stage warmup $MODEL_FLAG --data "$WORK/answers.jsonl" --out "$WORK/warmup" $HEADS_FLAGS \
        --epochs 3 --batch-size 32 --max-len 512 --lr 2e-3 --log-every 100 2>&1 | tr '\r' '\n' | grep -v 'it/s\]$' \
        | tee "$OUT/warmup.log"
    python -m nanomedusa.tree_tuning $MODEL_FLAG --heads "$WORK/warmup/heads" --data "$WORK/answers.jsonl" --nodes 63 --write \
        2>&1 | tee "$OUT/warmup_tree.log"
    cp "$WORK/warmup/eval.json" "$OUT/warmup_eval.json"
    ;;
  joint)
    python train.py --stage joint $MODEL_FLAG --heads "$WORK/warmup/heads" --data "$WORK/answers.jsonl" --out "$WORK/joint" \
        --epochs 2 --batch-size 16 --max-len 512 --lr 1e-3 --backbone-lr 2e-5 --log-every 100 2>&1 | tr '\r' '\n' \
        | grep -v 'it/s\]$' | tee "$OUT/joint.log"
    python -m nanomedusa.tree_tuning --heads "$WORK/joint/heads" --model "$WORK/joint/model" \
        --data "$WORK/answers.jsonl" --nodes 63 --write 2>&1 | tee "$OUT/joint_tree.log"
    cp "$WORK/joint/eval.json" "$OUT/joint_eval.json"
    ;;
  bench)  # held-out prompts in the training mix (everything), then open-ended chat (ours only)
    HEADS=(--heads "m1=$WORK/warmup/heads" --heads "m2=$WORK/joint/heads@$WORK/joint/model")
    python -m nanomedusa.bench $MODEL_FLAG "${HEADS[@]}" --prompts bench/prompts-train-mix.jsonl \
        ${NUM_PROMPTS:+--num-prompts $NUM_PROMPTS} --json "$OUT/results.json" ${BENCH_FLAGS:-} 2>&1 | tee "$OUT/bench.txt"
    python -m nanomedusa.bench $MODEL_FLAG "${HEADS[@]}" --prompts bench/prompts-chat.jsonl --no-hf --skip-7b \
        ${NUM_PROMPTS:+--num-prompts $NUM_PROMPTS} --json "$OUT/results-chat.json" ${BENCH_FLAGS:-} 2>&1 \
        | tee "$OUT/bench-chat.txt"
    ;;
  *)
    echo "usage: bash bench/gpu_run.sh kernels|distill|warmup|joint|bench" >&2
    exit 2
    ;;
esac
