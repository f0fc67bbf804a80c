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
