"""DVC reruns exactly what changed: each stage's `src/alignkit/*.py` deps are the import closure of the modules its
command runs — every alignkit module it imports (at the top or inside a function, or names as 'alignkit.x:Name'),
transitively, and nothing else. A module missing from the deps would let DVC serve a stale result after an edit;
an extra one reruns a stage for nothing."""

from __future__ import annotations

import ast
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src", "alignkit")
DVC_FILES = ["dvc.yaml", "pipelines/smol-rs/dvc.yaml", "pipelines/gpt2-nl/dvc.yaml",
             "pipelines/zephyr-7b-beta/dvc.yaml", "pipelines/anima-33b/dvc.yaml"]


def imports_of(module: str) -> set[str]:
    """alignkit modules that `module` imports anywhere in its body, or names in an 'alignkit.x:Name' string."""
    tree = ast.parse(open(os.path.join(SRC, f"{module}.py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import a / from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "alignkit":
                names = [node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names]
            else:
                continue
            found.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("alignkit."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(re.findall(r"\balignkit\.(\w+):\w", node.value))
    return {m for m in found if os.path.isfile(os.path.join(SRC, f"{m}.py"))}


def closure(modules: set[str]) -> set[str]:
    """`modules` and everything they import; with the package's __init__ (it runs before any of them)."""
    if not modules:
        return set()
    seen, todo = set(), [*modules, "__init__"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(imports_of(m) - seen)
    return seen


def stage_modules(cmd: str) -> set[str]:
    """The modules a stage command runs: `python -m alignkit.X`, and for `alignkit.launch STAGE` the stage's own."""
    from alignkit.cli import STAGES

    run = set(re.findall(r"python -m alignkit\.(\w+)", cmd))
    for stage in re.findall(r"python -m alignkit\.launch (\w+)", cmd):
        run.add(STAGES[stage].split(".")[1])
    return run


def stages():
    for dvc_file in DVC_FILES:
        for name, stage in yaml.safe_load(open(os.path.join(ROOT, dvc_file)))["stages"].items():
            yield pytest.param(dvc_file, name, stage, id=f"{dvc_file}:{name}")


def test_the_closure_follows_lazy_and_named_imports():
    # dpo names its trainer as 'alignkit.ref_logps:StoredReferenceDPOTrainer' and imports ref_logps in a function
    assert "ref_logps" in imports_of("dpo")
    assert {"stage", "config", "data", "models", "reliability"} <= closure({"sft"})


@pytest.mark.parametrize("dvc_file,name,stage", list(stages()))
def test_each_stage_depends_on_exactly_the_code_it_runs(dvc_file, name, stage):
    modules = stage_modules(stage["cmd"])  # none: a stdlib script such as data/anima/questions.py
    expected = {f"src/alignkit/{m}.py" for m in closure(modules)}
    listed = [d for d in stage.get("deps", []) if d.startswith("src/")]
    assert len(listed) == len(set(listed)), f"{dvc_file}:{name}: listed twice: {listed}"
    listed = set(listed)
    missing, extra = sorted(expected - listed), sorted(listed - expected)
    assert not missing and not extra, f"{dvc_file}:{name}: add {missing}, remove {extra}"
