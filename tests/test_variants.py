"""Every way of training the recipes offer: all DPO losses, full fine-tuning, QLoRA, packing, sources."""

from __future__ import annotations

import math
import os

import pytest

from alignkit.train.dpo import LOSS_TYPES
from conftest import tiny_recipe
from test_stages import first_logged, run_stage


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_trl_dpo_loss_is_reachable_from_a_recipe(tmp_path, tiny_model, tiny_data, loss_type):
    extra = {"label_smoothing": 1e-3} if loss_type == "exo_pair" else {}  # EXO needs it (a recipe check says so)
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", max_steps=1, loss_type=[loss_type], **extra)
    metrics = run_stage("dpo", recipe)
    assert math.isfinite(metrics["train_loss"]) and metrics["train_steps"] == 1


def test_full_finetuning_dpo_keeps_a_reference_and_starts_at_ln2(tmp_path, tiny_model, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", use_peft=False, max_steps=2)
    run_stage("dpo", recipe)
    assert first_logged(str(tmp_path / "out-dpo")) == pytest.approx(math.log(2), abs=1e-6)
    files = os.listdir(tmp_path / "out-dpo")
    assert "model.safetensors" in files and "adapter_config.json" not in files


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_qlora_nf4_double_quant_trains(tmp_path, tiny_qlora_model, tiny_data, stage):
    # bitsandbytes >= 0.45 runs 4-bit nf4 on CPU, so the QLoRA path is exercised here for real (on AVX2 and on
    # AVX-512 BF16 CPUs, where evaluation and the reference pass take bitsandbytes' packed-weight kernel).
    recipe = tiny_recipe(tmp_path, tiny_qlora_model, tiny_data, stage, load_in_4bit=True, use_bnb_nested_quant=True,
                         bnb_4bit_quant_type="nf4", max_steps=2)
    metrics = run_stage(stage, recipe)
    assert math.isfinite(metrics["train_loss"])
    if stage == "dpo":  # reference = adapter-disabled quantised model: step 1 is still the closed form
        assert first_logged(str(tmp_path / "out-dpo")) == pytest.approx(math.log(2), abs=1e-5)
    assert "adapter_model.safetensors" in os.listdir(tmp_path / f"out-{stage}")


def load_4bit(tmp_path, model_dir, tiny_data):
    from alignkit.models import load_model, load_tokenizer
    from alignkit.train import sft

    recipe = sft.SPEC.parse(["--config", tiny_recipe(tmp_path, model_dir, tiny_data, "sft", load_in_4bit=True,
                                                     use_bnb_nested_quant=True)])
    return load_model(recipe, load_tokenizer(recipe))


def test_qlora_model_is_really_4bit(tmp_path, tiny_qlora_model, tiny_data):
    import bitsandbytes as bnb

    model = load_4bit(tmp_path, tiny_qlora_model, tiny_data)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all(m.weight.quant_type == "nf4" for m in linear4)
    assert linear4[0].weight.quant_state.nested  # double quantisation


def test_a_4bit_model_computes_the_same_bits_in_eval_and_in_training_on_any_cpu(tmp_path, tiny_qlora_model,
                                                                                  tiny_data):
    """On a CPU with AVX-512 BF16, bitsandbytes would run eval-mode, no-grad 4-bit layers (evaluation, the reference
    pass) through a packed-weight kernel that training does not use: a QLoRA DPO's reference log-probs would then
    differ from the policy's at step 0 (the anima twin: loss 0.6808, not ln 2, on such a CPU). Portable numerics
    keep every 4-bit layer on the training kernel (AVX2-only CPUs never pack: there this holds trivially)."""
    import bitsandbytes as bnb
    import torch

    model = load_4bit(tmp_path, tiny_qlora_model, tiny_data)
    assert not any(m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200]])
    model.train()
    with torch.no_grad():
        trained = model(ids).logits
    model.eval()
    with torch.no_grad():
        evaluated = model(ids).logits
    assert torch.equal(trained, evaluated)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_4bit_cpu_packing_shapes_are_checked_on_every_cpu(tmp_path, tiny_model, tiny_qlora_model, tiny_data):
    """bitsandbytes' AVX-512 BF16 packing (pure torch, so it runs on any CPU) accepts every layer of the QLoRA test
    model, and refuses the hidden-32 model exactly where alignkit's check does, which names the layer instead."""
    import copy

    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from alignkit.errors import RecipeError
    from alignkit.models import check_cpu_4bit_packing

    def packs(model):
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                _convert_weight_packed_for_cpu(m.weight.data.clone(), copy.deepcopy(m.weight.quant_state))

    (tmp_path / "good").mkdir(), (tmp_path / "small").mkdir()
    good = load_4bit(tmp_path / "good", tiny_qlora_model, tiny_data)
    packs(good)
    check_cpu_4bit_packing(good, packs=True)
    small = load_4bit(tmp_path / "small", tiny_model, tiny_data)
    with pytest.raises(RuntimeError, match="is invalid for input of size"):
        packs(small)
    with pytest.raises(RecipeError, match=r"AVX-512 BF16.*layer .*q_proj is 32 -> 32"):
        check_cpu_4bit_packing(small, packs=True)
    check_cpu_4bit_packing(small, packs=False)  # an AVX2-only CPU never packs: nothing to refuse


