#!/usr/bin/env bash
# The CPU comparison committed in docs/results/cpu-smollm2/: LoRA, QLoRA, DoRA and full fine-tuning of
# SmolLM2-135M-Instruct with the default recipe, 3 seeds each, on the same papers, plus the TF-IDF baseline per
# seed; then the report (with the paired-bootstrap significance of every difference).
#   bash tools/compare_cpu.sh                 # ~5 hours of one core per 12 runs (two at a time on 2 cores: JOBS=2)
# Weights go to runs/compare/ (not committed); ledgers and the report go to docs/results/cpu-smollm2/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/compare}
DOCS=${DOCS:-docs/results/cpu-smollm2}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
METHODS=${METHODS:-lora qlora dora full}
JOBS=${JOBS:-1}   # runs at a time; with 2, each gets one core (--cpu-threads 1)
export HF_HUB_OFFLINE=1
mkdir -p "$RUNS" "$DOCS/ledgers"
run() {  # method seed
  local out="$RUNS/$1-seed$2" threads=()
  [ "$JOBS" -gt 1 ] && threads=(--cpu-threads 1)
  [ -f "$out/ledger.json" ] || "$PY" train.py --config "presets/compare/$1.yaml" --seed "$2" --output-dir "$out" \
    "${threads[@]}" > "$RUNS/$1-seed$2.log" 2>&1
  cp "$out/ledger.json" "$DOCS/ledgers/$1-seed$2.json"
}
for seed in $SEEDS; do
  for method in $METHODS; do
    run "$method" "$seed" &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  done
  "$PY" -m arxiv_ft.baseline --train-per-class 30 --eval-per-class 20 --seed "$seed" \
    --out "$DOCS/ledgers/tfidf-svm-seed$seed.json"
done
wait
for seed in $SEEDS; do  # TF-IDF reading exactly the text each seed's LoRA prompts held
  "$PY" -m arxiv_ft.baseline --train-per-class 30 --eval-per-class 20 --seed "$seed" --text llm \
    --same-text-as "$RUNS/lora-seed$seed" --out "$DOCS/ledgers/tfidf-svm-sametext-seed$seed.json"
done
rm -f "$DOCS/ledgers/metrics.json"  # the baseline's per-class details; the ledger holds what the report needs
"$PY" -m arxiv_ft.report "$DOCS"/ledgers/*.json --out "$DOCS"
