#!/usr/bin/env bash
# The CPU comparison committed in docs/results/cpu-smollm2/: zero-shot (each run's "before"), LoRA (2 seeds),
# QLoRA, full fine-tuning of SmolLM2-135M-Instruct on the same data, plus the TF-IDF baseline; then the report.
#   bash tools/compare_cpu.sh            # ~30-40 min on 2 CPU cores
# Weights go to runs/compare/ (not committed); ledgers and the report go to docs/results/cpu-smollm2/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/compare}
DOCS=${DOCS:-docs/results/cpu-smollm2}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
mkdir -p "$RUNS" "$DOCS/ledgers"
for run in lora:0 lora:1 qlora:0 full:0; do
  method=${run%%:*} seed=${run##*:}
  out="$RUNS/$method-seed$seed"
  [ -f "$out/ledger.json" ] || "$PY" train.py --config "presets/compare/$method.yaml" --seed "$seed" --output-dir "$out"
  cp "$out/ledger.json" "$DOCS/ledgers/$method-seed$seed.json"
done
"$PY" -m arxiv_ft.baseline --train-per-class 12 --eval-per-class 5 --out "$DOCS/ledgers/tfidf-svm.json"
rm -f "$DOCS/ledgers/metrics.json"  # the baseline's per-class details; the ledger holds what the report needs
"$PY" -m arxiv_ft.report "$DOCS"/ledgers/*.json --out "$DOCS"
