"""Issue 15: which stages of alignkit's pipelines still call MKL work whose bits depend on the CPU's vendor
(alignkit.numerics.mkl_vendor_dependent). Reruns each pipeline under `bench/amd_mkl.sh --count` (`dvc repro -f`: its
results are regenerated on this machine, as `make demo` would) and writes each stage's per-process counts to a JSON
file:

    .venv/bin/python bench/vendor_work.py --out bench/results/intel/vendor_dependent_work.json [dvc.yaml ...]

Every process that loads Python reports at exit (bench/amd_mkl/sitecustomize.py): a launched stage gives its ranks'
reports, then the launcher's and accelerate's own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

import machine  # bench/machine.py: the script's own folder is on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = {"dvc.yaml": "smol (make demo)",
             "pipelines/smol-rs/dvc.yaml": "smol-rs (make demo-rs)",
             "pipelines/gpt2-nl/dvc.yaml": "gpt2-nl twin (make demo-gpt2-nl)",
             "pipelines/zephyr-7b-beta/dvc.yaml": "zephyr twin (make train-zephyr VARIANT=twin; 2 processes, ZeRO-3)",
             "pipelines/anima-33b/dvc.yaml": "anima twin (make train-anima VARIANT=twin; 2 processes, QLoRA nf4)"}
STAGE = re.compile(r"^Running stage '(?:[\w./-]*dvc\.yaml:)?(\w+)'")
WHAT = ("Issue 15: the MKL work whose bits depend on the CPU's vendor (alignkit.numerics.mkl_vendor_dependent) that "
        "each stage of each pipeline calls, counted by bench/vendor_work.py while it regenerated the committed "
        "results (`bench/amd_mkl.sh --count dvc repro -f <dvc.yaml>`). One entry per process that reported (a "
        "launched stage: its two ranks, then the launcher and accelerate's own process).")
REPORT = re.compile(r"\[amd_mkl\] vendor-dependent MKL work: (none|[a-z-]+ \d+(?:, [a-z-]+ \d+)*)")


def counted(args: list[str]) -> subprocess.CompletedProcess:
    """`args` (a dvc command) under `bench/amd_mkl.sh --count`, offline, stdout and stderr in one unbuffered stream
    (DVC's stage headers and the stages' reports arrive in the order they were written)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "amd_mkl.sh"), "--count", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stage_reports(log: str) -> dict[str, list[str]]:
    """Each stage's processes' reports ("none", or "exp 16, log 3"), from the log of a `dvc repro` run under
    `amd_mkl.sh --count`; a report belongs to the stage DVC last announced, up to its "Updating lock file" (what
    follows the last stage is DVC's own process)."""
    reports: dict[str, list[str]] = {}
    stage = None
    for line in log.splitlines():
        if match := STAGE.match(line):
            stage = match.group(1)
            reports.setdefault(stage, [])
        elif line.startswith("Updating lock file"):
            stage = None
        elif stage:  # findall: a line may hold two processes' reports written at the same moment
            reports[stage] += REPORT.findall(line)
    return reports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("pipelines", nargs="*", default=list(PIPELINES))
    args = parser.parse_args()
    results = {}
    for dvc_yaml in args.pipelines:
        start = time.monotonic()
        run = counted([os.path.join(os.path.dirname(sys.executable), "dvc"), "repro", "-f", dvc_yaml])
        if run.returncode:
            print(run.stdout[-4000:], file=sys.stderr)
            return run.returncode
        name = PIPELINES.get(dvc_yaml, dvc_yaml)
        results[name] = {"stages": stage_reports(run.stdout), "dvc_repro_f_seconds": round(time.monotonic() - start, 1)}
        print(dvc_yaml, json.dumps(results[name]), flush=True)
    from alignkit.numerics import in_effect  # after the runs: what the stages ran under, as this process would

    # notes a reader added to an earlier file (what the remaining work is, what it was before) stay
    kept = json.load(open(args.out)) if os.path.exists(args.out) else {}
    record = {**kept, "what": WHAT,
              "date": datetime.date.today().isoformat(), "machine": machine.describe(),
              "numerics": in_effect(), "pipelines": {**kept.get("pipelines", {}), **results}}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
