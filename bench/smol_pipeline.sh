#!/usr/bin/env bash
# Times the smol demo as `make demo` runs it — one `dvc repro` — with every stage forced, on this machine.
# A stage's seconds run from DVC's "Running stage" line to the next one: its command and DVC's work on its outputs.
# Writes bench/results/smol_pipeline.json (or $1). A benchmark, not a test: `make bench`.
# `--per-stage` times one `dvc repro --force --single-item` per stage instead (how the rows before 2026-12-07 were
# measured: each stage pays DVC's start-up and pipeline checks once more, which `make demo` does not).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" PYTHONUNBUFFERED=1
mode=one-repro
if [[ "${1:-}" == --per-stage ]]; then mode=per-stage; shift; fi
out=${1:-bench/results/smol_pipeline.json}
mkdir -p "$(dirname "$out")"
python - "$mode" "$out" <<'EOF'
import json, os, re, subprocess, sys, time

mode, out = sys.argv[1:]
stages = ["base_model", "pairs", "sft", "ref_logps", "dpo", "evaluate", "mtbench", "lmeval", "alpacaeval", "report"]
log_path = os.path.splitext(out)[0] + ".log"
starts, seconds = [], {}
begin = time.perf_counter()
with open(log_path, "w") as log:
    def run(cmd):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            m = re.match(r"Running stage '([^']+)'", line)
            if m:
                starts.append((m.group(1), time.perf_counter()))
                print(f"{m.group(1)} ...", flush=True)
        if proc.wait():
            sys.exit(f"{' '.join(cmd)} failed (rc {proc.returncode}); its output: {log_path}")

    if mode == "per-stage":
        for stage in stages:
            start = time.perf_counter()
            run(["dvc", "repro", "--force", "--single-item", stage])
            seconds[stage] = time.perf_counter() - start
    else:
        run(["dvc", "repro", "--force"])
        ends = [t for _, t in starts[1:]] + [time.perf_counter()]
        seconds = {name: end - start for (name, start), end in zip(starts, ends)}
total = time.perf_counter() - begin
sys.path.insert(0, "bench")
import machine  # bench/machine.py
memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
# machines of one kind come with different instruction sets (AVX2 only, AVX-512 with BF16): say which this was
result = {"machine": {"cpus": os.cpu_count(), "cpu": machine.cpu_name(), "isa": machine.isa_flags(),
                      "memory_gb": memory},
          "method": "one `dvc repro --force` (as `make demo`)" if mode == "one-repro"
          else "one `dvc repro --force --single-item` per stage",
          "stages": {s: round(seconds[s], 1) for s in sorted(seconds, key=lambda s: (stages + [s]).index(s))},
          "total_seconds": round(total, 1)}
with open(out, "w") as f:
    json.dump(result, f, indent=4)
    f.write("\n")
os.remove(log_path)
for s, v in result["stages"].items():
    print(f"{s:<10} {v:6.1f} s")
print(f"total      {total:6.1f} s  ({out})")
EOF
