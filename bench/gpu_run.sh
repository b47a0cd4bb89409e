#!/usr/bin/env bash
# The GPU runs behind the shipped checkpoints and bench/RESULTS.md's main tables, one stage per call (each fits a
# 10-minute slot; the sections of RESULTS.md that no stage makes quote their own commands):
#
#   bash bench/gpu_run.sh kernels   # kernel tests on CUDA (bf16 included; --exact's and dynamic trees' too), kernel benchmark tables
#   bash bench/gpu_run.sh kernel-tests  # those tests alone
#   bash bench/gpu_run.sh distill   # the default model answers the chat and the math prompts (self-distillation)
#   bash bench/gpu_run.sh warmup    # Medusa-1 heads on those answers, then their tree from head accuracies
#   bash bench/gpu_run.sh sizes     # step time against tree size, then the warm-up heads' tree sized to it
#   bash bench/gpu_run.sh joint     # Medusa-2: LoRA backbone + heads from the warm-up heads, then their tree
#   bash bench/gpu_run.sh bench     # end-to-end benchmark on the three bench prompt sets, 7B-shaped steps
#   bash bench/gpu_run.sh exact     # --exact: greedy Medusa = plain greedy on 108 prompts x 256 tokens, and its cost
#   bash bench/gpu_run.sh path      # heads that read their path, grown from trained heads, tuned and calibrated
#   bash bench/gpu_run.sh path-bench  # their static and dynamic trees against the heads they grew from
#   bash bench/gpu_run.sh draft-probe # an EAGLE-style draft trained on the distilled answers, per-depth accuracy (#15)
#
# Data: the chat prompts (PROMPTS_CHAT, default ../shared/data/prompts-chat-train.jsonl) are answered with
# up to CHAT_TOKENS (512) new tokens, the math-heavy prompts (PROMPTS_MATH, default
# ../shared/data/prompts-train.jsonl) with up to MATH_TOKENS (256); training mixes the two answer files
# with weights MIX (default "1 0.5": every chat answer, a fixed half of the math ones). The distill log
# says how many answers reached each cap. The defaults are the settings of the shipped checkpoints, but for the
# warm-up's held-out split: SPLIT=position holds out what theirs did (train.py --split; default id, and the stages
# that continue from heads split as those record). A training stage run again replaces its earlier run (train.py
# --overwrite); distillation continues its answer files.
# Variables: WORK (data and checkpoints, default work/, which git ignores), OUT (logs and result files, default
# $WORK/out), MODEL (a checkpoint; default the built-in model, which must be prepared: `python -m
# weights.default_model`, with NANOMEDUSA_GGUF=/path/to/the.gguf to convert a local file), NUM_PROMPTS (the bench and
# path-bench stages' bench.decode and draft-probe's answers use the first N prompts of each bench set; default all; the
# exact and sizes stages and path-bench's bench.dynamic_trees calls keep their own counts), HEAD_LAYERS (ResBlocks per
# head, default 2), RUN (the warm-up's folder under WORK, default warmup; the other stages read warmup), EPOCHS (warm-up
# epochs, default 2), JOINT_STEPS (default 500), KERNEL_TESTS and KERNEL_JOBS (the kernel tests' files, default the
# kernels', --exact's, dynamic trees' and decoding's, and how many pytest processes run them at once, one file each,
# default 4), BENCH_FLAGS (more flags for every bench.decode call: sizes, bench, exact, path-bench), TRIM (--trim: drop
# the heads deeper than the tuned tree), and for the exact stage HEADS_DIRS (its --heads flags, default the three
# shipped heads: m1, m2 and the default path-reading heads, path), BENCH_7B_FLAGS (flags of its 7B-shaped part),
# LINEAR_FLAGS (of bench.linear), and for the path stages HEADS_FROM (the heads grown, default the Medusa-1 heads),
# PATH_EPOCHS (default 1), PATH_LR (default 2e-3), PATH_NODES and PATH_DEPTH (their tree: 31 paths, 3 heads deep) and
# BUDGETS (node budgets of path-bench, default 16,32,64,128) and DYNAMIC_FLAGS (more flags for bench.dynamic_trees), and
# for draft-probe EVAL_TOKENS (the held-out answers' length, default 256), DRAFT_HEADS (the heads compared, default the
# shipped default heads) and DRAFT_FLAGS (more flags for bench.feature_draft_probe).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGES=(kernels kernel-tests distill warmup sizes joint bench exact path path-bench draft-probe)
if ! printf '%s\n' "${STAGES[@]}" | grep -qxF -- "${1:-}"; then  # before anything is made: a typo leaves no work/
    echo "usage: bash bench/gpu_run.sh STAGE, STAGE one of ${STAGES[*]}" >&2
    exit 2