def test_sft_with_packing(tmp_path, tiny_model, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", packing=True, max_length=128, max_steps=2)
    assert math.isfinite(run_stage("sft", recipe)["train_loss"])


def test_local_dataset_directory_source(tmp_path, tiny_model, tiny_data):
    import shutil

    d = tmp_path / "prefs"
    d.mkdir()
    shutil.copy(tiny_data["pref_train"], d / "train.jsonl")
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", datasets=[{"path": str(d), "split": "train"}],
                         max_steps=1)
    assert run_stage("dpo", recipe)["train_rows"] == 16


def test_gguf_path_is_split_into_directory_and_file(tmp_path):
    from alignkit.models import model_location

    f = tmp_path / "m.Q4.gguf"
    f.write_bytes(b"GGUF")
    assert model_location(str(f), None) == (str(tmp_path), {"gguf_file": "m.Q4.gguf"})
    assert model_location("org/model", "x.gguf") == ("org/model", {"gguf_file": "x.gguf"})
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        model_location(str(tmp_path / "missing.gguf"), None)


@pytest.mark.parametrize("keys,deepspeed,expected", [
    ({"use_peft": True}, False, "bfloat16"),  # a frozen base: half precision
    ({"use_peft": False}, False, "float32"),  # trained weights: fp32 masters under autocast
    ({"use_peft": False, "dtype": "auto"}, False, "float32"),
    ({"use_peft": False}, True, "bfloat16"),  # DeepSpeed keeps the fp32 masters itself
    ({"use_peft": False, "dtype": "float16"}, False, "float16"),  # stated: honoured (with a warning)
    ({"use_peft": True, "dtype": "float32"}, False, "float32"),
])
def test_load_dtype_follows_what_is_trained(tmp_path, tiny_model, tiny_data, monkeypatch, keys, deepspeed, expected):
    import torch

    from alignkit.models import torch_dtype
    from alignkit.train import dpo

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true" if deepspeed else "false")
    recipe = dpo.SPEC.parse(["--config", tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", bf16=True, use_cpu=True,
                                                     **keys)])
    trains_all = not recipe.model.use_peft
    assert torch_dtype(recipe, trains_all_weights=trains_all) == getattr(torch, expected)


def test_bf16_on_cpu_only_when_stated(tmp_path, tiny_model, tiny_data):
    from alignkit.config import cuda_info
    from alignkit.errors import RecipeError
    from alignkit.train import dpo

    if cuda_info()[0]:
        pytest.skip("this machine has a GPU")
    with pytest.raises(RecipeError, match=r"needs a CUDA GPU \(bf16: true\)"):
        dpo.SPEC.parse(["--config", tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", bf16=True)])
    assert dpo.SPEC.parse(["--config", tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", bf16=True,
                                                   use_cpu=True)]).train.bf16


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_plain_path_is_a_data_source_end_to_end(tmp_path, tiny_model, tiny_data, stage):
    """`datasets: [data/my.jsonl]` passed validation, then crashed after the model loaded (the fingerprint read
    `spec.get`); both forms are one mapping from validation on."""
    import json

    kind = "sft" if stage == "sft" else "pref"
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, stage, datasets=[tiny_data[f"{kind}_train"]],
                         test_datasets=[tiny_data[f"{kind}_test"]], max_steps=1)
    metrics = run_stage(stage, recipe)
    assert metrics["train_rows"] == 16 and metrics["eval_rows"] == 4
    out = tmp_path / f"out-{stage}"
    assert f"`{tiny_data[f'{kind}_train']}`" in (out / "README.md").read_text()
    assert json.load(open(out / "manifest.json"))["inputs"]["train_data_0"]["path"] == tiny_data[f"{kind}_train"]
