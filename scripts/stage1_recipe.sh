#!/usr/bin/env bash
# Stage 1 (autoencoder + continuation) on SmolLM2: the recipe ablations and the long run behind
# checkpoints/smollm2-gmsa-ae. Needs GPUs; the ablations share them (several runs per GPU).
#   scripts/stage1_recipe.sh ablations   # one small equal budget (ABL_TOKENS encoder tokens) per lever
#   scripts/stage1_recipe.sh long        # the chosen recipe on LONG_GPUS (accelerate/DDP), resumable
#   scripts/stage1_recipe.sh tokenize    # tokenize DATA and DEV into the token cache (the others do it too)
#   scripts/stage1_recipe.sh profile     # where one step of the long run's recipe spends time and memory (one GPU)
#   scripts/stage1_recipe.sh grow        # INIT trained further as it is and with more compressor capacity, side by side
# DATA: training corpus files/folders (default ../shared/data/wiki parts 00-13; never wiki-15, the test set)
# DEV: dev corpus (default a slice of wiki-14, kept out of training). RUNS: output root (default runs).
# long: EVAL_EVERY (dev evaluation, default 150 steps, ~35 s each on an H200) and SAVE_EVERY (checkpoint, default
# EVAL_EVERY): on a lent machine that may go at any time, save often and bring each checkpoint back as it comes.
set -euo pipefail
. "$(dirname "$0")/on_gpus.sh"
RUNS=${RUNS:-runs}
DATA=${DATA:-$(ls ../shared/data/wiki/wiki-{00..13}.jsonl.gz 2>/dev/null | tr '\n' ' ')}
DEV=${DEV:-../shared/data/wiki/wiki-14.jsonl.gz}
TOKENS=${TOKEN_CACHE:-$RUNS/token-cache}
GPUS=${GPUS:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
ABL_TOKENS=${ABL_TOKENS:-12e6}
ABL_MINUTES=${ABL_MINUTES:-6.5}      # safety stop per ablation run (the budget is ABL_TOKENS)
LONG_TOKENS=${LONG_TOKENS:-300e6}
LONG_MINUTES=${LONG_MINUTES:-6.5}    # budget in training minutes: the schedule ends at tokens or minutes
STOP_AFTER=${STOP_AFTER:-0}          # pause this invocation after N minutes (resume with the same command)
RECIPE=${RECIPE:-"--rate_weights 1 2 2 1 --warmup_steps 50 --multi_doc_fraction 0.75 --multi_doc_distractors same_article"}
# (the long run's flags beyond the defaults.) Micro-batches of 128 with compiled blocks: 95k encoder tokens/s per H200
# against 29k for 16 x 4 eager (benchmarks/results/h200-x2/stage1-throughput.md); on an 80 GB card try BATCH=64 ACCUM=4
INIT=${INIT:-}                       # long: train this stage-1 checkpoint further (fresh optimizer and schedule)
LONG_LR=${LONG_LR:-5e-4}
common="--stage ae --base_model smollm2 --rates 2 4 8 16 --seed 0 --log_every 20 --save_dtype bfloat16
  --dev_data $DEV --token_cache $TOKENS --eval_samples 64 --eval_batch_size 64 --eval_spans true --eval_among true --warmup_steps 50"

# name: flags that differ from the defaults (an encoder prefix that takes the attention sink, raw residual-stream
# encoder output, k=12 encoder layers, 1 LSA block, encoder LoRA r=16 on all linear layers, the soft-token decoder
# adapter trained too, autoencoding only, 25% multi-document samples). The first ablation table
# (benchmarks/results/h100-x2/stage1-ablations.md) chose k=12 and AE-only; the decoder adapter was measured in
# benchmarks/results/h100/stage1-decoder-adapter.md.
ablations=(
  "default:"
  "frozen-decoder:--ae_decoder_lora false"
  "format1:--encoder_prefix="
  "encoder-norm:--encoder_norm true"
  "k8:--encoder_layers 8"
  "lsa2:--lsa_layers 2"
  "lora32:--lora_rank 32 --lora_alpha 64"
  "continuation:--continuation_fraction 0.5"
  "span:--span_fraction 0.25"
  "span50:--span_fraction 0.5"
  "hardmulti:--multi_doc_fraction 0.75 --multi_doc_distractors same_article"
  "centre:--soft_token_center true"
  "tcp:--method tcp"
)
ABL_GPUS=(${ABL_GPUS:-$(seq 0 $((GPUS - 1)))})    # which GPUs the ablations share
LONG_GPUS=${LONG_GPUS:-$(seq -s, 0 $((GPUS - 1)))}  # which GPUs the long run uses (comma-separated)

# grow (round 38): does more compressor capacity restore more at 4x? 30% of stage 1's 4x restorations drop the answer
# and its curve is flat since 231M tokens (benchmarks/results/README.md, rounds 28 and 38), so INIT (the shipped stage 1)
# trains on, side by side on one GPU at an equal token budget (GROW_TOKENS each, GROW_MINUTES the safety stop), as it
# is (the control) and grown where it left off: encoder LoRA rank 16 -> 128 (the authors' rank) and a second LSA block,
# each new part starting at zero so both runs start from the same soft tokens. Judge by the dev restore loss per rate
# (restore_loss@4x, teacher-forced on the same passages) and BLEU, then stage 2 from each (stage2_recipe.sh
# "ranked-fresh", 400 steps) on qa-multidoc dev. Round 38 ran it on one H100 (RUNS=runs/r38 GROW_TOKENS=10e6 BATCH=32
# ACCUM=2, DATA wiki-01/02, DEV wiki-14): restore_loss@4x 0.1546 against 0.1575 (-1.8%), BLEU@4x 82.8 against 83.2, and
# stage 2 from each read dev 4x 19.0 against 19.5 (benchmarks/results/h100/stage1-grow-r38.md): no gain at this budget.
grow_runs=(
  "control:"
  "grown:--lora_rank 128 --lsa_layers 2"
)

case "${1:?mode: ablations, long, tokenize, profile or grow}" in
ablations)
  "$0" tokenize  # once, before the parallel runs share the cache
  i=0
  for entry in "${ablations[@]}"; do
    name=${entry%%:*}; flags=${entry#*:}
    [ -n "${ABL_ONLY:-}" ] && [[ " $ABL_ONLY " != *" $name "* ]] && continue
    CUDA_VISIBLE_DEVICES=${ABL_GPUS[$((i % ${#ABL_GPUS[@]}))]} python3 -m gmsa_rag.train $common $flags --data $DATA \
      --out_dir "$RUNS/abl-$name" --steps 100000 --max_tokens "$ABL_TOKENS" --stop_after_minutes "$ABL_MINUTES" \
      --batch_size "${ABL_BATCH:-16}" --lr 2e-4 --eval_every 100000 --save_every 100000 > "$RUNS/abl-$name.log" 2>&1 &
    i=$((i + 1))
  done
  wait
  tail -n 2 "$RUNS"/abl-*.log ;;
tokenize)
  python3 -c "from gmsa_rag.data.passages import tokenize_corpus; from gmsa_rag.backbone import load_tokenizer; \
tok = load_tokenizer('smollm2'); tokenize_corpus('$DATA'.split(), tok, '$TOKENS'); tokenize_corpus(['$DEV'], tok, '$TOKENS')" ;;
long)
  on_gpus "$LONG_GPUS" 29533 -m gmsa_rag.train $common $RECIPE \
    --data $DATA --out_dir "$RUNS/long" --steps 1000000 --max_tokens "$LONG_TOKENS" \
    --time_limit_minutes "$LONG_MINUTES" --stop_after_minutes "$STOP_AFTER" --batch_size "${BATCH:-128}" \
    --grad_accum "${ACCUM:-2}" --compile "${COMPILE:-true}" --lr "$LONG_LR" ${INIT:+--init "$INIT"} \
    --eval_every "${EVAL_EVERY:-150}" --save_every "${SAVE_EVERY:-${EVAL_EVERY:-150}}" ;;
profile)
  python3 benchmarks/profile_train_step.py --out "$RUNS/profile" -- $common $RECIPE --data $DATA \
    --batch_size "${BATCH:-128}" --grad_accum "${ACCUM:-2}" --compile "${COMPILE:-true}" ;;
grow)
  "$0" tokenize
  for entry in "${grow_runs[@]}"; do
    name=${entry%%:*}; flags=${entry#*:}
    [ -n "${GROW_ONLY:-}" ] && [[ " $GROW_ONLY " != *" $name "* ]] && continue
    python3 -m gmsa_rag.train $common $RECIPE $flags --data $DATA --init "${INIT:?INIT: the stage-1 checkpoint to grow}" \
      --out_dir "$RUNS/grow-$name" --steps 1000000 --max_tokens "${GROW_TOKENS:-10e6}" \
      --time_limit_minutes "${GROW_MINUTES:-10}" --batch_size "${BATCH:-32}" --grad_accum "${ACCUM:-2}" \
      --compile "${COMPILE:-true}" --lr "${GROW_LR:-3e-4}" --warmup_steps 20 --eval_every "${EVAL_EVERY:-100}" \
      --save_every "${SAVE_EVERY:-100}" > "$RUNS/grow-$name.log" 2>&1 &
  done
  wait
  tail -n 2 "$RUNS"/grow-*.log ;;
*) echo "unknown mode $1" >&2; exit 2 ;;
esac
