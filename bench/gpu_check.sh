#!/usr/bin/env bash
# The GPU check, one prepared script for a lent GPU host with no network (about 5 min on one H100/H200; at most 8).
#   here:      bash bench/gpu_bundle.sh        # .gpu/: the wheels the host lacks + SmolLM2's config and tokenizer
#   GPU host:  bash bench/gpu_check.sh --out "$OUT"         (carry .gpu)
#   anywhere:  bash bench/gpu_check.sh --tiny --out DIR     # tiny shapes on CPU: checks the script (the suite does)
# torch, transformers, peft and accelerate are the host's own; gpu_check.py says which versions ran and refuses,
# in one line, when a package is missing. Results: DIR/gpu_check.{json,md} and a JSON per DPO shape.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${GPU_BUNDLE:-.gpu}
python=${PYTHON:-python3}
if compgen -G "$bundle/wheels/*.whl" > /dev/null; then
  site=$(mktemp -d /tmp/gpu-site.XXXXXX)
  "$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" "$bundle"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
shape_dir=$bundle/smollm2
[ -f "$shape_dir/config.json" ] || shape_dir=build/models/base
exec timeout 480 "$python" bench/gpu_check.py --shape-dir "$shape_dir" "$@"
