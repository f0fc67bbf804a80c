"""Recipes: unknown keys with nearest valid ones, CLI beats YAML, cross-field checks, GPU refusal, check."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from alignkit.cli import check
from alignkit.config import load_recipe
from alignkit.errors import RecipeError
from alignkit.train import dpo, sft, stage_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, **keys) -> str:
    base = {"model_name_or_path": "some/model", "datasets": [{"path": "d.jsonl"}], "output_dir": "out"}
    base.update(keys)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base))
    return str(path)


def load(path, argv=(), stage=dpo, **kw):
    spec = stage.SPEC
    return load_recipe(path, list(argv), spec.config_class(), stage_check=spec.stage_check,
                       stage_defaults=spec.defaults, **kw)


def test_unknown_key_names_nearest_valid(tmp_path):
    with pytest.raises(RecipeError) as err:
        load(write(tmp_path, lerning_rate=1e-4))
    assert "unknown key 'lerning_rate'" in str(err.value) and "learning_rate" in str(err.value)


def test_unknown_cli_key_is_named(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'betta' \(command line\).*beta"):
        load(write(tmp_path), ["--betta", "0.2"])


def test_unknown_key_in_a_data_source(tmp_path):
    with pytest.raises(RecipeError, match=r"datasets\[0\]: unknown key 'fracton'.*fraction"):
        load(write(tmp_path, datasets=[{"path": "d.jsonl", "fracton": 0.5}]))


def test_cli_overrides_beat_yaml_and_are_typed(tmp_path):
    r = load(write(tmp_path, beta=0.1, learning_rate=1e-4, lora_target_modules=["q_proj"]),
             ["--beta", "0.3", "--lora_target_modules", "k_proj", "v_proj", "--use_peft", "true"])
    assert r.train.beta == 0.3 and r.train.learning_rate == 1e-4
    assert r.model.lora_target_modules == ["k_proj", "v_proj"] and r.model.use_peft is True
    assert "beta" in r.explicit_keys


def test_cpu_precision_defaults(tmp_path):
    # TRL's own default (bf16=True) raises on a machine without a GPU; alignkit picks fp32 on CPU.
    r = load(write(tmp_path))
    assert r.train.bf16 is False and r.train.fp16 is False and r.train.use_cpu is True
    assert r.train.activation_checkpointing is False  # not worth it on CPU
    assert r.train.report_to == [] or r.train.report_to == "none" or r.train.report_to == ["none"]


def test_sft_defaults_to_assistant_only_loss(tmp_path):
    assert load(write(tmp_path), stage=sft).train.assistant_only_loss is True
    assert load(write(tmp_path, assistant_only_loss=False), stage=sft).train.assistant_only_loss is False


@pytest.mark.parametrize("keys,message", [
    ({"load_in_4bit": True}, "QLoRA .* needs use_peft"),
    ({"load_in_4bit": True, "load_in_8bit": True, "use_peft": True}, "8 bit and 4 bit"),
    ({"loss_type": ["sigmoid", "nonsense"]}, r"loss_type: unknown \['nonsense'\]"),
    ({"loss_type": ["exo_pair"]}, "exo_pair needs label_smoothing > 0"),
    ({"chat_template": "vicuna"}, "unknown template name 'vicuna'"),
    ({"adapter_path": "x", "use_peft": True}, "do not also set use_peft"),
    ({"datasets": []}, "at least one training source"),
    ({"datasets": [{"path": "d.jsonl", "fraction": 1.5}]}, r"fraction must be in \(0, 1\]"),
])
def test_contradictory_recipes_are_refused(tmp_path, keys, message):
    with pytest.raises(RecipeError, match=message):
        load(write(tmp_path, **keys))


def test_fp16_refused_for_dpo_with_reason(tmp_path):
    with pytest.raises(RecipeError, match="fp16 is refused for DPO: the loss is a difference"):
        load(write(tmp_path, fp16=True, bf16=False), for_check=True)


def test_gpu_recipe_refused_on_cpu_before_loading(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RecipeError, match=r"needs a CUDA GPU \(bf16: true\).*nothing was loaded"):
        load(write(tmp_path, bf16=True))
    # ...while `alignkit check` still validates it, with a note
    r = load(write(tmp_path, bf16=True), for_check=True)
    assert any("GPU recipe" in n for n in r.notes)


def test_stage_of_recipe_file_names():
    assert stage_of("recipes/zephyr/dpo_qlora.yaml") == "dpo"
    assert stage_of("recipes/smol/sft.yaml") == "sft"
    assert stage_of("recipes/smol/params.yaml") is None


def test_check_passes_on_every_recipe_in_the_repo(capsys):
    recipes = sorted(glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True))
    assert recipes, "no recipes found"
    assert check(recipes) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.count("ok   ") == len(recipes)


def test_check_reports_a_bad_recipe(tmp_path, capsys):
    bad = tmp_path / "dpo.yaml"
    bad.write_text(yaml.safe_dump({"model_name_or_path": "m", "datasets": ["d.jsonl"], "bta": 0.1}))
    assert check([str(bad)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_global_batch_size_derives_accumulation_from_world_size(tmp_path, tiny_model, tiny_data):
    from trl import DPOConfig

    from alignkit.config import derive_accumulation
    from conftest import tiny_recipe

    path = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", global_batch_size=16, per_device_train_batch_size=2)
    recipe = load_recipe(path, [], DPOConfig)  # this process: world size 1
    assert recipe.train.gradient_accumulation_steps == 8

    def fail(msg):
        raise RecipeError(msg)

    for world, accumulation in ((2, 4), (8, 1)):  # what torchrun/accelerate's WORLD_SIZE gives at launch
        derive_accumulation(recipe, world, fail)
        assert recipe.train.gradient_accumulation_steps == accumulation
    with pytest.raises(RecipeError, match=r"global_batch_size 16 is not divisible by world size 16 × "
                                          r"per_device_train_batch_size 2 = 32"):
        derive_accumulation(recipe, 16, fail)
    with pytest.raises(RecipeError, match="gradient_accumulation_steps 3 contradicts global_batch_size 16"):
        load_recipe(path, ["--gradient_accumulation_steps", "3"], DPOConfig)


def test_trust_remote_code_is_off_unless_a_recipe_asks(tmp_path):
    from alignkit.models import trust_remote_code

    assert trust_remote_code(load(write(tmp_path))) is False
    assert trust_remote_code(load(write(tmp_path, trust_remote_code=True))) is True


def test_activation_checkpointing_under_its_current_name(tmp_path, monkeypatch):
    """alignkit's own arguments raise no deprecation warning; a recipe's old `gradient_checkpointing` is read under
    its transformers-5 name (the new name wins where both are set, so alignkit's default would silently beat it);
    LoRA under ZeRO-3 gets reentrant checkpointing where transformers reads it (TRL 1.16 writes the old name)."""
    import warnings

    import yaml

    from alignkit import config
    from alignkit.train import dpo
    from alignkit.train.stage import reentrant_checkpointing_for_zero3_lora

    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "datasets": [{"path": "a.jsonl"}], "use_peft": True}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        recipe = dpo.SPEC.parse(["--config", str(path)])
    assert recipe.train.activation_checkpointing is False  # CPU
    monkeypatch.setattr(config, "cuda_info", lambda: (True, False))  # a GPU: checkpointing on by default ...
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "datasets": [{"path": "a.jsonl"}], "use_peft": True,
                                    "gradient_checkpointing": False, "use_cpu": True}))
    assert dpo.SPEC.parse(["--config", str(path)]).train.activation_checkpointing is False  # ... unless stated off
    assert dpo.SPEC.parse(["--config", str(path), "--gradient_checkpointing", "true"]).train.activation_checkpointing
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    recipe = dpo.SPEC.parse(["--config", str(path), "--activation_checkpointing", "true"])
    reentrant_checkpointing_for_zero3_lora(recipe)
    assert recipe.train.activation_checkpointing_kwargs == {"use_reentrant": True}
    # TRL's DPOTrainer then writes args.gradient_checkpointing_kwargs["use_reentrant"]: the same dict
    assert recipe.train.gradient_checkpointing_kwargs is recipe.train.activation_checkpointing_kwargs