fi
PROMPTS_CHAT=${PROMPTS_CHAT:-../shared/data/prompts-chat-train.jsonl}
PROMPTS_MATH=${PROMPTS_MATH:-../shared/data/prompts-train.jsonl}
WORK=${WORK:-work}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1
DATA=("$WORK/answers-chat.jsonl" "$WORK/answers-math.jsonl")
read -r -a MIX <<< "${MIX:-1 0.5}"
HEADS_FLAGS="--num-heads 5 --num-layers ${HEAD_LAYERS:-2} --shared-lm-head"
RUN=${RUN:-warmup}
HEADS_FROM=${HEADS_FROM:-weights/smollm2-135m-instruct-medusa}
MODEL_FLAG=${MODEL:+--model $MODEL}
STEP_TIMES="$OUT/step-times.json"
[ -f "$STEP_TIMES" ] && export STEP_TIMES_FLAG="--step-times $STEP_TIMES"  # trees sized to the GPU
no_bars() { tr '\r' '\n' | grep -v 'it/s\]$' | grep -v '^distill:.*prompt/s'; }

# The tree for a heads directory, sized to the hardware when step times were measured; TRIM=--trim drops
# the heads deeper than that tree from the heads' files.
tune_tree() {  # HEADS_DIR NAME
    python -m nanomedusa.tree_tuning $MODEL_FLAG --heads "$1" --data "${DATA[@]}" --json "$OUT/$2_accuracy.json" \
        ${STEP_TIMES_FLAG:-} --write ${TRIM:-} 2>&1 | tee "$OUT/$2_tree.log"
}

