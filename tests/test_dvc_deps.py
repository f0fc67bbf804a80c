"""DVC reruns exactly what changed: each stage's `src/alignkit/` deps are the import closure of what its command runs —
`alignkit <command>` (the CLI, then the command's module; for `alignkit launch STAGE` also the stage's own module),
every alignkit module they import (at the top or inside a function, or name as 'alignkit.x.y:Name'), transitively,
with the `__init__.py` of every package on the way, and nothing else. A module missing from the deps would let DVC
serve a stale result after an edit; an extra one reruns a stage for nothing."""

from __future__ import annotations

import os

import pytest
import yaml

from alignkit.sources import closure, command_modules, imports_of, module_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DVC_FILES = ["dvc.yaml", "pipelines/smol-rs/dvc.yaml", "pipelines/gpt2-nl/dvc.yaml",
             "pipelines/zephyr-7b-beta/dvc.yaml", "pipelines/anima-33b/dvc.yaml"]


def expected_deps(cmd: str) -> set[str]:
    return {f"src/{module_file(m)}" for m in closure(command_modules(cmd))}


def stages():
    for dvc_file in DVC_FILES:
        for name, stage in yaml.safe_load(open(os.path.join(ROOT, dvc_file)))["stages"].items():
            yield pytest.param(dvc_file, name, stage, id=f"{dvc_file}:{name}")


def test_the_closure_follows_packages_lazy_and_named_imports():
    # dpo names its trainer as 'alignkit.train.scoring:PairScoringDPOTrainer'
    assert "alignkit.train.scoring" in imports_of("alignkit.train.dpo")
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


def declared(entries) -> list[str]:
    """The paths of a stage's outs, metrics or plots entries (a path, or a path with options)."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def files_read(stage: dict) -> set[str]:
    """The repository files and folders a stage's command reads: its path arguments under build/, metrics/ or data/
    that are not its own outputs, and for `alignkit report` what it draws each `--stages` metrics file's curves from
    (evaluation/figures.py: <stage>_log.csv and DVCLive's dvclive/<stage>/ beside it)."""
    written = declared(stage.get("outs")) + declared(stage.get("metrics")) + declared(stage.get("plots"))
    tokens = stage["cmd"].replace('"', " ").split()
    read = {t for t in tokens if t.startswith(("build/", "metrics/", "data/"))
            and not any(t == w or t.startswith(w.rstrip("/") + "/") for w in written)}
    if tokens[:2] == ["alignkit", "report"] and "--stages" in tokens:
        for path in tokens[tokens.index("--stages") + 1:]:
            if path.startswith("--"):
                break
            folder, name = os.path.split(path[:-len(".json")])
            read |= {path, f"{path[:-len('.json')]}_log.csv", f"{folder}/dvclive/{name}"}
    return read


@pytest.mark.parametrize("dvc_file,name,stage", list(stages()))
def test_each_stage_depends_on_the_files_it_reads(dvc_file, name, stage):
    """A file a stage reads but does not list would let DVC keep a stale result when only that file changed: the
    zephyr twin's report kept its training figure of the curves before a rerun changed them (its deps named the
    metrics files, not the curves it draws)."""
    deps = stage.get("deps", [])
    missing = sorted(p for p in files_read(stage) if not any(p == d or p.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"{dvc_file}:{name}: add {missing} to its deps"


def test_every_training_log_a_report_reads_is_some_stages_output():
    """The curves a report draws are outputs of the stage that writes them, so DVC tracks them and reruns the report
    when they change."""
    for dvc_file in DVC_FILES:
        all_stages = yaml.safe_load(open(os.path.join(ROOT, dvc_file)))["stages"]
        written = {p for s in all_stages.values()
                   for p in declared(s.get("outs")) + declared(s.get("metrics")) + declared(s.get("plots"))}
        for name, stage in all_stages.items():
            curves = {p for p in files_read(stage) if p.endswith("_log.csv") or "/dvclive/" in p}
            assert curves <= written, f"{dvc_file}:{name}: reads {sorted(curves - written)}, which no stage outputs"
