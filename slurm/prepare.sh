#!/bin/bash
# CPU step before a GPU job: validate the recipe, read and check every data row, fetch the tokenizer and hub
# datasets into the cache (and pack CPT blocks) — `prepare_only`, no weights loaded, no GPU held.
#   sbatch slurm/prepare.sh STAGE RECIPE [--key value ...]
#SBATCH --job-name=alignkit-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=4:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
STAGE=${1:?usage: sbatch slurm/prepare.sh STAGE RECIPE [--key value ...]}
RECIPE=${2:?usage: sbatch slurm/prepare.sh STAGE RECIPE [--key value ...]}
shift 2
PY=${ALIGNKIT_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec "$PY" -m alignkit "$STAGE" --config "$RECIPE" --prepare_only true "$@"
