#!/usr/bin/env bash
# docs/results/whole-arxiv/: the default cs model on a date-ordered slice of the shared dump (every archive, the real
# class mix), calibrated on validation, scored in fp32 and int8 on the same papers, and on the test papers.
#   bash tools/whole_arxiv.sh        # ~1 hour on one core (CPU_THREADS=1); the dump is ../shared/data/arxiv/dump
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=${W:-runs/whole}
RUN=${RUN:-runs/default}
T=(--cpu-threads "${CPU_THREADS:-0}")
export HF_HUB_OFFLINE=1
mkdir -p "$W"
# The default recipe (README command 1's model); its probes, zero-shot pass and TF-IDF fits are measured elsewhere
# (docs/results/default-run), and its test papers are scored below.
[ -f "$RUN/ledger.json" ] || "$PY" -m arxiv_ft.train --output-dir "$RUN" --probes false --eval-before false \
  --tfidf-baseline false --test-file '' "${T[@]}" > "$W/train.log" 2>&1
"$PY" -m arxiv_ft.cli calibrate --model-dir "$RUN" "${T[@]}"
[ -f "$W/slice.jsonl" ] || "$PY" tools/whole_arxiv.py slice --out "$W/slice.jsonl"
score() {  # output input [infer options]
  local out=$1 input=$2
  shift 2
  [ -f "$W/$out.summary.json" ] || "$PY" -m arxiv_ft.cli infer --model-dir "$RUN" --input "$input" \
    --output "$W/$out" --top-k 21 --temperature 1 --progress false "${T[@]}" "$@"
}
score fp32.jsonl "$W/slice.jsonl"
score int8.jsonl "$W/slice.jsonl" --quantize int8
score test.jsonl arxiv_ft/assets/cs-test-sample.jsonl
"$PY" tools/whole_arxiv.py analyse --run "$RUN" --slice "$W/fp32.jsonl" --int8 "$W/int8.jsonl" \
  --test "$W/test.jsonl" --tfidf "$W/slice.jsonl" --out docs/results/whole-arxiv
