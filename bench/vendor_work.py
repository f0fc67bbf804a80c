"""Issue 15: which stages of alignkit's pipelines still call MKL work whose bits depend on the CPU's vendor
(alignkit.numerics.mkl_vendor_dependent). Reruns each pipeline under `bench/amd_mkl.sh --count` (`dvc repro -f`: its
results are regenerated on this machine, as `make demo` would) and writes each stage's per-process counts to a JSON
file:

    .venv/bin/python bench/vendor_work.py --out bench/results/intel/vendor_dependent_work.json [dvc.yaml ...]

Every process that loads Python reports at exit (bench/amd_mkl/sitecustomize.py): a launched stage gives its ranks'
reports, then the launcher's and accelerate's own.

That counter sees ATen's operators, not the MKL calls inside ATen's own kernels (the CPU flash-attention kernel
multiplies blocks of queries and keys with MKL's sgemm: alignkit/attention.py). `--mkl_verbose` counts instead every
BLAS call MKL itself logs (`MKL_VERBOSE=1`) and, per stage, those with one row or one column (matrix-vector work):

    .venv/bin/python bench/vendor_work.py --mkl_verbose --out bench/results/amd_avx512/mkl_blas_calls.json
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


def offline_env(**extra: str) -> dict[str, str]:
    """This environment, offline (as `make demo` runs the stages), with unbuffered output, and `extra`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1", **extra}


def counted(args: list[str]) -> subprocess.CompletedProcess:
    """`args` (a dvc command) under `bench/amd_mkl.sh --count`, offline, stdout and stderr in one unbuffered stream
    (DVC's stage headers and the stages' reports arrive in the order they were written)."""
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "amd_mkl.sh"), "--count", *args], cwd=ROOT,
                          env=offline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


BLAS_CALL = re.compile(r"MKL_VERBOSE ([SDCZ]\w+)\(([^)]*)\)")
GEMMS = {"SGEMM": (2, 3), "DGEMM": (2, 3)}  # positions of M and N among their logged arguments


def blas_counts(dvc_yaml: str) -> dict[str, dict]:
    """Per stage of `dvc repro -f dvc_yaml` run with MKL_VERBOSE=1: how many BLAS calls MKL logged, by function, and
    how many products among them have one row or one column. Streamed: a stage logs ~10^5 calls."""
    venv = os.path.dirname(sys.executable)
    # stage commands call the venv's alignkit and python (amd_mkl.sh puts it first on PATH for counted())
    env = offline_env(MKL_VERBOSE="1", PATH=venv + os.pathsep + os.environ.get("PATH", ""))
    dvc = os.path.join(venv, "dvc")
    counts: dict[str, dict] = {}
    stage = None
    with subprocess.Popen([dvc, "repro", "-f", dvc_yaml], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as run:
        for line in run.stdout:
            if match := STAGE.match(line):
                stage = match.group(1)
                counts[stage] = {"blas_calls": 0, "one_row_or_column": 0, "by_function": {}}
            elif stage and (call := BLAS_CALL.search(line)):
                name, args = call.group(1), call.group(2).split(",")
                entry = counts[stage]
                entry["blas_calls"] += 1
                entry["by_function"][name] = entry["by_function"].get(name, 0) + 1
                if name in GEMMS and "1" in (args[GEMMS[name][0]], args[GEMMS[name][1]]):
                    entry["one_row_or_column"] += 1
                elif name not in GEMMS and name[1:] in ("GEMV", "GER", "DOT", "AXPY"):
                    entry["one_row_or_column"] += 1
    if run.returncode:
        raise SystemExit(f"dvc repro -f {dvc_yaml} failed ({run.returncode})")
    return counts


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
    parser.add_argument("--mkl_verbose", action="store_true",
                        help="count the BLAS calls MKL logs instead (also those inside ATen's kernels)")
    parser.add_argument("pipelines", nargs="*", default=list(PIPELINES))
    args = parser.parse_args()
    results = {}
    for dvc_yaml in args.pipelines:
        start = time.monotonic()
        if args.mkl_verbose:
            name = PIPELINES.get(dvc_yaml, dvc_yaml)
            results[name] = {"stages": blas_counts(dvc_yaml), "dvc_repro_f_seconds": round(time.monotonic() - start, 1)}
            print(dvc_yaml, json.dumps(results[name]), flush=True)
            continue
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
    what = WHAT if not args.mkl_verbose else (
        "Issue 15: the BLAS calls MKL logged (MKL_VERBOSE=1) in each stage of each pipeline while bench/vendor_work.py "
        "--mkl_verbose regenerated the committed results (`dvc repro -f <dvc.yaml>`), by function, and how many "
        "of them have one row or one column (matrix-vector work, whose bits differ between Intel and AMD CPUs).")
    record = {**kept, "what": what,
              "date": datetime.date.today().isoformat(), "machine": machine.describe(),
              "numerics": in_effect(), "pipelines": {**kept.get("pipelines", {}), **results}}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
