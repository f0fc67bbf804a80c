#!/usr/bin/env bash
# What a GPU host without network needs for bench/gpu_check.sh, made here into .gpu/ (git-ignored):
#   .gpu/wheels/   the pinned wheels (requirements/cpu.lock) of the packages the lent hosts lack — trl,
#                  bitsandbytes, datasets and datasets' dill and multiprocess — for CPython 3.12 on manylinux x86-64;
#                  more with GPU_BUNDLE_EXTRA="name ..." (pinned from cpu.lock too)
#   .gpu/smollm2/  SmolLM2's config.json and tokenizer, no weights (gpu_check builds random ones), from the
#                  base_model stage's output (make demo, or alignkit base_model)
# It fails when the bundle and the repository's files together pass the 64 MiB a device call may carry.
#   bash bench/gpu_bundle.sh && then, on the host: bash bench/gpu_check.sh   (carry .gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.gpu}
limit=$((64 * 1024 * 1024))
base=build/models/base
[ -f "$base/config.json" ] || { echo "gpu_bundle: $base/config.json missing: run make demo (or alignkit base_model) first" >&2; exit 2; }
rm -rf "$out"
mkdir -p "$out/wheels" "$out/smollm2"
pins=()
for name in trl bitsandbytes datasets dill multiprocess ${GPU_BUNDLE_EXTRA:-}; do
  pin=$(grep -i "^${name}==" requirements/cpu.lock) || { echo "gpu_bundle: $name is not pinned in requirements/cpu.lock" >&2; exit 2; }
  pins+=("$pin")
done
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$out/wheels" "${pins[@]}" 2> >(grep -v "^WARNING: Location" >&2)
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$base/$f" ] && cp "$base/$f" "$out/smollm2/"
done
bundle=$(du -sb "$out" | cut -f1)
# what a device call carries besides: the repository's tracked files
tree=$(git ls-files -z | python3 -c "import os, sys; print(sum(os.path.getsize(p) for p in sys.stdin.read().split(chr(0)) if os.path.isfile(p)))")
python3 -c "import sys; b, t = int(sys.argv[1]), int(sys.argv[2]); print(f'gpu_bundle: {sys.argv[3]}: {b / 2**20:.1f} MiB + repository {t / 2**20:.1f} MiB = {(b + t) / 2**20:.1f} MiB of the 64 MiB a call carries')" "$bundle" "$tree" "$out"
if [ $((bundle + tree)) -gt $limit ]; then echo "gpu_bundle: over 64 MiB" >&2; exit 1; fi
