#!/bin/bash
# Submit the CPU preparation step and the GPU stage after it:  slurm/submit.sh STAGE RECIPE [sbatch options...]
set -euo pipefail
STAGE=${1:?usage: slurm/submit.sh STAGE RECIPE [sbatch options...]}
RECIPE=${2:?usage: slurm/submit.sh STAGE RECIPE [sbatch options...]}
shift 2
prep=$(sbatch --parsable slurm/prepare.sh "$STAGE" "$RECIPE")
job=$(sbatch --parsable --dependency=afterok:"$prep" "$@" "slurm/$STAGE.sh" "$RECIPE")
echo "prepare: job $prep; $STAGE: job $job (starts when $prep succeeds)"