# pytest over the files given, one process per file, KERNEL_JOBS (4) at a time, each slot taking the next file when
# its last one ends (xargs -P): on a GPU compiling each test's kernels dominates (one CPU core a process; the kernel
# tests alone ran past 7 minutes in one), and a queue keeps the slots busy however unevenly the files' times fall,
# so list the slow files first. File i writes $OUT/kernel_tests.i.log as it goes (what finished survives a
# timeout); then the logs are printed in the files' order, and the stage fails if any file failed.
kernel_tests() {  # FILE...
    local jobs=${KERNEL_JOBS:-4} files=("$@") failed=0 i
    if ! [[ $jobs =~ ^[1-9][0-9]*$ ]] || [ ${#files[@]} -eq 0 ]; then
        echo "kernel_tests: KERNEL_JOBS must be 1 or more (it is '$jobs') and KERNEL_TESTS name files" >&2
        return 2
    fi
    rm -f "$OUT"/kernel_tests.[0-9]*.log  # an earlier run's, perhaps of more files
    for i in "${!files[@]}"; do printf '%s\0%s\0' "${files[i]}" "$OUT/kernel_tests.$i.log"; done \
        | xargs -0 -n 2 -P "$jobs" sh -c 'python -m pytest -q -p no:cacheprovider "$0" > "$1" 2>&1' || failed=1
    for i in "${!files[@]}"; do [ -f "$OUT/kernel_tests.$i.log" ] && cat "$OUT/kernel_tests.$i.log"; done
    return $failed
}

case "$1" in
  kernels|kernel-tests)
    # unquoted: KERNEL_TESTS is a list of files; the default lists the largest first (more tests, more compiling)
    # (and the files whose CUDA-graph tests only a GPU runs: decoding, the chat, the prefill graphs' shared pool)
    kernel_tests ${KERNEL_TESTS:-$(ls -S tests/test_kernel_*.py tests/test_exact.py tests/test_dynamic_tree.py \
        tests/test_generation.py tests/test_chat.py tests/test_medusa.py)} \
        2>&1 | tee "$OUT/kernel_tests.log"
    [ "$1" = kernel-tests ] && exit 0
    python -m bench.small_kernels 2>&1 | tee "$OUT/bench_small.txt"
    python -m bench.tree_attention --out "$OUT/tree_attention.json" 2>&1 | tee "$OUT/bench_tree_attention.txt"
    python -m bench.linear_tma --json "$OUT/linear-tma.json" 2>&1 | tee "$OUT/linear-tma.txt"
    ;;
  distill)
    python train.py --stage distill $MODEL_FLAG --data "$PROMPTS_CHAT" --out "${DATA[0]}" --max-new-tokens "${CHAT_TOKENS:-512}" \
        --distill-batch-size 256 2>&1 | no_bars | tail -n 20 | tee "$OUT/distill.log"
    python train.py --stage distill $MODEL_FLAG --data "$PROMPTS_MATH" --out "${DATA[1]}" --max-new-tokens "${MATH_TOKENS:-256}" \
        --distill-batch-size 256 2>&1 | no_bars | tail -n 20 | tee -a "$OUT/distill.log"
    ;;
  warmup)
    python train.py --stage warmup $MODEL_FLAG --data "${DATA[@]}" --data-weights "${MIX[@]}" --out "$WORK/$RUN" --overwrite \
        ${SPLIT:+--split $SPLIT} $HEADS_FLAGS --epochs "${EPOCHS:-2}" --batch-size 32 --max-len 1024 --lr 2e-3 --log-every 100 2>&1 | no_bars \
        | tee "$OUT/$RUN.log"
    cp "$WORK/$RUN/eval.json" "$OUT/${RUN}_eval.json"
    tune_tree "$WORK/$RUN/heads" "$RUN"
    ;;
  sizes)  # the size sweep builds each size's tree from the rank accuracies the warm-up's tuning stored
    python -m bench.decode $MODEL_FLAG --heads "m1=$WORK/warmup/heads" --skip-e2e --skip-7b \
        --tree-sizes 16,32,48,64,96,128,192,256 --prompts bench/prompts-chat.jsonl --num-prompts 4 \
        --step-times "$STEP_TIMES" --json "$OUT/sizes.json" ${BENCH_FLAGS:-} 2>&1 | tee "$OUT/sizes.log"
    STEP_TIMES_FLAG="--step-times $STEP_TIMES" TRIM=--trim tune_tree "$WORK/warmup/heads" warmup
    ;;
  joint)
    python train.py --stage joint $MODEL_FLAG --heads "$WORK/warmup/heads" --data "${DATA[@]}" --data-weights "${MIX[@]}" \
        --out "$WORK/joint" --overwrite --lora-rank 16 --lora-alpha 32 --max-steps "${JOINT_STEPS:-500}" --batch-size 16 \
        --max-len 1024 --lr 1e-3 --backbone-lr 2e-4 --log-every 100 2>&1 | no_bars | tee "$OUT/joint.log"
    cp "$WORK/joint/eval.json" "$OUT/joint_eval.json"
    TRIM=--trim tune_tree "$WORK/joint/heads" joint
    ;;
  bench)  # the held-out chat set (by category), the older chat set and the math/NLP mix; BENCH_FLAGS adds
          # e.g. --no-hf --skip-7b (transformers and the 7B shape run with the last set only)
    HEADS=(--heads "m1=$WORK/warmup/heads" --heads "m2=$WORK/joint/heads")
    for set in chat-heldout chat train-mix; do
        flags=(--no-hf --skip-7b)
        [ "$set" = train-mix ] && flags=()
        python -m bench.decode $MODEL_FLAG "${HEADS[@]}" --prompts "bench/prompts-$set.jsonl" "${flags[@]}" \
            ${NUM_PROMPTS:+--num-prompts $NUM_PROMPTS} --json "$OUT/results-$set.json" ${BENCH_FLAGS:-} 2>&1 \
            | tee "$OUT/bench-$set.txt"
    done
    ;;
  exact)  # the three shipped heads (HEADS_DIRS overrides), bf16: same text as plain greedy on all four bench sets
          # (108 prompts, 256 tokens, three trees), then the cost of --exact on the held-out chat set, the
          # 7B shape's steps with and without it (and without programmatic dependent launch, per kernel, and per
          # kernel class inside the graphed step: step_profile --ablate; the steps of two grouped-query shapes),
          # and the linear kernel's bandwidth per matrix
    SHIPPED_HEADS="--heads m1=weights/smollm2-135m-instruct-medusa --heads m2=weights/smollm2-135m-instruct-medusa2"
    SHIPPED_HEADS+=" --heads path=weights/smollm2-135m-instruct-medusa-path"  # the default heads
    read -r -a SHIPPED <<< "${HEADS_DIRS:-$SHIPPED_HEADS}"
    python -m bench.decode $MODEL_FLAG "${SHIPPED[@]}" --exact --max-new-tokens 256 --no-hf --skip-7b --quick-warmup \
        --prompts bench/prompts-chat-heldout.jsonl bench/prompts-chat.jsonl bench/prompts-train-mix.jsonl \
        bench/prompts-extra.jsonl --json "$OUT/results-exact.json" ${BENCH_FLAGS:-} 2>&1 | tee "$OUT/bench-exact.txt"
    for flag in --no-exact --exact; do
        python -m bench.decode $MODEL_FLAG "${SHIPPED[@]}" $flag --tree own --prompts bench/prompts-chat-heldout.jsonl \
            --no-hf --skip-7b --json "$OUT/results-chat-heldout$flag.json" ${BENCH_FLAGS:-} 2>&1 | tee "$OUT/bench-chat$flag.txt"
    done
    python -m bench.decode --skip-e2e --no-medusa --json "$OUT/results-7b.json" ${BENCH_7B_FLAGS:-} 2>&1 | tee "$OUT/bench-7b.txt"
    python -m bench.step_profile --ablate --json "$OUT/step-profile.json" 2>&1 | tee "$OUT/step-profile.txt"
    for shape in llama3-8b smollm2-135m; do  # grouped queries
        python -m bench.step_profile --shape $shape --top 0 --json "$OUT/step-profile-$shape.json" 2>&1 \
            | tee "$OUT/step-profile-$shape.txt"
    done
    python -m bench.linear --json "$OUT/linear.json" ${LINEAR_FLAGS:-} 2>&1 | tee "$OUT/bench-linear.txt"
    ;;
  path)  # HEADS_FROM plus path reading (train.py --reads-path: P_k from zero, the heads trained on with it) for
         # PATH_EPOCHS more epochs on the distilled answers; their tree PATH_NODES (31) paths and PATH_DEPTH (3)
         # heads deep, the deeper heads dropped (each depth of a path-reading proposal costs launches: the shipped
         # weights/smollm2-135m-instruct-medusa-path, bench/RESULTS.md); temperatures fitted on the held-out split
    python train.py --stage warmup $MODEL_FLAG --heads "$HEADS_FROM" --reads-path --data "${DATA[@]}" \
        --data-weights "${MIX[@]}" --out "$WORK/path" --overwrite --epochs "${PATH_EPOCHS:-1}" --batch-size 32 --max-len 1024 \
        --lr "${PATH_LR:-2e-3}" --log-every 100 2>&1 | no_bars | tee "$OUT/path.log"
    cp "$WORK/path/eval.json" "$OUT/path_eval.json"
    python -m nanomedusa.tree_tuning $MODEL_FLAG --heads "$WORK/path/heads" --data "${DATA[@]}" --nodes "${PATH_NODES:-31}" \
        --max-depth "${PATH_DEPTH:-3}" --json "$OUT/path_accuracy.json" --write --trim 2>&1 | tee "$OUT/path_tree.log"
    python -m nanomedusa.calibration $MODEL_FLAG --heads "$WORK/path/heads" --data "${DATA[@]}" --write 2>&1 \
        | tee "$OUT/path_calibration.log"
    ;;
  path-bench)  # static against dynamic trees (bench.dynamic_trees) for the path stage's heads and HEADS_FROM,
               # on the held-out chat set and the math/NLP mix; then both end to end against plain decoding
    for set in chat-heldout train-mix; do
        for heads in "from=$HEADS_FROM" "path=$WORK/path/heads"; do
            python -m bench.dynamic_trees $MODEL_FLAG --heads "${heads#*=}" --prompts "bench/prompts-$set.jsonl" \
                --budgets "${BUDGETS:-16,32,64,128}" --json "$OUT/dynamic-${heads%%=*}-$set.json" ${DYNAMIC_FLAGS:-} 2>&1 \
                | tee -a "$OUT/path-bench.txt"
        done
    done
    python -m bench.decode $MODEL_FLAG --heads "from=$HEADS_FROM" --heads "path=$WORK/path/heads" --tree own \
        --prompts bench/prompts-chat-heldout.jsonl bench/prompts-train-mix.jsonl --no-hf --skip-7b \
        ${NUM_PROMPTS:+--num-prompts $NUM_PROMPTS} --json "$OUT/results-path.json" ${BENCH_FLAGS:-} 2>&1 \
        | tee "$OUT/bench-path.txt"
    ;;
  draft-probe)  # #15: an EAGLE-style draft over the base model's features (bench.feature_draft_probe), trained on the
                # distill stage's answers, measured on the default model's answers (EVAL_TOKENS, default 256) to the
                # held-out chat set and the math/NLP mix, beside the default heads (DRAFT_HEADS: another heads directory)
    : > "$OUT/draft-probe.log"
    for set in chat-heldout train-mix; do
        python train.py --stage distill $MODEL_FLAG --data "bench/prompts-$set.jsonl" --out "$WORK/eval-$set.jsonl" \
            --max-new-tokens "${EVAL_TOKENS:-256}" ${NUM_PROMPTS:+--limit $NUM_PROMPTS} 2>&1 | no_bars | tail -n 2 \
            | tee -a "$OUT/draft-probe.log"
    done
    python -m bench.feature_draft_probe $MODEL_FLAG ${DRAFT_HEADS:+--heads "$DRAFT_HEADS"} \
        --train "${DATA[@]}" --eval "$WORK/eval-chat-heldout.jsonl" "$WORK/eval-train-mix.jsonl" \
        --json "$OUT/feature-draft-probe.json" ${DRAFT_FLAGS:-} 2>&1 | tee -a "$OUT/draft-probe.log"
    ;;
esac
