# shellcheck shell=bash
# Shared by slurm/*.sbatch; not a job script. Sourced by the batch shell, and again inside every srun task.
#
# How a stop signal reaches train.py (Slurm's warning before the time limit, or a preemption notice):
#   1. `#SBATCH --signal=B:USR1@300` (or `scancel --signal=USR1 --batch JOB`) signals the batch shell only.
#   2. The batch shell's trap (`run_step`) re-sends it to every job step: `scancel --signal=USR1 JOB` (all steps on
#      all nodes, not the batch shell), and again every RESEND_S seconds until the step ends.
#   3. In every task, `supervise` runs `accelerate launch` with USR1 and TERM *ignored* and, when it gets one of
#      them, sends it to the launcher's child processes: the train.py workers. Why not just signal the launcher
#      or the task's process group?
#        - accelerate's launcher (torch elastic, or a plain Popen for one process) has no SIGUSR1 handler: the
#          default action kills it, and the workers die with it or are killed when the task ends, mid-checkpoint;
#        - torch elastic starts every worker in a new session, so a signal to the task's process group (what Slurm
#          sends with proctrack/pgid) never reaches the workers; with proctrack/cgroup it reaches every process,
#          launcher included, which is why the launcher must ignore it rather than merely not be sent it.
#      The workers inherit the launcher's SIG_IGN; train.py replaces it with its own handler (GracefulStop). A
#      signal that arrives while train.py is still importing is therefore ignored: hence the re-send in 2.
#   4. train.py finishes the optimizer step, saves a checkpoint, and exits 75 on every rank. accelerate reports
#      any failed worker as status 1, so the batch shell decides from what it forwarded, not from the status.
#   5. After a forwarded USR1 the batch shell runs `scontrol requeue` (unless the step exited 0: training ended
#      first). The job restarts with the same id, arguments and output folder, SLURM_RESTART_COUNT one higher, and
#      train.py's default `--resume auto` continues from the newest complete checkpoint.
# SIGTERM (scancel, time limit reached, preemption): Slurm sends it to every process of the job, then SIGKILL
# KillWait seconds later. `supervise` forwards it to the workers (which may not get it otherwise), and train.py
# saves if it can in that time. The batch shell waits for the step and does not requeue: a scancel must stop the
# job, and a preempted job is requeued by Slurm itself (PreemptMode=REQUEUE) and resumes the same way.

RESEND_S=${RESEND_S:-30}
MAX_RESTARTS=${MAX_RESTARTS:-20}
STOP_SIGNAL=${STOP_SIGNAL:-}   # USR1 or TERM once the batch shell got one (the scripts' first trap may set it)
GOT_TERM=0

log() { echo "[$(date +%T) ${SLURMD_NODENAME:-$(hostname)}] $*"; }

