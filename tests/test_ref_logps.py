"""Reference log-probs as an artifact (alignkit ref_logps) and length-grouped batching, on the tiny model."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import yaml
from safetensors.torch import load_file

from conftest import tiny_recipe, write_jsonl


def losses(out_dir) -> list[float]:
    with open(os.path.join(out_dir, "train_log.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def adapter(out_dir) -> dict:
    return load_file(os.path.join(out_dir, "adapter_model.safetensors"))


def dpo_recipe(tmp_path, name, tiny_model, tiny_data, **overrides) -> str:
    (tmp_path / name).mkdir()
    return tiny_recipe(tmp_path / name, tiny_model, tiny_data, "dpo", **overrides)


def test_stored_reference_trains_exactly_like_trl_precompute(tmp_path, tiny_model, tiny_data):
    from alignkit.train import dpo, ref_logps

    store = str(tmp_path / "ref")
    recipe = dpo_recipe(tmp_path, "stored", tiny_model, tiny_data, ref_logps=store)
    summary = ref_logps.compute(["--config", recipe])
    assert summary == {"rows": {"train": 16, "test": 4}, "dropped_rows": {"train": 0, "test": 0}}
    assert sorted(os.listdir(store)) == ["manifest.json", "reference.json", "test.jsonl", "train.jsonl"]
    rows = [json.loads(line) for line in open(os.path.join(store, "train.jsonl"))]
    assert len(rows) == 16 and all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 for r in rows)
    # the same rows twice in the data (tiny_data repeats them): the same content key, the same values
    assert rows[0]["key"] == rows[8]["key"] and rows[0]["ref_chosen_logps"] == rows[8]["ref_chosen_logps"]
    reference = json.load(open(os.path.join(store, "reference.json")))["reference"]
    assert reference["max_length"] == 64 and len(reference["model_name_or_path"]["sha256"]) == 64

    stored = dpo.train(["--config", recipe])
    trl_own = dpo.train(["--config", dpo_recipe(tmp_path, "trl", tiny_model, tiny_data)])
    assert losses(tmp_path / "stored" / "out-dpo") == losses(tmp_path / "trl" / "out-dpo")
    a, b = adapter(tmp_path / "stored" / "out-dpo"), adapter(tmp_path / "trl" / "out-dpo")
    assert all((a[k] == b[k]).all() for k in a)
    assert stored["eval_loss"] == trl_own["eval_loss"]
    assert stored["eval_reward_accuracy"] == trl_own["eval_reward_accuracy"]
    manifest = json.load(open(tmp_path / "stored" / "out-dpo" / "manifest.json"))
    assert manifest["inputs"]["ref_logps"]["path"] == store


def test_stored_values_are_the_ones_used(tmp_path, tiny_model, tiny_data):
    """Shift every stored chosen log-prob by +1: at step 1 (policy == reference) the chosen log-ratio is then -1
    and the rejected one 0, so the sigmoid loss is -log σ(β·(-1)) = log(1 + e^0.1) — not ln 2."""
    from alignkit.train import dpo, ref_logps

    store = tmp_path / "ref"
    recipe = dpo_recipe(tmp_path, "run", tiny_model, tiny_data, ref_logps=str(store), max_steps=1)
    ref_logps.compute(["--config", recipe])
    for split in ("train", "test"):
        rows = [json.loads(line) for line in open(store / f"{split}.jsonl")]
        write_jsonl(store / f"{split}.jsonl", [{**r, "ref_chosen_logps": r["ref_chosen_logps"] + 1.0} for r in rows])
    dpo.train(["--config", recipe])
    assert losses(tmp_path / "run" / "out-dpo")[0] == pytest.approx(math.log(1 + math.exp(0.1)), abs=1e-5)


def test_stale_or_missing_reference_is_refused_before_loading(tmp_path, tiny_model, tiny_data):
    from alignkit.errors import RecipeError
    from alignkit.train import dpo, ref_logps

    store = str(tmp_path / "ref")
    recipe = dpo_recipe(tmp_path, "run", tiny_model, tiny_data, ref_logps=store)
    with pytest.raises(FileNotFoundError, match="no reference log-probs in .*ref.*alignkit.ref_logps"):
        dpo.train(["--config", recipe])
    ref_logps.compute(["--config", recipe])
    with pytest.raises(RecipeError, match="max_length: stored 64, this recipe 48.*recompute"):
        dpo.train(["--config", recipe, "--max_length", "48"])
    extra = write_jsonl(tmp_path / "more.jsonl", [{"prompt": "Name a colour.", "chosen": "Red.",
                                                   "rejected": "I like turtles."}])
    other_data = dpo_recipe(tmp_path, "other", tiny_model, tiny_data, ref_logps=store, datasets=[{"path": extra}])
    with pytest.raises(RecipeError, match=r"no reference log-probs for train row 1 \(1 of 1 rows missing\)"):
        dpo.train(["--config", other_data])
    # a β or loss change is not a different reference: the same artifact serves it
    dpo.train(["--config", recipe, "--beta", "0.5", "--loss_type", "ipo", "--max_steps", "1"])


def test_ref_logps_recipe_errors(tmp_path, tiny_model, tiny_data):
    from alignkit.train import ref_logps, sft

    no_dir = dpo_recipe(tmp_path, "a", tiny_model, tiny_data)
    assert ref_logps.main(["--config", no_dir]) == 2  # no ref_logps directory named
    off = dpo_recipe(tmp_path, "b", tiny_model, tiny_data, ref_logps=str(tmp_path / "r"),
                     precompute_ref_log_probs=False)
    from alignkit.train import dpo

    assert dpo.main(["--config", off]) == 2
    (tmp_path / "c").mkdir()
    wrong_stage = tiny_recipe(tmp_path / "c", tiny_model, tiny_data, "sft", ref_logps=str(tmp_path / "r"))
    assert sft.main(["--config", wrong_stage]) == 2


@pytest.mark.parametrize("dvc_file", ["dvc.yaml", "pipelines/zephyr-7b-beta/dvc.yaml", "pipelines/anima-33b/dvc.yaml"])
def test_pipeline_ref_logps_stage_depends_only_on_reference_keys(dvc_file):
    """A β or loss sweep (`dvc exp run -S dpo.beta=…`) must not rerun ref_logps; keys that change the reference
    log-probs must. The stage lists only recipe keys among VALUE_KEYS and ROW_KEYS (the smol one: all the recipe
    has), writes where the recipe's `ref_logps` points, and dpo depends on it."""
    import re

    from alignkit.train.stored_reference import ROW_KEYS, VALUE_KEYS
    from test_pipelines import ROOT, resolved_stages

    stages = resolved_stages(dvc_file)
    recipe_path = re.search(r"--config (\S+)", stages["ref_logps"]["cmd"]).group(1)
    assert recipe_path == re.search(r"--config (\S+)", stages["dpo"]["cmd"]).group(1)
    recipe = yaml.safe_load(open(os.path.join(ROOT, recipe_path)))
    (listed,) = [list(p.values())[0] for p in stages["ref_logps"]["params"] if isinstance(p, dict)]
    allowed = [k for k in (*VALUE_KEYS, *ROW_KEYS) if k in recipe]
    assert set(listed) <= set(allowed) and "beta" not in listed and "loss_type" not in listed
    if dvc_file == "dvc.yaml":
        assert sorted(listed) == sorted(allowed)
    assert stages["ref_logps"]["outs"] == [recipe["ref_logps"]] and recipe["ref_logps"] in stages["dpo"]["deps"]


