#!/usr/bin/env bash
# Times every stage of the smol pipeline from scratch (forced), one after another, on this machine.
# Writes bench/results/smol_pipeline.json. A benchmark, not a test: `make bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
stages=(base_model pairs sft ref_logps dpo evaluate mtbench lmeval alpacaeval report)
out=bench/results/smol_pipeline.json
mkdir -p bench/results
json="{\"machine\": {\"cpus\": $(nproc), \"cpu\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\", \"memory_gb\": $(free -g | awk '/Mem:/{print $2}')}, \"stages\": {"
total_start=$EPOCHREALTIME
sep=""
for s in "${stages[@]}"; do
  start=$EPOCHREALTIME
  dvc repro --force --single-item "$s" > "bench/results/$s.log" 2>&1
  secs=$(awk "BEGIN{print $EPOCHREALTIME - $start}")
  printf '%-10s %6.1f s\n' "$s" "$secs"
  json+="$sep\"$s\": $(printf '%.1f' "$secs")"
  sep=", "
done
total=$(awk "BEGIN{print $EPOCHREALTIME - $total_start}")
json+="}, \"total_seconds\": $(printf '%.1f' "$total")}"
echo "$json" | python -m json.tool > "$out"
rm -f bench/results/*.log
printf 'total      %6.1f s  (%s)\n' "$total" "$out"
