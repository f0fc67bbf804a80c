#!/bin/bash
# alignkit orpo on a Slurm cluster:  sbatch [--nodes N] slurm/orpo.sh RECIPE [--key value ...]
# Run the CPU preparation step first (slurm/prepare.sh, or slurm/submit.sh orpo RECIPE which chains both).
#SBATCH --job-name=alignkit-orpo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
STAGE=orpo
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
