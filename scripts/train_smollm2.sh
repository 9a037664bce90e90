#!/usr/bin/env bash
# The recipe behind checkpoints/smollm2-gmsa (format 1: trained before the encoder prefix existed; add
# --encoder_prefix= to the ae runs to rebuild that architecture): both stages for GMSA, and the same budget for the
# baselines (TCP-AE, and KEFT on the uncompressed prompt). Runs on one GPU; the jobs of a stage share it.
#   scripts/train_smollm2.sh ae     # stage 1: GMSA-AE and TCP-AE, same data, steps and rates
#   scripts/train_smollm2.sh keft   # stage 2: GMSA KEFT (from stage 1), TCP KEFT, no-compress KEFT
# RUNS (default runs/) holds the outputs; AE_STEPS / KEFT_STEPS / *_MINUTES scale the budget.
set -euo pipefail
RUNS=${RUNS:-runs}
AE_STEPS=${AE_STEPS:-2000}
AE_MINUTES=${AE_MINUTES:-0}
KEFT_STEPS=${KEFT_STEPS:-600}
KEFT_MINUTES=${KEFT_MINUTES:-0}
common="--base_model smollm2 --rates 2 4 8 16 --log_every 20 --seed 0"

case "${1:?stage: ae or keft}" in
ae)
  for method in gmsa tcp; do
    python -m gmsa_rag.train --stage ae --method $method $common --out_dir "$RUNS/ae-$method" \
      --encoder_layers 8 --lsa_layers 1 --lora_rank 32 --lora_alpha 64 --ae_decoder_lora false \
      --continuation_fraction 0 --steps "$AE_STEPS" --time_limit_minutes "$AE_MINUTES" --batch_size 32 --lr 2e-4 --warmup_steps 50 \
      --min_chunk_tokens 64 --max_chunk_tokens 512 --eval_every 100000 --eval_samples 16 --save_every 500 &
  done
  wait ;;
keft)
  for method in gmsa tcp; do
    python -m gmsa_rag.train --stage keft --init "$RUNS/ae-$method/checkpoints/$(cat "$RUNS/ae-$method/latest")" \
      $common --out_dir "$RUNS/keft-$method" --decoder_tuning qkv --steps "$KEFT_STEPS" \
      --time_limit_minutes "$KEFT_MINUTES" --batch_size 32 --lr 5e-5 --warmup_steps 30 \
      --eval_every 100000 --eval_samples 200 --save_every 100000 --save_dtype bfloat16 &
  done
  python -m gmsa_rag.train --stage keft --no_compress $common --out_dir "$RUNS/keft-nocompress" \
    --encoder_layers 8 --decoder_tuning qkv --steps "$KEFT_STEPS" --time_limit_minutes "$KEFT_MINUTES" \
    --batch_size 32 --lr 5e-5 --warmup_steps 30 --eval_every 100000 --eval_samples 200 --save_every 100000 \
    --save_dtype bfloat16 &
  wait ;;
*) echo "unknown stage $1" >&2; exit 2 ;;
esac
