"""The command line end to end, in subprocesses, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import tiny_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def alignkit(*args, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "alignkit", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_sft_then_dpo_from_the_command_line(tmp_path, tiny_model, tiny_data):
    sft = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", metrics_dir=str(tmp_path / "metrics"))
    r = alignkit("sft", "--config", sft, "--max_steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    dpo = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", use_peft=False, adapter_path=str(tmp_path / "out-sft"),
                      metrics_dir=str(tmp_path / "metrics"))
    # python -m alignkit dpo is the same entry point as `alignkit dpo`
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "alignkit", "dpo", "--config", dpo, "--beta", "0.25", "--max_steps", "1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sft_metrics = json.load(open(tmp_path / "metrics" / "sft.json"))
    dpo_metrics = json.load(open(tmp_path / "metrics" / "dpo.json"))
    assert sft_metrics["train_steps"] == 2 and dpo_metrics["train_steps"] == 1
    import yaml

    resolved = yaml.safe_load(open(tmp_path / "out-dpo" / "config.yaml"))
    assert resolved["beta"] == 0.25 and resolved["adapter_path"] == str(tmp_path / "out-sft")
    assert resolved["output_dir"] == str(tmp_path / "out-dpo")


def test_user_errors_are_one_line_without_traceback(tmp_path, tiny_model, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", lerning_rate=0.1)
    r = alignkit("sft", "--config", recipe)
    assert r.returncode == 2
    assert "alignkit sft: error: unknown key 'lerning_rate'" in r.stderr and "learning_rate" in r.stderr
    assert "Traceback" not in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    recipe = tiny_recipe(tmp_path, tiny_model, {**tiny_data, "sft_train": str(bad)}, "sft")
    r = alignkit("sft", "--config", recipe)
    assert r.returncode == 2 and f"{bad}: row 1: field 'messages'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out-sft").exists()


def test_check_command_over_repo_recipes():
    import glob

    recipes = sorted(glob.glob(os.path.join("recipes", "**", "*.yaml"), recursive=True))
    r = alignkit("check", *recipes)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok   ") == len(recipes)


def test_unknown_command_suggests():
    r = alignkit("dpp")
    assert r.returncode == 2 and "did you mean: dpo" in r.stderr


def test_every_command_in_the_readme_is_registered():
    import re

    from alignkit.cli import TOOLS
    from alignkit.train import STAGES

    readme = open(os.path.join(ROOT, "README.md")).read()
    used = set(re.findall(r"`alignkit ([a-z][a-z_-]+)", readme)) - {"check"}
    assert used and used <= set(STAGES) | set(TOOLS), used - set(STAGES) - set(TOOLS)
    r = alignkit("mtbench", "--help")
    assert r.returncode == 0 and "--judge" in r.stdout
