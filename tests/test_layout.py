"""The package's layout keeps its promises (alignkit/__init__.py): dependencies point one way, cli → launch →
{prepare, train, evaluation} → the core; the three stage folders meet only through the core and files on disk; no
import cycles; alignkit's own imports at the top of each module, and only heavy optional libraries deferred into
the functions that need them; `alignkit check`, `plan` and `launch --preflight` start without torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
# Libraries that take seconds to import, or exist only on some machines: a function that needs one imports it.
DEFERRED = {"torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "accelerate", "deepspeed", "lm_eval",
            "alpaca_eval", "vllm", "safetensors", "tqdm", "psutil", "dvclive", "matplotlib"}
LAYER = {"prepare": 1, "train": 1, "evaluation": 1, "launch": 2, "cli": 3, "__main__": 4}  # the core is 0


def modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(os.path.join(SRC, "alignkit")):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), SRC)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return found


MODULES = modules()


def imports(module: str) -> list[tuple[str, bool, int]]:
    """(imported module, at the top of the module?, line) for every import in `module`."""
    path = MODULES[module]
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    tree = ast.parse(open(path).read())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            out += [(n, id(node) in top, node.lineno) for n in (names or [base])]
    return out


def internal_edges() -> dict[str, set[str]]:
    edges = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in imports(m):
            while target and target not in MODULES:  # `from alignkit.train.stage import X` → alignkit.train.stage
                target = target.rpartition(".")[0]
            if target and target != m and target != "alignkit":
                edges[m].add(target)
    return edges


def layer(module: str) -> tuple[int, str]:
    part = module.split(".")[1] if "." in module else ""
    return LAYER.get(part, 0), part


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_inside_alignkit():
    assert cycles(internal_edges()) == []


def test_imports_point_down_and_the_stage_folders_do_not_import_each_other():
    wrong = []
    for m, targets in internal_edges().items():
        for t in targets:
            (lm, pm), (lt, pt) = layer(m), layer(t)
            if t.startswith("alignkit.train") and m.startswith("alignkit.launch"):
                continue  # launch starts training stages: it is above train
            if lt > lm or (lt == lm and lm and pm != pt):
                wrong.append(f"{m} imports {t}")
    assert not wrong, wrong


def test_imports_are_at_the_top_except_heavy_optional_libraries():
    local = [f"{MODULES[m]}:{line}: {name}" for m in MODULES for name, top, line in imports(m)
             if not top and name.split(".")[0] not in DEFERRED]
    assert not local, f"import these at the top of the module (or add a heavy library to DEFERRED): {local}"


def test_checking_planning_and_preflight_start_without_torch():
    code = ("import sys, alignkit.cli, alignkit.launch.launch, alignkit.launch.plan; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": SRC})
    assert out.stdout.strip() == "[]"


def test_the_readme_layout_lists_every_module_and_only_those():
    readme = open(os.path.join(os.path.dirname(SRC), "README.md")).read()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed, folder = set(), None
    for line in block.strip("\n").splitlines()[1:]:  # under src/alignkit/
        names = line.strip().split("  ")[0].split()
        if line.startswith("  ") and not line.startswith("    "):
            folder = None
        if names[0].endswith("/"):
            folder = names[0].rstrip("/")
            continue
        listed.update(".".join(["alignkit", *([folder] if folder else []), n.removesuffix(".py")]) for n in names)
    actual = {m + ".__init__" if MODULES[m].endswith("__init__.py") else m for m in MODULES}
    actual -= {f"alignkit.{p}.__init__" for p in ("prepare", "evaluation", "launch")}  # a docstring each
    assert listed == actual, f"missing from the README: {sorted(actual - listed)}; not in the tree: " \
                             f"{sorted(listed - actual)}"
