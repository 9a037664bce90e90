#!/usr/bin/env bash
# After stage-2 runs chosen on dev: the winner (by its last dev evaluation) judged on held-out NQ dev with
# benchmarks/qa.py, free decoding: five documents, the gold passage alone, and the one document BM25 keeps.
#   scripts/judge_runs.sh OUT RUN_DIR...        e.g. scripts/judge_runs.sh runs/r26/qa runs/r26/s2-*
# KEYS: the dev keys that choose, in order (default "accuracy@4x gold_accuracy@4x"); RATES: rates over five
# documents (default "4 8 16"); NAME: the outputs' stem (default qa-judged); QA_ARGS: more qa.py flags (e.g. --device
# cuda --engine hf); FIVE_ARGS: qa.py flags for the five-document run only (default: the order the winner trained on,
# its recorded --doc_order: "--keep-top 5" for BM25 order best first, "--keep-top 5 --best-last" for best last);
# DRY=1 prints the qa.py commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/judge_runs.sh OUT RUN_DIR...}; shift
[ $# -gt 0 ] || { echo "judge_runs: no run folders given" >&2; exit 2; }
python=${PYTHON:-python3}; [ -x .venv/bin/python ] && python=${PYTHON:-.venv/bin/python}
checkpoint=$("$python" benchmarks/training_runs.py --runs "$@" --winner ${KEYS:-accuracy@4x gold_accuracy@4x})
name=${NAME:-qa-judged}
echo "judge_runs: winner $checkpoint" >&2
if [ -z "${FIVE_ARGS+set}" ]; then  # the five documents in the order the winner trained on
  order=$("$python" -c 'import json, sys; from gmsa_rag.model import recorded_document_order
print(recorded_document_order(json.load(open(sys.argv[1])).get("extra")))' "$checkpoint/gmsa_config.json" 2>/dev/null \
    || echo given)
  case "$order" in bm25_first) FIVE_ARGS="--keep-top 5" ;; bm25_last) FIVE_ARGS="--keep-top 5 --best-last" ;; esac
fi
for variant in "--rates ${RATES:-4 8 16} --name $name ${FIVE_ARGS:-}" "--rates 4 8 --gold-only --name $name-gold" \
               "--rates 4 --keep-top 1 --name $name-keep1"; do
  command=("$python" benchmarks/qa.py --data data/nq-multidoc/dev.jsonl.gz --limit 200 --gmsa-checkpoint "$checkpoint"
           --out "$out" ${QA_ARGS:-} $variant)
  if [ "${DRY:-0}" = 1 ]; then echo "${command[*]}"; else "${command[@]}"; fi
done
