# Shared body of slurm/<stage>.sh (sourced; STAGE is set by the caller). One task per node; on each node
# `alignkit launch` starts one process per GPU with accelerate, with this node's machine rank and the first node
# of the allocation as the rendezvous. Usage: sbatch [--nodes N] slurm/<stage>.sh RECIPE [--key value ...]
#   ACCELERATE_CONFIG  recipes/accelerate/{ddp,zero2,zero3,fsdp}.yaml (default auto: ddp.yaml for LoRA/QLoRA
#                      recipes, zero3.yaml for full-parameter ones — alignkit launch picks from the recipe)
#   ALIGNKIT_PYTHON    the interpreter with alignkit installed (default: .venv/bin/python, else python)
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
RECIPE=${1:?usage: sbatch slurm/$STAGE.sh RECIPE [--key value ...]}
shift
PY=${ALIGNKIT_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
ACCEL=${ACCELERATE_CONFIG:-auto}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
export MASTER_ADDR MASTER_PORT HF_HUB_ENABLE_HF_TRANSFER=${HF_HUB_ENABLE_HF_TRANSFER:-0}
echo "alignkit $STAGE: job $SLURM_JOB_ID on $SLURM_NNODES node(s) [$SLURM_JOB_NODELIST], rendezvous" \
     "$MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}, recipe $RECIPE"

# The machine rank must be each node's own SLURM_NODEID, so it is expanded inside the task, not here. Since Slurm
# 22.05 srun does not inherit --cpus-per-task from sbatch: without it the step gets one CPU per task, and every
# data loader worker and tokenizer thread of the node shares it.
srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 \
  --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" bash -c \
  'exec "$0" -m alignkit launch "$1" --config "$2" --accelerate_config "$3" --num_machines "$SLURM_NNODES" \
     --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" "${@:4}"' \
  "$PY" "$STAGE" "$RECIPE" "$ACCEL" "$@" &
STEP=$!

# --signal=B:USR1@N reaches this shell N seconds before the time limit or on preemption: pass it to the
# training processes (srun forwards USR1 to every task; the stage checkpoints) and requeue the job, which then
# resumes from that checkpoint.
on_usr1() {
  echo "alignkit $STAGE: USR1 — asking the stage to checkpoint, then requeueing job $SLURM_JOB_ID"
  kill -USR1 "$STEP" 2>/dev/null || true
  wait "$STEP" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap on_usr1 USR1
status=0
wait "$STEP" || status=$?
# 75: the stage saved a checkpoint after SIGTERM/SIGUSR1 (alignkit.errors.REQUEUE_EXIT) — run it again.
if [ "$status" -eq 75 ]; then
  echo "alignkit $STAGE: checkpointed after a signal; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
