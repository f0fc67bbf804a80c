"""Did this machine reproduce the committed numbers? Compares the working tree's DVC locks, metrics and reports
with a commit (HEAD by default) and lists every difference with its size.

    make verify                      # after make demo (or any dvc repro)
    alignkit verify [--against REV] [PATH ...]

Exit status 0: everything identical; 1: differences (listed); 2: not a git checkout or a bad revision.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import subprocess

import yaml

from alignkit.command import run_cli
from alignkit.errors import UsageError

DEFAULT_PATHS = ["dvc.lock", "pipelines", "metrics", "reports"]
SHOWN = 12  # differences listed per file


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def committed_files(rev: str, paths: list[str]) -> list[str]:
    listed = git("ls-tree", "-r", "--name-only", rev, "--", *paths)
    if listed.returncode != 0:
        raise UsageError(f"cannot read revision {rev!r}: {listed.stderr.strip() or 'not a git checkout'}")
    files = listed.stdout.split()
    return [f for f in files if f.endswith((".lock", ".json", ".csv", ".md", ".tsv"))
            and (not f.startswith("pipelines/") or f.endswith("dvc.lock"))]


def size(a, b) -> str:
    if isinstance(a, bool) or isinstance(b, bool) or not all(isinstance(x, (int, float)) for x in (a, b)):
        return f"{a!r} → {b!r}"
    diff = b - a
    rel = f", {abs(diff) / abs(a):.1e} relative" if a else ""
    return f"{a!r} → {b!r} (Δ {diff:+.3g}{rel})"


def leaves(value, where=""):
    if isinstance(value, dict):
        for k in sorted(value):
            yield from leaves(value[k], f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{where}[{i}]")
    else:
        yield where, value


def diff_structured(old, new) -> list[str]:
    a, b = dict(leaves(old)), dict(leaves(new))
    out = []
    for key in sorted(a.keys() | b.keys()):
        if key not in b:
            out.append(f"{key}: {a[key]!r} → (gone)")
        elif key not in a:
            out.append(f"{key}: (new) {b[key]!r}")
        elif a[key] != b[key] and not (isinstance(a[key], float) and math.isnan(a[key]) and math.isnan(b[key])):
            out.append(f"{key}: {size(a[key], b[key])}")
    return out


def number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def diff_csv(old: str, new: str) -> list[str]:
    a, b = (list(csv.DictReader(io.StringIO(t))) for t in (old, new))
    if len(a) != len(b) or (a and a[0].keys() != b[0].keys()):
        return [f"{len(a)} rows → {len(b)} rows" + ("" if not a or not b or a[0].keys() == b[0].keys()
                                                  else f"; columns {list(a[0])} → {list(b[0])}")]
    out = []
    for col in (a[0] if a else {}):
        rows = [i for i, (x, y) in enumerate(zip(a, b)) if x[col] != y[col]]
        if rows:
            pairs = [(number(a[i][col]), number(b[i][col])) for i in rows]
            nums = [abs(y - x) for x, y in pairs if isinstance(x, float) and isinstance(y, float)]
            largest = f", largest |Δ| {max(nums):.3g}" if nums else ""
            out.append(f"column {col}: {len(rows)} of {len(a)} rows differ (first: row {rows[0] + 1}, "
                       f"{size(*pairs[0])}{largest})")
    return out


def diff_lock(old: str, new: str) -> list[str]:
    a, b = (yaml.safe_load(t) or {} for t in (old, new))
    out = []
    stages_a, stages_b = a.get("stages", {}), b.get("stages", {})
    for stage in sorted(stages_a.keys() | stages_b.keys()):
        sa, sb = stages_a.get(stage), stages_b.get(stage)
        if sa == sb:
            continue
        if sa is None or sb is None:
            out.append(f"stage {stage}: {'new' if sa is None else 'gone'}")
            continue
        changed = []
        for part in ("cmd", "deps", "params", "outs"):
            if sa.get(part) != sb.get(part):
                if part in ("deps", "outs"):
                    pa = {d["path"]: d.get("md5") or d.get("hash") for d in sa.get(part, [])}
                    pb = {d["path"]: d.get("md5") or d.get("hash") for d in sb.get(part, [])}
                    names = sorted(p for p in pa.keys() | pb.keys() if pa.get(p) != pb.get(p))
                    changed.append(f"{part} {', '.join(names)}")
                else:
                    changed.append(part)
        out.append(f"stage {stage}: {'; '.join(changed)} differ")
    return out


def compare(path: str, old: str, new: str) -> list[str]:
    if old == new:
        return []
    try:
        if path.endswith(".json"):
            return diff_structured(json.loads(old), json.loads(new)) or ["formatting differs"]
        if path.endswith(".lock"):
            return diff_lock(old, new) or ["formatting differs"]
        if path.endswith((".csv", ".tsv")):
            return diff_csv(old, new) or ["formatting differs"]
    except (ValueError, yaml.YAMLError) as e:
        return [f"cannot be parsed: {e}"]
    a, b = old.splitlines(), new.splitlines()
    lines = [i for i in range(max(len(a), len(b))) if (a[i] if i < len(a) else None) != (b[i] if i < len(b) else None)]
    first = lines[0]
    return [f"{len(lines)} line(s) differ; first, line {first + 1}: "
            f"{a[first] if first < len(a) else '(none)'!r} → {b[first] if first < len(b) else '(none)'!r}"]


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--against", default="HEAD", help="the revision holding the committed results (default HEAD)")
    p.add_argument("paths", nargs="*", default=DEFAULT_PATHS, help="what to compare (default: locks, metrics, reports)")
    args = p.parse_args(argv)

    files = committed_files(args.against, args.paths)
    differing = 0
    for path in files:
        old = git("show", f"{args.against}:{path}").stdout
        new = open(path).read() if os.path.isfile(path) else None
        found = ["missing here"] if new is None else compare(path, old, new)
        if found:
            differing += 1
            print(f"DIFFERS {path}")
            for line in found[:SHOWN]:
                print(f"    {line}")
            if len(found) > SHOWN:
                print(f"    … and {len(found) - SHOWN} more")
    if differing:
        print(f"{differing} of {len(files)} committed result files differ from {args.against} on this machine")
        return 1
    print(f"reproduced: all {len(files)} committed result files (locks, metrics, reports) are identical to "
          f"{args.against}")
    return 0


def main(argv=None) -> int:
    return run_cli("verify", run, argv)
