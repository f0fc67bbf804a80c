#!/bin/bash
# alignkit ref_logps (reference log-probs of a DPO recipe, once per sweep):  sbatch slurm/ref_logps.sh DPO_RECIPE [--key value ...]
# Run the CPU preparation step first (slurm/prepare.sh, or slurm/submit.sh ref_logps RECIPE which chains both), then
# sbatch slurm/dpo.sh with the same recipe (and again for each β or loss of a sweep): it reads them.
#SBATCH --job-name=alignkit-ref-logps
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
STAGE=ref_logps
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
