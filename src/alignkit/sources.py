"""Which of alignkit's source files a command runs: its module and every alignkit module that imports — at the top,
inside a function, or named as 'alignkit.x.y:Name' — transitively, with the `__init__.py` of every package on the
way. A DVC stage's `src/` deps are exactly this set (tests/test_dvc_deps.py), and a manifest's `code_sha256` hashes
it: an output's recorded code changes exactly when DVC reruns its stage, so DVC's run cache never serves an output
whose manifest a fresh run would write differently.
"""

from __future__ import annotations

import ast
import os
import re

from alignkit.registry import STAGES, TOOLS

# the folder that holds the alignkit package (src/ in the repository, site-packages when installed)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_file(module: str) -> str | None:
    """ROOT-relative path of an alignkit module or package, or None when `module` is not one."""
    base = os.path.join(*module.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(os.path.join(ROOT, candidate)):
            return candidate
    return None


def imports_of(module: str) -> set[str]:
    """alignkit modules that `module` imports anywhere in its body, or names in an 'alignkit.x:Name' string."""
    path = module_file(module)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
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
    """The modules a shell command runs: the CLI and each `alignkit <command>`'s module (and a launched stage's)."""
    commands = re.findall(r"(?:^|&&\s*|;\s*)alignkit (\w+)(?: (\w+))?", cmd.strip())
    run = {"alignkit.cli"} if commands else set()
    for command, argument in commands:
        run.add(STAGES.get(command) or TOOLS[command])
        if command == "launch" and argument in STAGES:
            run.add(STAGES[argument])
    return run


def source_files(modules: set[str]) -> list[str]:
    """ROOT-relative paths of the files of `modules` and their closure, sorted."""
    return sorted(module_file(m) for m in closure(modules))
