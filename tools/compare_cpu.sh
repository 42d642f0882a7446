#!/usr/bin/env bash
# The CPU comparison committed in docs/results/cpu-smollm2/: LoRA, QLoRA, DoRA and full fine-tuning of
# SmolLM2-135M-Instruct with the default recipe, 3 seeds each that took no part in choosing the recipe (10 11 12), on
# the same papers; each run fits the tuned and untuned TF-IDF baselines on its own papers and scores the 630 test
# papers; then the report (test split, hierarchical bootstrap over seeds and papers, Holm-corrected).
#   bash tools/compare_cpu.sh                 # ~5 hours of one core per 12 runs (two at a time on 2 cores: JOBS=2)
# Weights go to runs/compare/ (not committed); ledgers and the report go to docs/results/cpu-smollm2/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/compare}
DOCS=${DOCS:-docs/results/cpu-smollm2}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-10 11 12}  # the recipe was chosen with seeds 0 and 1: these took no part in it
METHODS=${METHODS:-lora qlora dora full}
JOBS=${JOBS:-1}   # runs at a time; with 2, each gets one core (--cpu-threads 1)
CPU_THREADS=${CPU_THREADS:-}   # torch threads per run (1 when sharing the machine with other work)
export HF_HUB_OFFLINE=1
mkdir -p "$RUNS" "$DOCS/ledgers"
run() {  # method seed
  local out="$RUNS/$1-seed$2" threads=()
  [ "$JOBS" -gt 1 ] && threads=(--cpu-threads 1)
  [ -n "$CPU_THREADS" ] && threads=(--cpu-threads "$CPU_THREADS")
  [ -f "$out/ledger.json" ] || "$PY" train.py --config "presets/compare/$1.yaml" --seed "$2" --output-dir "$out" \
    "${threads[@]}" > "$RUNS/$1-seed$2.log" 2>&1
  cp "$out/ledger.json" "$DOCS/ledgers/$1-seed$2.json"
}
for seed in $SEEDS; do
  for method in $METHODS; do
    run "$method" "$seed" &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  done
done
wait
"$PY" -m arxiv_ft.report "$DOCS"/ledgers/*.json --out "$DOCS"