# Batch shell: cd into the repository, activate the virtualenv, set up CPU runs. Env: REPO_DIR, VENV, CPU.
enter_repo() {
  cd "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
  if [ ! -f train.py ]; then
    echo "$(pwd) is not the arxiv-ft repository: submit from its root or set REPO_DIR" >&2
    exit 1
  fi
  VENV=${VENV-.venv}
  if [ -n "$VENV" ]; then
    if [ -f "$VENV/bin/activate" ]; then
      # shellcheck disable=SC1091
      source "$VENV/bin/activate"
    elif [ "$VENV" != .venv ]; then
      echo "VENV=$VENV: no $VENV/bin/activate" >&2
      exit 1
    fi
  fi
  if [ "${CPU:-0}" != 1 ] && [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" != 0 ] &&
    [ "$(python -c 'import torch; print(torch.version.cuda is None)' 2>/dev/null)" = True ]; then
    # A venv from a plain `bash tools/setup.sh` on a CPU machine holds torch's CPU build: the job would train on
    # the CPUs of a GPU node, hours instead of minutes, without an error.
    echo "$(command -v python) has a CPU-only build of torch, on a node with ${SLURM_GPUS_ON_NODE} GPU(s): make a" \
      "GPU venv (VENV=.venv-gpu TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'" \
      "bash tools/setup.sh) and submit with VENV=.venv-gpu, or set CPU=1 to train on the CPUs on purpose" >&2
    exit 1
  fi
  if [ "${CPU:-0}" = 1 ]; then
    # DDP over gloo on CPUs (accelerate_configs/ddp.yaml, multinode.yaml). Not for DeepSpeed configs: this makes
    # accelerate skip DeepSpeed; for those pass DS_ACCELERATOR=cpu instead (sbatch passes the environment on).
    export ACCELERATE_USE_CPU=1
  fi
  export PYTHONUNBUFFERED=1   # log lines in order, and before a kill
  log "job ${SLURM_JOB_ID:-?} ($SLURM_JOB_NAME) nodes=${SLURM_JOB_NODELIST:-?}" \
    "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} repo=$(pwd) python=$(command -v python)"
}

# Batch shell: the first host of the allocation, where machine rank 0 runs.
head_node() { scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1; }

# Batch shell: run `srun ARGS...` as the job step, forwarding USR1/TERM to it (see the top); sets STEP_RC.
run_step() {
  trap 'on_stop_signal USR1' USR1
  trap 'on_stop_signal TERM' TERM
  # Slurm 22.05's srun no longer inherits the job's --cpus-per-task; without this a task gets one CPU.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
  srun "$@" &
  local pid=$! next_resend=$((SECONDS + RESEND_S))
  [ "$STOP_SIGNAL" = USR1 ] && next_resend=$((SECONDS + 5))   # it came before the step existed
  # Poll rather than `wait $pid`: a trapped signal interrupts `wait`, and then its status says nothing.
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$STOP_SIGNAL" = USR1 ] && [ "$GOT_TERM" = 0 ] && ((SECONDS >= next_resend)); then
      forward_to_steps USR1   # a worker that was still starting up ignored the first one
      next_resend=$((SECONDS + RESEND_S))
    fi
    sleep 1 &
    wait $! 2>/dev/null || true
  done
  STEP_RC=0
  wait "$pid" || STEP_RC=$?
  trap '' USR1   # too late to matter now, and must not kill this shell
  trap - TERM
  log "job step ended with status $STEP_RC"
}

on_stop_signal() {
  log "batch shell got SIG$1: forwarding it to the job steps"
  [ "$1" = TERM ] && GOT_TERM=1
  STOP_SIGNAL=$1
  forward_to_steps "$1"
}

forward_to_steps() {
  # No --batch/--full: every step of this job, on every node, but not this shell.
  scancel --signal="$1" "$SLURM_JOB_ID" || log "scancel --signal=$1 failed (no job step yet, or the job is ending)"
}

# Batch shell, after run_step: requeue after a forwarded USR1, else exit with the step's status.
finish() {
  if [ "$STEP_RC" = 0 ] || [ "$STOP_SIGNAL" != USR1 ] || [ "$GOT_TERM" = 1 ]; then
    exit "$STEP_RC"
  fi
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_RESTARTS" ]; then
    log "stopped on SIGUSR1 but MAX_RESTARTS=$MAX_RESTARTS reached: not requeueing; resubmit to continue"
    exit 75
  fi
  log "stopped on SIGUSR1: requeueing job $SLURM_JOB_ID; the restart resumes where this run stopped"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
  log "scontrol requeue failed: resubmit the same command to resume"
  exit 75   # EX_TEMPFAIL, what train.py exits with after a stop: try again
}

# Inside a task: run the launcher command "$@" with USR1/TERM ignored, forward both to its children (the
# workers) and exit with its status. WORKER_SIGNAL: what the workers get for either signal, `same` (train.py
# handles USR1 and TERM) or a signal name, e.g. KILL for infer.py, which has no handler and resumes from its
# fsynced part files whatever stopped it.
supervise() {
  (
    trap '' USR1 TERM
    exec "$@"
  ) &
  LAUNCHER_PID=$!
  trap 'signal_workers USR1' USR1
  trap 'signal_workers TERM' TERM
  while kill -0 "$LAUNCHER_PID" 2>/dev/null; do
    sleep 1 &
    wait $! 2>/dev/null || true
  done
  local rc=0
  wait "$LAUNCHER_PID" || rc=$?
  log "launcher exited with status $rc"
  exit "$rc"
}

signal_workers() {
  local sig=$1 workers
  [ "${WORKER_SIGNAL:-same}" = same ] || sig=$WORKER_SIGNAL
  workers=$(pgrep -P "$LAUNCHER_PID" | tr '\n' ' ')
  log "task (pid $BASHPID) got SIG$1: sending SIG$sig to the workers (${workers:-none yet})"
  # shellcheck disable=SC2086  # one pid per word
  [ -n "$workers" ] && kill -s "$sig" $workers 2>/dev/null
  return 0
}