def test_length_grouping_cuts_padding(tmp_path, tiny_model, tiny_data):
    """Replies of 1 to 24 words, batches of 2: grouped by length, pairs of near-equal length share a batch. (The
    Trainer's sampler groups within megabatches of min(rows // (4 × batch), 50) batches, so it needs rows.)"""
    from alignkit.train import dpo

    words = "red green blue cold warm yes no hello paris tokyo four five".split()
    rows = [{"prompt": f"Say {k} words.", "chosen": " ".join(words[:1 + k % 12]),
             "rejected": "no " + " ".join((words * 2)[:1 + (k * 7) % 24])} for k in range(64)]
    data = {**tiny_data, "pref_train": write_jsonl(tmp_path / "varied.jsonl", rows)}
    (tmp_path / "g").mkdir(), (tmp_path / "r").mkdir()
    common = dict(per_device_train_batch_size=2, max_steps=1)
    grouped = dpo.train(["--config", tiny_recipe(tmp_path / "g", tiny_model, data, "dpo", **common,
                                                 train_sampling_strategy="group_by_length",
                                                 remove_unused_columns=False)])
    shuffled = dpo.train(["--config", tiny_recipe(tmp_path / "r", tiny_model, data, "dpo", **common)])
    assert 0 < grouped["train_padding_fraction"] < 0.75 * shuffled["train_padding_fraction"] < 1


