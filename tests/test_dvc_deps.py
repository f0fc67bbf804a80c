"""DVC reruns exactly what changed: each stage's `src/alignkit/` deps are the import closure of what its command runs —
`alignkit <command>` (the CLI, then the command's module; for `alignkit launch STAGE` also the stage's own module),
every alignkit module they import (at the top or inside a function, or name as 'alignkit.x.y:Name'), transitively,
with the `__init__.py` of every package on the way, and nothing else. A module missing from the deps would let DVC
serve a stale result after an edit; an extra one reruns a stage for nothing."""

from __future__ import annotations

import ast
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")
DVC_FILES = ["dvc.yaml", "pipelines/smol-rs/dvc.yaml", "pipelines/gpt2-nl/dvc.yaml",
             "pipelines/zephyr-7b-beta/dvc.yaml", "pipelines/anima-33b/dvc.yaml"]


def module_file(module: str) -> str | None:
    """src-relative path of an alignkit module or package, or None when `module` is not one."""
    base = os.path.join(*module.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(os.path.join(SRC, candidate)):
            return candidate
    return None


def imports_of(module: str) -> set[str]:
    """alignkit modules that `module` imports anywhere in its body, or names in an 'alignkit.x:Name' string."""
    path = module_file(module)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(os.path.join(SRC, path)).read())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from alignkit.train import sft`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(re.findall(r"\b(alignkit(?:\.\w+)+):\w", node.value))
    return {m for m in found if m.split(".")[0] == "alignkit" and module_file(m)}


def with_packages(module: str) -> set[str]:
    """`module` and the packages Python imports first to reach it (alignkit.train.sft: alignkit, alignkit.train)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def closure(modules: set[str]) -> set[str]:
    """`modules` and everything they import, with the packages on the way."""
    seen, todo = set(), [p for m in modules for p in with_packages(m)]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(p for i in imports_of(m) for p in with_packages(i) if p not in seen)
    return seen


def command_modules(cmd: str) -> set[str]:
    """The modules a stage command runs: the CLI and each `alignkit <command>`'s module (and a launched stage's)."""
    from alignkit.cli import TOOLS
    from alignkit.train import STAGES

    commands = re.findall(r"(?:^|&&\s*|;\s*)alignkit (\w+)(?: (\w+))?", cmd.strip())
    run = {"alignkit.cli"} if commands else set()
    for command, argument in commands:
        run.add(STAGES.get(command) or TOOLS[command])
        if command == "launch" and argument in STAGES:
            run.add(STAGES[argument])
    return run


def expected_deps(cmd: str) -> set[str]:
    return {f"src/{module_file(m)}" for m in closure(command_modules(cmd))}


def stages():
    for dvc_file in DVC_FILES:
        for name, stage in yaml.safe_load(open(os.path.join(ROOT, dvc_file)))["stages"].items():
            yield pytest.param(dvc_file, name, stage, id=f"{dvc_file}:{name}")


def test_the_closure_follows_packages_lazy_and_named_imports():
    # dpo names its trainer as 'alignkit.train.stored_reference:StoredReferenceDPOTrainer'
    assert "alignkit.train.stored_reference" in imports_of("alignkit.train.dpo")
    assert {"alignkit", "alignkit.train", "alignkit.train.stage", "alignkit.config", "alignkit.data",
            "alignkit.models", "alignkit.train.checkpoints"} <= closure({"alignkit.train.sft"})
    assert command_modules("alignkit launch dpo --config r.yaml") == {"alignkit.cli", "alignkit.launch.launch",
                                                                      "alignkit.train.dpo"}


def test_every_stage_runs_through_the_alignkit_command():
    for dvc_file in DVC_FILES:
        text = open(os.path.join(ROOT, dvc_file)).read()
        assert "python -m alignkit" not in text, f"{dvc_file}: call `alignkit <command>`, the one way"


@pytest.mark.parametrize("dvc_file,name,stage", list(stages()))
def test_each_stage_depends_on_exactly_the_code_it_runs(dvc_file, name, stage):
    expected = expected_deps(stage["cmd"])  # none: a stdlib script such as data/anima/questions.py
    listed = [d for d in stage.get("deps", []) if d.startswith("src/")]
    assert len(listed) == len(set(listed)), f"{dvc_file}:{name}: listed twice: {listed}"
    listed = set(listed)
    missing, extra = sorted(expected - listed), sorted(listed - expected)
    assert not missing and not extra, f"{dvc_file}:{name}: add {missing}, remove {extra}"
