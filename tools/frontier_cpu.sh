#!/usr/bin/env bash
# The frontier on 2 CPU cores (docs/results/frontiers/): the learning-rate sweep of sweeps/frontier-cpu.yaml (LoRA and
# full fine-tuning, 3 rates x 2 seeds, the default recipe's papers and steps, the full forgetting probe), WiSE-FT
# points of every finished run, and the report with the frontier and the matched-accuracy table.
#   bash tools/frontier_cpu.sh            # 7-9 hours on 2 cores, estimated from measured parts (not timed end to end):
#     12 runs, two at a time on one core each (LoRA 30-41 min, full 40-47 min with scoring and the full probe): ~4.4 h;
#     one WiSE-FT alpha a run, 23 min each on one core (run here with 2 threads, not timed): at most ~4.6 h.
# Run again after an interruption: finished runs and finished alphas are skipped, interrupted runs resume.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/frontier}
DOCS=${DOCS:-docs/results/frontiers}
ALPHAS=${ALPHAS:-0.5}
export HF_HUB_OFFLINE=1
"$PY" -m arxiv_ft.sweep sweeps/frontier-cpu.yaml --out "$OUT" --jobs 2
for run in "$OUT"/*/; do
  [ -f "$run/ledger.json" ] && "$PY" -m arxiv_ft.interpolate "$run" --alphas "$ALPHAS" --cpu-threads 2
done
mkdir -p "$DOCS/ledgers"
for ledger in "$OUT"/*/ledger.json "$OUT"/*/interpolation/*/ledger.json; do
  name=${ledger#"$OUT"/}
  cp "$ledger" "$DOCS/ledgers/${name//\//_}"
done
"$PY" -m arxiv_ft.report "$DOCS"/ledgers/*.json --out "$DOCS"