def test_padding_fraction_golden(tmp_path, tiny_model, tiny_data):
    """One batch holding every row: padded positions = 2N sequences × the longest prompt + reply."""
    from alignkit.train.batches import padding_fraction
    from alignkit.train.dpo import SPEC
    from alignkit.train.stage import import_object, load_inputs, make_trainer

    recipe = SPEC.parse(["--config", tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", per_device_train_batch_size=16,
                                                 train_sampling_strategy="group_by_length",
                                                 remove_unused_columns=False)])
    train_ds, eval_ds, _, tokenizer, model = load_inputs(recipe, SPEC.data_kind)
    trainer = make_trainer(import_object(SPEC.trainer), recipe, model, tokenizer, train_ds, eval_ds)
    rows = trainer.train_dataset
    assert len(rows) == 16 and rows["length"] == [len(r["prompt_ids"]) + max(len(r["chosen_ids"]),
                                                                            len(r["rejected_ids"])) for r in rows]
    real = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    assert padding_fraction(trainer) == pytest.approx(1 - real / (32 * max(rows["length"])), abs=1e-12)


def test_beta_sweep_with_dvc_experiments_reruns_only_dpo(tmp_path, tiny_model, tiny_data):
    """The smol pipeline's shape in a fresh Git + DVC project: `dvc exp run -S dpo.beta=…` runs dpo and reads the
    stored reference log-probs; a max_length change recomputes them."""
    import subprocess
    import sys

    from alignkit.train.stored_reference import ROW_KEYS, VALUE_KEYS

    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}

    def run(*cmd):
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    recipe = yaml.safe_load(open(tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", max_steps=2)))
    recipe.update(output_dir="build/dpo", ref_logps="build/ref_logps", metrics_dir="metrics")
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "params.yaml").write_text("dpo:\n  beta: 0.1\n")
    keys = [k for k in (*VALUE_KEYS, *ROW_KEYS) if k in recipe]
    pipeline = {"stages": {
        "ref_logps": {"cmd": "python -m alignkit ref_logps --config dpo.yaml", "params": [{"dpo.yaml": keys}],
                      "outs": ["build/ref_logps"]},
        "dpo": {"cmd": "python -m alignkit dpo --config dpo.yaml --beta ${dpo.beta}", "deps": ["build/ref_logps"],
                "params": ["dpo.beta", {"dpo.yaml": None}], "outs": ["build/dpo"],
                "metrics": [{"metrics/dpo.json": {"cache": False}}]}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "config", "core.analytics", "false")
    run("dvc", "repro")
    stored = (tmp_path / "build" / "ref_logps" / "train.jsonl").read_text()
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")

    out = run("dvc", "exp", "run", "-S", "dpo.beta=0.5")
    assert "Running stage 'dpo'" in out and "Running stage 'ref_logps'" not in out
    assert "reference log-probs read from build/ref_logps (not computed)" in out
    assert json.load(open(tmp_path / "metrics" / "dpo.json"))["train_steps"] == 2
    assert (tmp_path / "build" / "ref_logps" / "train.jsonl").read_text() == stored

    out = run("dvc", "exp", "run", "-S", "dpo.yaml:max_length=48")
    assert "Running stage 'ref_logps'" in out and "Running stage 'dpo'" in out


def test_the_artifact_names_no_absolute_path(tmp_path, tiny_model, tiny_data, monkeypatch):
    """A recipe of repository-relative paths, as the pipelines' are: the manifest DVC hashes holds no path of this
    machine (it named the reference pass's absolute run directory, so a clone elsewhere rewrote dvc.lock)."""
    import shutil

    from alignkit.train import ref_logps

    shutil.copytree(tiny_model, tmp_path / "model")
    (tmp_path / "data").mkdir()
    for name in ("pref_train", "pref_test"):
        shutil.copy(tiny_data[name], tmp_path / "data" / f"{name}.jsonl")
    monkeypatch.chdir(tmp_path)
    relative = {k: f"data/{k}.jsonl" for k in ("pref_train", "pref_test")}
    recipe = tiny_recipe(tmp_path, "model", relative, "dpo", output_dir="build/dpo", ref_logps="build/ref")
    ref_logps.compute(["--config", os.path.relpath(recipe)])
    text = open(tmp_path / "build" / "ref" / "manifest.json").read()

    def strings(x):
        if isinstance(x, dict):
            return [s for v in x.values() for s in strings(v)]
        return [s for v in x for s in strings(v)] if isinstance(x, list) else [x] if isinstance(x, str) else []

    assert str(tmp_path) not in text and not [s for s in strings(json.loads(text)) if s.startswith("/")]
