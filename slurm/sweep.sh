#!/bin/bash
# Submit the trade-off experiment: one training job per (method, seed), optional TF-IDF baselines, and a report
# job that starts when all of them have ended (--dependency=afterany, so one failed run does not block it).
# Runs on the login node; prints the job ids.
#
#   METHODS="lora full" SEEDS="0 1 2" SBATCH_ARGS="--gpus-per-node=1 --time=4:00:00" slurm/sweep.sh
#   SPEC=sweeps/frontier-gpu.yaml SBATCH_ARGS="--gpus-per-node=1" slurm/sweep.sh   # learning-rate sweep, an array
#   PRESET_DIR=presets/compare SWEEP_DIR=runs/sweep-cs slurm/sweep.sh --train-per-class 100    # args go to every run
#
# Layout: $SWEEP_DIR/<method>-seed<seed>/ is each run's train.py --output-dir (a requeued run resumes there),
# $SWEEP_DIR/logs/ the Slurm logs, $SWEEP_DIR/report/ the comparison (report.md, summary.json, plots).
# The zero-shot row costs no job: every run evaluates the base model before training (train.py --eval-before,
# on by default) and the report shows it as "before".
#
# Arguments: train.py options for every run (after the preset, so they override it).
# Environment:
#   SPEC          a sweep spec (arxiv_ft/sweep.py): its points as one array job instead of METHODS x SEEDS
#   SWEEP_DIR     where everything goes (default runs/sweep-<date>-<time>)
#   METHODS       train.py --method values (default "lora full")
#   SEEDS         train.py --seed values (default "0 1 2")
#   PRESET_DIR    per-method hyperparameters: run <method> gets PRESET=$PRESET_DIR/<method>.yaml when that file
#                 exists (full fine-tuning wants a ~10x smaller --lr than LoRA; that belongs in the preset)
#   TRAIN_SCRIPT  slurm/train.sbatch (default) or slurm/train-multinode.sbatch
#   SBATCH_ARGS   extra sbatch options for every training job, word-split (e.g. "--gpus-per-node=8 -N 2")
#   BASELINE=1    also one TF-IDF + linear SVM run per seed (python -m arxiv_ft.baseline, CPU, seconds) in
#                 $SWEEP_DIR/tfidf-svm-seed<seed>/; BASELINE_ARGS: its options (word-split), e.g. the same
#                 --train-per-class/--eval-per-class as the LLM runs
#   REPORT_CMD    the report job's shell command; default
#                 python -m arxiv_ft.report <run folders> --out $SWEEP_DIR/report
#                 It runs in the repository with SWEEP_DIR and RUN_DIRS (the run folders) in its environment.
#   REPORT_SBATCH_ARGS  extra sbatch options for the report job
#   ACCEL_CONFIG, NPROC_PER_NODE, CPU, VENV: passed on to the training jobs (see slurm/train.sbatch)
set -euo pipefail
SWEEP_DIR=${SWEEP_DIR:-runs/sweep-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$SWEEP_DIR/logs"
SWEEP_DIR=$(cd "$SWEEP_DIR" && pwd)
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_DIR"
METHODS=${METHODS:-lora full}
SEEDS=${SEEDS:-0 1 2}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-slurm/train.sbatch}
read -r -a sbatch_args <<<"${SBATCH_ARGS:-}"
read -r -a baseline_args <<<"${BASELINE_ARGS:-}"
read -r -a report_sbatch_args <<<"${REPORT_SBATCH_ARGS:-}"
VENV=${VENV-.venv}
activate=""
if [ -n "$VENV" ] && [ -f "$VENV/bin/activate" ]; then
  activate=". $(printf %q "$VENV/bin/activate") && "
fi
export REPO_DIR VENV

job_ids=()
run_dirs=()
if [ -n "${SPEC:-}" ]; then
  # A learning-rate sweep (arxiv_ft/sweep.py): one array task of $TRAIN_SCRIPT a point, the same folders and ledgers
  # as `arxiv-ft sweep SPEC --out SWEEP_DIR` locally; submitted again, finished points end at once.
  py=python3
  [ -n "$VENV" ] && [ -x "$VENV/bin/python" ] && py=$VENV/bin/python
  mapfile -t names < <("$py" -m arxiv_ft.sweep "$SPEC" --out "$SWEEP_DIR" --list | cut -d' ' -f2)
  id=$(SWEEP_SPEC=$SPEC SWEEP_OUT=$SWEEP_DIR sbatch --parsable --chdir="$REPO_DIR" --job-name=sweep-points \
    --array=0-$((${#names[@]} - 1)) --output="$SWEEP_DIR/logs/point-%a-%A.out" "${sbatch_args[@]}" \
    "$TRAIN_SCRIPT" "$@")
  echo "points: job $id (array 0-$((${#names[@]} - 1)): ${names[*]})"
  job_ids+=("${id%%;*}")
  for name in "${names[@]}"; do run_dirs+=("$SWEEP_DIR/$name"); done
  METHODS=""
fi
for method in $METHODS; do
  preset=""
  if [ -n "${PRESET_DIR:-}" ] && [ -f "$PRESET_DIR/$method.yaml" ]; then
    preset=$PRESET_DIR/$method.yaml
  fi
  for seed in $SEEDS; do
    run=$method-seed$seed
    mkdir -p "$SWEEP_DIR/$run"   # so that the report finds the folder even if the run fails before creating it
    id=$(PRESET=$preset sbatch --parsable --chdir="$REPO_DIR" --job-name="sweep-$run" \
      --output="$SWEEP_DIR/logs/$run-%j.out" "${sbatch_args[@]}" \
      "$TRAIN_SCRIPT" --method "$method" --seed "$seed" --output-dir "$SWEEP_DIR/$run" "$@")
    echo "$run: job $id${preset:+ (preset $preset)}"
    job_ids+=("${id%%;*}")
    run_dirs+=("$SWEEP_DIR/$run")
  done
done
if [ "${BASELINE:-0}" = 1 ]; then
  for seed in $SEEDS; do
    run=tfidf-svm-seed$seed
    cmd="python -m arxiv_ft.baseline --seed $seed --out $(printf %q "$SWEEP_DIR/$run/ledger.json")"
    [ ${#baseline_args[@]} -gt 0 ] && cmd+=" $(printf '%q ' "${baseline_args[@]}")"
    id=$(sbatch --parsable --chdir="$REPO_DIR" --job-name="sweep-$run" --output="$SWEEP_DIR/logs/$run-%j.out" \
      --ntasks=1 --time=30 --wrap="${activate}${cmd}")
    echo "$run: job $id"
    job_ids+=("${id%%;*}")
    run_dirs+=("$SWEEP_DIR/$run")
  done
fi

RUN_DIRS="${run_dirs[*]}"
export SWEEP_DIR RUN_DIRS
REPORT_CMD=${REPORT_CMD:-python -m arxiv_ft.report $(printf '%q ' "${run_dirs[@]}")--out $(printf %q "$SWEEP_DIR/report")}
deps=$(IFS=:; echo "${job_ids[*]}")
id=$(sbatch --parsable --chdir="$REPO_DIR" --job-name=sweep-report --output="$SWEEP_DIR/logs/report-%j.out" \
  --dependency="afterany:$deps" --kill-on-invalid-dep=yes --ntasks=1 --time=30 "${report_sbatch_args[@]}" \
  --wrap="${activate}${REPORT_CMD}")
echo "report: job $id (after jobs $deps) -> $SWEEP_DIR/report"
