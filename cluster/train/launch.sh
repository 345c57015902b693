#!/usr/bin/env bash
# Multi-node `sit train`: run this once per node; torchrun's c10d rendezvous joins the nodes.
#
#   NNODES=4 NPROC_PER_NODE=8 RDZV_ENDPOINT=node-0:29400 RUN_ID=xl2-256 \
#     cluster/train/launch.sh --preset sit-xl2-256 --data s3://bucket/imagenet-256 \
#       --run-dir /scratch/xl2-256 --set checkpoint.url=s3://bucket/runs/xl2-256/checkpoints
#
# Arguments are the trainer's own flags (`sit train --help`), the same on every node. Resume is
# automatic: every start of the trainer continues from the newest complete checkpoint under
# checkpoint.url.
#
# Exit codes and restarts:
#   * the trainer finished (all ranks exit 0)                       -> exit 0
#   * this script got SIGTERM or SIGUSR1 (the node is being taken)  -> it sends SIGUSR1 to the
#     trainer processes, which finish their step, checkpoint and exit 75; then it exits 75, the
#     code a scheduler requeues on (see slurm.sbatch, k8s-job.yaml)
#   * anything else (a rank crashed, another node died and the collectives failed) -> torchrun
#     is started again after RESTART_DELAY seconds, up to MAX_FAILURES times; it waits in the
#     rendezvous until every node is back, and the trainer resumes from the last checkpoint.
#
# Environment [defaults]:
#   NNODES [1]  NPROC_PER_NODE [GPUs on the node, else 1]  RDZV_ENDPOINT [127.0.0.1:29400]
#   RUN_ID [sit-train]  RDZV_CONF [empty; e.g. is_host=1 to pin the rendezvous host]
#   MAX_FAILURES [10]  RESTART_DELAY [5]  PYTHON [python3]
#   DRY_RUN=1 prints the torchrun command and exits.
set -uo pipefail

EXIT_PREEMPTED=75 # trainer/preempt.py: the trainer checkpointed and stopped

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | wc -l)"
  [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
command=(
  "${PYTHON:-python3}" -m cluster.torchrun
  --nnodes "${NNODES:-1}"
  --nproc-per-node "$NPROC_PER_NODE"
  --rdzv-backend c10d
  --rdzv-endpoint "${RDZV_ENDPOINT:-127.0.0.1:29400}"
  --rdzv-id "${RUN_ID:-sit-train}"
  --max-restarts 0
)
if [ -n "${RDZV_CONF:-}" ]; then
  command+=(--rdzv-conf "$RDZV_CONF")
fi
command+=(-m trainer.train "$@")

if [ "${DRY_RUN:-0}" = "1" ]; then
  printf '%q ' "${command[@]}"
  printf '\n'
  exit 0
fi

preempted=0
agent=""
on_signal() {
  preempted=1
  echo "launch.sh: signal received - asking the trainer to checkpoint and stop" >&2
  if [ -n "$agent" ]; then
    pkill -USR1 -P "$agent" 2>/dev/null || true # the ranks are the agent's children
  fi
}
trap on_signal TERM USR1

failures=0
while :; do
  if [ "$preempted" = 1 ]; then # asked to stop between two starts: nothing is running
    exit "$EXIT_PREEMPTED"
  fi
  "${command[@]}" &
  agent=$!
  # `wait` returns early when a trapped signal arrives: wait again until torchrun has exited.
  # While stopping, repeat the signal: ranks still in the rendezvous when it first came did not
  # exist yet (the trainer treats a repeated request as one).
  while :; do
    wait "$agent"
    code=$?
    kill -0 "$agent" 2>/dev/null || break
    if [ "$preempted" = 1 ]; then
      pkill -USR1 -P "$agent" 2>/dev/null || true
      sleep 1
    fi
  done
  agent=""
  if [ "$preempted" = 1 ]; then
    echo "launch.sh: stopped on request (trainer exit $code); exiting $EXIT_PREEMPTED to be requeued" >&2
    exit "$EXIT_PREEMPTED"
  fi
  if [ "$code" -eq 0 ]; then
    exit 0
  fi
  failures=$((failures + 1))
  if [ "$failures" -gt "${MAX_FAILURES:-10}" ]; then
    echo "launch.sh: torchrun failed $failures times (last exit $code); giving up" >&2
    exit "$code"
  fi
  echo "launch.sh: torchrun exited $code; restarting ($failures/${MAX_FAILURES:-10}) - the trainer resumes from its last checkpoint" >&2
  sleep "${RESTART_DELAY:-5}"
  if [ "$preempted" = 1 ]; then
    exit "$EXIT_PREEMPTED"
  fi
done
