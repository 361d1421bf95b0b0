#!/bin/bash
# The MCIP pipeline as a SLURM batch job that survives preemption and time limits.
#
#   sbatch launch/slurm_mcip.sh MANIFEST                  # every stage, in this one allocation
#   sbatch launch/slurm_mcip.sh MANIFEST --stage caption  # one stage (what `python -m pipeline submit` does)
#   python -m pipeline submit MANIFEST [--dry-run]        # one job per stage with its own resources, afterok
#
# Data stages (download, caption, evaluate): `srun` starts every task of the allocation; each takes its
# share of the pending shards from SLURM_PROCID/SLURM_NTASKS (and SLURM_ARRAY_TASK_ID in an array).
# Training stages (finetune, realign): `srun` starts one torchrun per node, rendezvous on the first node
# (its NodeAddr). A requeued job that restarts on fewer (or more) nodes resumes from the newest
# checkpoint with the same global batch: more gradient accumulation steps, the engine state converted
# to the new number of processes (DeepSpeed's universal checkpoint; README "Training on several nodes").
# On USR1 (sent `signal_lead` seconds before the time limit or on preemption) or TERM, the running step
# gets USR1: data tasks abandon the current shard (nothing half-written stays), training writes a
# checkpoint; then the job requeues itself while SLURM_RESTART_COUNT < MCIP_MAX_REQUEUES and the next
# start resumes from the markers and the newest checkpoint.
#SBATCH --job-name=mcip
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
set -uo pipefail

MANIFEST=${1:?usage: sbatch slurm_mcip.sh MANIFEST [--stage S | --from S]}
shift
PYTHON=${MCIP_PYTHON:-python3}
MAX_REQUEUES=${MCIP_MAX_REQUEUES:-3}
RESTART=${SLURM_RESTART_COUNT:-0}  # unset on the first run
NPROC=${MCIP_NPROC_PER_NODE:-1}
PORT=${MCIP_RDZV_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
say() { echo "[slurm_mcip $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?} restart $RESTART] $*"; }

step=""
signalled=""
forward() {  # runs in the batch shell; the step keeps running until it has stopped cleanly
  signalled=$1
  say "got $1: asking the running step to stop cleanly"
  [ -n "$step" ] && kill -USR1 "$step" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

wait_step() {  # `wait` returns early when a trapped signal arrives: wait until the step is gone
  local rc
  wait "$step"; rc=$?
  while kill -0 "$step" 2>/dev/null; do wait "$step"; rc=$?; done
  step=""
  return $rc
}

run_data_stage() {  # STAGE LOGDIR
  srun --export=ALL --kill-on-bad-exit=0 --open-mode=append --output="$2/%j-task%t.log" \
    "$PYTHON" -m stages."$1" "$MANIFEST" &
  step=$!
}

head_address() {  # the first node of the allocation, as SLURM reaches it (NodeAddr; its name otherwise)
  local head addr
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  addr=$(scontrol show node "$head" -o 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
  echo "${addr:-$head}"
}

run_training_stage() {  # STAGE LOGDIR
  local head
  head=$(head_address)
  # one task per node holding all of the node's CPUs: torchrun's workers share them
  srun --export=ALL --ntasks-per-node=1 --ntasks="${SLURM_JOB_NUM_NODES:-1}" --kill-on-bad-exit=1 \
    --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
    --open-mode=append --output="$2/%j-node%n.log" \
    bash -c 'exec "$0" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --node_rank="$SLURM_NODEID" \
      --nproc_per_node="$1" --master_addr="$2" --master_port="$3" \
      --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m stages."$4" "$5"' \
    "$PYTHON" "$NPROC" "$head" "$PORT" "$1" "$MANIFEST" &
  step=$!
}

requeue_or_stop() {
  if [ "$RESTART" -lt "$MAX_REQUEUES" ]; then
    say "$signalled: requeueing (restart $((RESTART + 1)) of at most $MAX_REQUEUES)"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    say "scontrol requeue failed; the job ends here, resubmit to continue"
    exit 1
  fi
  say "$signalled: requeue cap reached (SLURM_RESTART_COUNT=$RESTART, max_requeues=$MAX_REQUEUES); resubmit to continue"
  exit 3
}

plan=$("$PYTHON" -m pipeline slurm-steps "$MANIFEST" "$@") || { say "cannot plan the stages (error above)"; exit 2; }
while read -r stage kind logdir <&3; do  # fd 3: srun would swallow the plan on stdin
  [ -n "$stage" ] || continue
  [ -n "$signalled" ] && requeue_or_stop  # the signal came between two stages
  mkdir -p "$logdir"
  say "stage $stage ($kind): start"
  "run_${kind}_stage" "$stage" "$logdir"
  wait_step; rc=$?
  [ -n "$signalled" ] && requeue_or_stop
  if [ "$rc" -ne 0 ]; then
    say "stage $stage failed (exit $rc); task logs: $logdir"
    exit "$rc"
  fi
  say "stage $stage: done"
done 3<<< "$plan"
