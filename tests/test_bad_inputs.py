"""The bad-input catalogue (docs/bad-inputs.md): the kinds not covered elsewhere, each refused with one clear
line before any weights load and without leaving an output — and the catalogue's every row names a real test."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from alignkit.train import dpo, sft
from conftest import tiny_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(stage, argv, capsys, out) -> str:
    assert stage.SPEC.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith(f"alignkit {stage.SPEC.name}: error: ")
    assert not os.path.exists(out), "a refused run left an output"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture
def recipe(tmp_path, tiny_model, tiny_data):
    return tiny_recipe(tmp_path, tiny_model, tiny_data, "sft"), str(tmp_path / "out-sft")


def test_wrong_value_types_name_the_key_and_the_expected_type(recipe, tmp_path, capsys):
    path, out = recipe
    msg = refused(sft, ["--config", path, "--max_steps", "many"], capsys, out)
    assert msg.endswith("command line: max_steps: 'many' is not a valid value; expected int")
    bad = tmp_path / "typed.yaml"
    bad.write_text(open(path).read().replace("learning_rate: 0.001", "learning_rate: fast"))
    msg = refused(sft, ["--config", str(bad)], capsys, out)
    assert "typed.yaml: learning_rate: 'fast' is not a valid value; expected float" in msg
    msg = refused(sft, ["--config", path, "--use_peft", "maybe"], capsys, out)
    assert msg.endswith("use_peft: 'maybe' is not a valid value; expected true or false")
    msg = refused(sft, ["--config", path, "--lr_scheduler_type", "cosin"], capsys, out)
    assert "lr_scheduler_type: 'cosin' is not a valid value" in msg and "cosine" in msg


def test_recipe_paths_missing_or_a_directory(tmp_path, capsys):
    assert "recipe file not found: " in refused(sft, ["--config", str(tmp_path / "nope.yaml")], capsys, "x")
    assert "is a directory, not a recipe file" in refused(sft, ["--config", str(tmp_path)], capsys, "x")


def test_data_directory_without_data_files(recipe, tmp_path, capsys):
    path, out = recipe
    import yaml

    (tmp_path / "empty_dir").mkdir()
    config = yaml.safe_load(open(path))
    config["datasets"] = [{"path": str(tmp_path / "empty_dir")}]
    (tmp_path / "dir.yaml").write_text(yaml.safe_dump(config))
    msg = refused(sft, ["--config", str(tmp_path / "dir.yaml")], capsys, out)
    assert "empty_dir: a directory with no data files" in msg


def test_model_directory_missing_or_without_tokenizer(recipe, tmp_path, tiny_model, capsys):
    path, out = recipe
    msg = refused(sft, ["--config", path, "--model_name_or_path", str(tmp_path / "no-model")], capsys, out)
    assert "no such directory" in msg and "no-model" in msg
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_model, f), weights_only)
    msg = refused(sft, ["--config", path, "--model_name_or_path", str(weights_only)], capsys, out)
    assert "weights-only has no tokenizer" in msg


def without_chat_template(tiny_model, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model, plain)
    for f in os.listdir(plain):
        if f == "chat_template.jinja":
            os.remove(plain / f)
    cfg = (plain / "tokenizer_config.json").read_text()
    (plain / "tokenizer_config.json").write_text(re.sub(r',\s*"chat_template": "(?:[^"\\]|\\.)*"', "", cfg))
    return plain


def test_model_without_chat_template_and_none_configured(recipe, tmp_path, tiny_model, capsys):
    path, out = recipe
    plain = without_chat_template(tiny_model, tmp_path)
    msg = refused(sft, ["--config", path, "--model_name_or_path", str(plain)], capsys, out)
    assert "has no chat template and the recipe sets none; set chat_template:" in msg


def test_answers_from_a_base_model_without_chat_template_are_refused_before_weights(tmp_path, tiny_model, capsys):
    """Anima33B-merged has no chat template: the pairs stage said so with a traceback after loading 33B weights."""
    from alignkit.prepare import pairs

    plain = without_chat_template(tiny_model, tmp_path)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"prompt": "Capital of France?", "completion": "Paris."}) + "\n")
    out = tmp_path / "pairs.jsonl"
    assert pairs.main(["--model", str(plain), "--questions", str(questions), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "has no chat template and none was given: pass --chat_template (smollm2, chatml, zephyr, hh-rlhf" \
        in err[-1] and "Traceback" not in "\n".join(err) and not out.exists()
    assert pairs.main(["--model", str(plain), "--questions", str(questions), "--out", str(out),
                       "--chat_template", "hh-rlhf", "--max_new_tokens", "2"]) == 0
    assert json.loads(out.read_text().splitlines()[0])["chosen"] == [{"role": "assistant", "content": "Paris."}]


def test_liger_with_precomputed_reference_is_refused(tmp_path, tiny_model, tiny_data, capsys):
    path = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo")
    msg = refused(dpo, ["--config", path, "--use_liger_kernel", "true", "--precompute_ref_log_probs", "true"],
                  capsys, str(tmp_path / "out-dpo"))
    assert "use_liger_kernel cannot be combined with precompute_ref_log_probs" in msg


def test_every_catalogue_row_names_an_existing_test():
    table = open(os.path.join(ROOT, "docs", "bad-inputs.md")).read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| kind")]
    assert len(rows) >= 25
    sources = {f: open(os.path.join(ROOT, "tests", f)).read() for f in os.listdir(os.path.join(ROOT, "tests"))
               if f.endswith(".py")}
    for row in rows:
        refs = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row)
        assert refs, f"no test named in: {row}"
        for file, name in refs:
            assert f"def {name}(" in sources.get(file, ""), f"{file}::{name} does not exist ({row})"
