"""The DVC pipelines hang together: every stage's recipe exists and validates, every shipped input exists,
and the smol data builders reproduce the committed files byte for byte."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = ["dvc.yaml", *sorted(glob.glob("pipelines/*/dvc.yaml", root_dir=ROOT))]


def resolved_stages(dvc_file: str) -> dict:
    """Stages with `${...}` filled in from the params.yaml beside the dvc.yaml (as DVC does)."""
    text = open(os.path.join(ROOT, dvc_file)).read()
    params_path = os.path.join(ROOT, os.path.dirname(dvc_file), "params.yaml")
    params = yaml.safe_load(open(params_path)) if os.path.exists(params_path) else {}

    def lookup(match):
        value = params
        for part in match.group(1).split("."):
            value = value[part]
        return str(value)

    return yaml.safe_load(re.sub(r"\$\{([^}]+)\}", lookup, text))["stages"]


@pytest.mark.parametrize("dvc_file", PIPELINES)
def test_stage_recipes_exist_and_validate(dvc_file):
    from alignkit.cli import check

    recipes = []
    for stage in resolved_stages(dvc_file).values():
        recipes += re.findall(r"--config (\S+)", stage["cmd"])
        for dep in stage.get("deps", []):
            if dep.startswith("data/") or dep.startswith("src/"):
                assert os.path.exists(os.path.join(ROOT, dep)), f"{dvc_file}: missing input {dep}"
    assert recipes
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        assert check(recipes) == 0
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("builder", ["data/smol/build.py", "data/gpt2-nl/build.py",
                                     "data/zephyr-7b-beta-twin/build.py", "data/anima-33b-twin/build.py"])
def test_data_builders_reproduce_committed_files(builder, tmp_path):
    """Each builder, run on a copy of data/ with its own outputs deleted, writes them again byte for byte."""
    import shutil

    shutil.copytree(os.path.join(ROOT, "data"), tmp_path / "data")
    folder = os.path.dirname(builder)
    written = sorted(os.path.relpath(f, os.path.join(ROOT, folder))
                     for f in glob.glob(os.path.join(ROOT, folder, "**", "*"), recursive=True)
                     if os.path.isfile(f) and f.endswith((".jsonl", ".json", ".md")))
    assert written
    for f in written:
        os.remove(tmp_path / folder / f)
    subprocess.run([sys.executable, str(tmp_path / builder)], check=True, capture_output=True)
    for f in written:
        assert open(os.path.join(ROOT, folder, f), "rb").read() == open(tmp_path / folder / f, "rb").read(), f


def test_dvc_accepts_the_committed_metrics_and_plots(tmp_path):
    """`dvc metrics show` reads every pipeline's metrics and `dvc plots show` renders the plots."""
    dvc = os.path.join(os.path.dirname(sys.executable), "dvc")
    shown = subprocess.run([dvc, "metrics", "show", "--json"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    for path in ("metrics/evaluate.json", "metrics/mtbench.json", "metrics/dpo.json", "metrics/lmeval.json",
                 "metrics/alpacaeval.json",
                 "metrics/smol-rs/evaluate.json", "metrics/gpt2-nl-twin/cpt.json"):
        assert path in text, path
    assert "reference_f1_score" in text and "eval_perplexity" in text
    plots = subprocess.run([dvc, "plots", "show", "--json", "-o", str(tmp_path / "plots")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert plots.returncode == 0, plots.stderr
    for path in ("metrics/sft_log.csv", "metrics/dpo_log.csv", "metrics/mtbench_categories.csv"):
        assert path in plots.stdout, path


def test_anima_questions_from_belle_format(tmp_path):
    belle = tmp_path / "eval_set.json"
    belle.write_text(json.dumps([
        {"question": "1+1=?", "std_answer": "2", "class": "math"},
        {"question": "写一首诗", "std_answer": "", "class": "generation"},  # no reference: no pair possible
        {"question": "Capital of France?", "std_answer": "Paris.", "class": "open qa"}], ensure_ascii=False))
    out = tmp_path / "q.jsonl"
    script = os.path.join(ROOT, "data", "anima", "questions.py")
    done = subprocess.run([sys.executable, script, "--in", str(belle), "--out", str(out)], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "2 questions with references, 1 without" in done.stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0] == {"prompt": "1+1=?", "completion": "2", "category": "math"} and len(rows) == 2
    belle.write_text(json.dumps([{"question": "ok", "std_answer": "ok"}, {"std_answer": "no question"}]))
    done = subprocess.run([sys.executable, script, "--in", str(belle), "--out", str(out)], capture_output=True,
                          text=True)
    assert done.returncode != 0 and "eval_set.json: row 2: field 'question': missing or empty" in done.stderr


def test_anima_renders_hh_rlhf_text_as_its_dpo_collator_did(tiny_model):
    """Anima33B-merged has no chat template: pairs and DPO use `hh-rlhf`, which renders exactly what Anima's
    collator fed its DPO (BOS + "\\n\\nHuman: q\\n\\nAssistant: a" + EOS), with the answer and EOS as the
    assistant's tokens; the pipeline's pairs stage and the DPO recipe name the same template."""
    import yaml
    from transformers import AutoTokenizer

    from alignkit.templates import resolve_chat_template

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = resolve_chat_template("hh-rlhf")
    conv = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    assert tok.apply_chat_template(conv, tokenize=False) == \
        f"{tok.bos_token}\n\nHuman: Capital of France?\n\nAssistant: Paris.{tok.eos_token}"
    prompt = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{tok.bos_token}\n\nHuman: Capital of France?\n\nAssistant:"  # the answer starts with " "
    out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(answer) == f" Paris.{tok.eos_token}"
    # the prompt's tokens are a prefix of the whole conversation's: the completion is a clean cut
    prompt_ids = tok.apply_chat_template(conv[:1], tokenize=True, return_dict=False, add_generation_prompt=True)
    assert out["input_ids"][:len(prompt_ids)] == prompt_ids

    params = yaml.safe_load(open(os.path.join(ROOT, "pipelines/anima-33b/params.yaml")))
    recipe = yaml.safe_load(open(os.path.join(ROOT, "recipes/anima-33b/dpo.yaml")))
    pairs = yaml.safe_load(open(os.path.join(ROOT, "pipelines/anima-33b/dvc.yaml")))["stages"]["pairs"]["cmd"]
    assert params["chat_template"] == recipe["chat_template"] == "hh-rlhf"
    assert "--chat_template ${chat_template}" in pairs and "--batch_size ${pairs_batch_size}" in pairs


def test_anima_pairs_batch_fits_one_80gb_gpu_and_16_is_refused_before_loading():
    """33B in bf16 plus the KV cache of 16 answers of 512 tokens after a 600-token prompt (Anima's prompt cap)
    does not fit an 80 GB GPU; the pipeline's batch does, and the refusal names one that fits."""
    import pytest
    import yaml

    from alignkit.architecture import KNOWN, check_generation_fits, generation_gib
    from alignkit.errors import UsageError
    from alignkit.launch.plan import GPUS

    params = yaml.safe_load(open(os.path.join(ROOT, "pipelines/anima-33b/params.yaml")))
    recipe = yaml.safe_load(open(os.path.join(ROOT, "recipes/anima-33b/dpo.yaml")))
    anima, gpu = KNOWN[recipe["model_name_or_path"]], GPUS["H100-80GB"][0]
    makefile = open(os.path.join(ROOT, "Makefile")).read()  # the real variant's answer length, set over the twin's
    tokens = 600 + int(re.search(r"\$\(ANIMA\):max_new_tokens=(\d+)", makefile)[1])
    need = generation_gib(anima, batch=16, tokens=tokens)
    assert 60 < need["weights"] < 61.5 and need["total"] > gpu  # 32.5 B parameters in bf16
    fits = check_generation_fits("anima", anima, batch=params["pairs_batch_size"], tokens=tokens, gpu_gib=gpu)
    assert fits["total"] <= gpu - 5  # room for the CUDA context and allocator fragmentation
    with pytest.raises(UsageError, match=r"anima: generating 16 x 1112 tokens needs .* GiB .* > 79.6 GiB .*"
                                         r"--batch_size \d+ fits"):
        check_generation_fits("anima", anima, batch=16, tokens=tokens, gpu_gib=gpu)


def test_inference_names_its_dtype_and_scores_where_it_generates(tmp_path, tiny_model):
    """GPU: bf16 spread over the GPUs for answers, reward scores and lm-eval (never "auto": a merged checkpoint
    saved in float32 would load in float32); CPU: float32. The reward scorer follows the same placement, its
    inputs go to the model's device, and a bf16 scorer gives the fp32 scores to bf16 precision."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignkit.evaluation.lmeval import model_args
    from alignkit.models import inference_dtype, inference_placement
    from alignkit.prepare.rejection_sampling import RewardModelScorer

    assert inference_placement(True) == {"dtype": torch.bfloat16, "device_map": "auto"}
    assert inference_placement(False) == {"dtype": torch.float32, "device_map": None}
    assert inference_dtype(True) == "bfloat16" and model_args(tiny_model, None, 4)["dtype"] == "float32"

    reward = str(tmp_path / "reward")
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(reward)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(reward)
    convs, answers = [[{"role": "user", "content": "Hi"}]] * 2, ["Hello.", "Good day to you."]
    cpu = RewardModelScorer(reward)
    as_on_gpu = RewardModelScorer(reward, on_gpu=True)  # the GPU path's arguments; accelerate places it on CPU here
    assert cpu.model.dtype == torch.float32 and as_on_gpu.model.dtype == torch.bfloat16
    assert torch.allclose(torch.tensor(as_on_gpu(convs, answers)), torch.tensor(cpu(convs, answers)), rtol=0.05,
                          atol=0.05)


# What a CPU twin recipe may change from its real recipe, and why: which model and data, where outputs go, sizes,
# and what the hardware forces (no GPU: fp32, no CUDA-paged optimiser). Anything else is a different recipe.
TWIN_MAY_DIFFER = {
    "model_name_or_path": "model", "output_dir": "location", "metrics_dir": "location", "ref_logps": "location",
    "global_batch_size": "size", "per_device_train_batch_size": "size", "max_eval_samples": "size", "max_steps": "size",
    "requires_gpu": "hardware", "bf16": "hardware", "bnb_4bit_compute_dtype": "hardware", "optim": "hardware",
}


@pytest.mark.parametrize("name", ["sft", "dpo", "sft-qlora", "dpo-qlora"])
def test_zephyr_twin_recipes_differ_from_the_real_ones_only_in_model_data_sizes_and_hardware(name):
    import yaml

    real = yaml.safe_load(open(os.path.join(ROOT, "recipes/zephyr-7b-beta", f"{name}.yaml")))
    twin = yaml.safe_load(open(os.path.join(ROOT, "recipes/zephyr-7b-beta-twin", f"{name}.yaml")))
    assert real.keys() == twin.keys()
    differ = {k for k in real if real[k] != twin[k]}
    assert differ - set(TWIN_MAY_DIFFER) <= {"datasets", "test_datasets"}, differ - set(TWIN_MAY_DIFFER)
    for key in ("datasets", "test_datasets"):  # the same hub set and split, read from the twin's local copy
        for r, t in zip(real[key], twin[key], strict=True):
            assert r["split"] == t["split"] and t["path"] == "data/zephyr-7b-beta-twin/" + r["path"].split("/")[1]
    assert twin["requires_gpu"] is False and twin["bf16"] is False
    assert twin.get("bnb_4bit_compute_dtype", "float32") == "float32" and twin.get("optim") in (None, "adamw_torch")


def test_anima_twin_recipe_differs_from_the_real_one_only_in_model_data_sizes_and_hardware():
    import yaml

    real = yaml.safe_load(open(os.path.join(ROOT, "recipes/anima-33b/dpo.yaml")))
    twin = yaml.safe_load(open(os.path.join(ROOT, "recipes/anima-33b-twin/dpo.yaml")))
    assert real.keys() == twin.keys()
    assert {k for k in real if real[k] != twin[k]} - set(TWIN_MAY_DIFFER) == {"datasets"}
    assert twin["datasets"] == [{"path": real["datasets"][0]["path"].replace("anima-33b", "anima-33b-twin")}]
    assert twin["load_in_4bit"] and twin["use_bnb_nested_quant"] and twin["lora_target_modules"] == "all-linear"
