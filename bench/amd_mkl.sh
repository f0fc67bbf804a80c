#!/usr/bin/env bash
# Run a command on an Intel CPU with MKL's vendor-dependent work (vector math such as exp and log, matrix-vector
# products: alignkit.numerics.mkl_vendor_dependent) computed as on an AMD CPU (bench/amd_mkl/sitecustomize.py); for
# issue 15's diagnosis, e.g.
#   bench/amd_mkl.sh .venv/bin/dvc repro -f pipelines/smol-rs/dvc.yaml && .venv/bin/alignkit verify
# With --count first (any CPU), only count that work: each process says at exit how much of it it called.
set -euo pipefail
mode=1
if [ "${1:-}" = "--count" ]; then
  mode=count
  shift
elif ! grep -q GenuineIntel /proc/cpuinfo; then
  echo "amd_mkl.sh: this CPU is not an Intel one; MKL already computes as on AMD here (nothing to emulate)" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
export ALIGNKIT_AMD_MKL=$mode PYTHONPATH="$here/amd_mkl${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$here/../.venv/bin:$PATH"
exec "$@"
