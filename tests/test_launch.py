"""`alignkit launch`: refuses before loading anything, derives the launch for multi-node jobs."""

from __future__ import annotations

import os
import sys

import pytest

from alignkit.errors import RecipeError
from alignkit.launch import launch, preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_recipe_is_refused_on_a_machine_without_gpus(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for recipe in ("recipes/zephyr-7b-beta/dpo.yaml", "recipes/anima-33b/dpo.yaml"):
        assert launch.main([recipe.split("/")[-1].split(".")[0], "--config", recipe]) == 2
        err = capsys.readouterr().err
        assert "needs CUDA GPUs and this machine has none; nothing was loaded" in err and recipe in err
    assert launch.main(["--preflight", "recipes/zephyr-7b-beta/sft.yaml"]) == 2


def test_preflight_derives_accumulation_and_refuses_indivisible_world_sizes(monkeypatch):
    monkeypatch.chdir(ROOT)
    for world, accumulation in ((1, 8), (8, 1)):
        recipe = preflight.preflight("sft", "recipes/zephyr-7b-beta/sft.yaml", [], world=world, gpus=8)
        assert recipe.train.gradient_accumulation_steps == accumulation  # global 128 = 16 per device x ...
    with pytest.raises(RecipeError, match="global_batch_size 128 is not divisible by world size 3"):
        preflight.preflight("sft", "recipes/zephyr-7b-beta/sft.yaml", [], world=3, gpus=3)
    # the anima recipe: 1 per device x 16 accumulation on one GPU, 2 on 8
    assert preflight.preflight("dpo", "recipes/anima-33b/dpo.yaml", [], world=8, gpus=8) \
        .train.gradient_accumulation_steps == 2


def test_multi_node_command_carries_rank_and_rendezvous():
    cmd = launch.accelerate_command("dpo", "r.yaml", ["--beta", "0.2"], config="recipes/accelerate/zero3.yaml",
                                    world=16, machines=2, rank=1, address="node-a", port=29612)
    i = cmd.index("accelerate.commands.launch")
    assert cmd[:i] == [sys.executable, "-m"]
    assert cmd[i + 1:] == ["--config_file", "recipes/accelerate/zero3.yaml", "--num_processes", "16",
                           "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "node-a",
                           "--main_process_port", "29612", "-m", "alignkit", "dpo", "--config", "r.yaml",
                           "--beta", "0.2"]


def test_a_run_predicted_not_to_fit_is_refused_unless_forced(monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = preflight.preflight("dpo", "recipes/zephyr-7b-beta/dpo.yaml",
                              ["--precompute_ref_log_probs", "false", "--ref_logps", ""], world=8, gpus=8)
    # full DPO of 7B with DDP and TRL's default online reference: weights, reference, gradients and Adam states
    # on every GPU
    with pytest.raises(RecipeError, match=r"predicted peak .* GiB per GPU does not fit in 80 GiB .*ZeRO-3"):
        launch.check_fits("dpo", recipe, "recipes/zephyr-7b-beta/dpo.yaml", world=8,
                          accelerate_config="recipes/accelerate/ddp.yaml", device_gib=80, force=False)
    est = launch.check_fits("dpo", recipe, "recipes/zephyr-7b-beta/dpo.yaml", world=8,
                            accelerate_config="recipes/accelerate/zero3.yaml", device_gib=80, force=False)
    assert est["peak_gib"] < 76  # sharded over 8 GPUs it fits
    launch.check_fits("dpo", recipe, "recipes/zephyr-7b-beta/dpo.yaml", world=8,
                      accelerate_config="recipes/accelerate/ddp.yaml", device_gib=80, force=True)
    # alignkit's default, precomputed reference log-probs: no reference model in memory; still, full-parameter 7B
    # under DDP keeps fp32 master weights, gradients, gradient buckets and Adam states on every GPU: ZeRO-3 it is
    default = preflight.preflight("dpo", "recipes/zephyr-7b-beta/dpo.yaml", [], world=8, gpus=8)
    with pytest.raises(RecipeError, match=r"predicted peak 153.0 GiB per GPU does not fit .*ddp_buckets 27.0"):
        launch.check_fits("dpo", default, "recipes/zephyr-7b-beta/dpo.yaml", world=8,
                          accelerate_config="recipes/accelerate/ddp.yaml", device_gib=80, force=False)
    est = launch.check_fits("dpo", default, "recipes/zephyr-7b-beta/dpo.yaml", world=8,
                            accelerate_config="recipes/accelerate/zero3.yaml", device_gib=80, force=False)
    assert est["parts_gib"]["reference"] == 0 and est["parts_gib"]["ddp_buckets"] == 0 and est["peak_gib"] < 40


def test_the_accelerate_config_follows_the_recipe_and_impossible_pairs_are_refused(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    # the QLoRA recipes are the handbook's one-GPU runs (global batch 8 and 16)
    recipes = {name: preflight.preflight("sft" if "sft" in name else "dpo", f"recipes/{name}.yaml", [],
                                      world=1 if "qlora" in name else 8, gpus=8)
               for name in ("zephyr-7b-beta/sft", "zephyr-7b-beta/dpo", "zephyr-7b-beta/sft-qlora",
                            "zephyr-7b-beta/dpo-qlora", "anima-33b/dpo")}
    expected = {"zephyr-7b-beta/sft": "zero3", "zephyr-7b-beta/dpo": "zero3", "zephyr-7b-beta/sft-qlora": "ddp",
                "zephyr-7b-beta/dpo-qlora": "ddp", "anima-33b/dpo": "ddp"}
    assert {n: os.path.basename(preflight.default_accelerate_config(r, 8)) for n, r in recipes.items()} == {
        n: f"{c}.yaml" for n, c in expected.items()}
    # without GPUs: the same choice on 2 CPU processes (the CPU twins)
    assert {n: os.path.basename(preflight.default_accelerate_config(r, 0)) for n, r in recipes.items()} == {
        n: f"{c}-cpu.yaml" for n, c in expected.items()}
    configs = {c: launch.read_accelerate_config(f"recipes/accelerate/{c}.yaml")
               for c in ("ddp", "zero2", "zero3", "fsdp", "ddp-cpu", "zero3-cpu")}
    assert all(configs[c]["use_cpu"] and configs[c]["num_processes"] == 2 for c in ("ddp-cpu", "zero3-cpu"))
    from alignkit.launch.preflight import zero_stage_of

    assert zero_stage_of(configs["zero3-cpu"])[0] == 3  # read from its DeepSpeed JSON
    for name in ("ddp", "zero2"):
        preflight.check_launch(recipes["anima-33b/dpo"], "anima", name, configs[name])
    for name in ("zero3", "fsdp", "zero3-cpu"):
        with pytest.raises(RecipeError, match="QLoRA .* under ZeRO-3 or FSDP: 4-bit weights cannot be sharded"):
            preflight.check_launch(recipes["zephyr-7b-beta/dpo-qlora"], "qlora", name, configs[name])
        preflight.check_launch(recipes["zephyr-7b-beta/dpo"], "full", name, configs[name])
    # configs whose final save writes no weights
    sharded = {**configs["fsdp"], "fsdp_config": {**configs["fsdp"]["fsdp_config"],
                                                 "fsdp_state_dict_type": "SHARDED_STATE_DICT"}}
    no_gather = {**configs["zero3"], "deepspeed_config": {**configs["zero3"]["deepspeed_config"],
                                                         "zero3_save_16bit_model": False}}
    assert preflight.accelerate_config_problems(sharded)[0].startswith("fsdp_state_dict_type SHARDED_STATE_DICT")
    assert "zero3_save_16bit_model" in preflight.accelerate_config_problems(no_gather)[0]
    ds_json = tmp_path / "ds.json"  # the same in a DeepSpeed JSON (the CPU twin's form)
    ds_json.write_text('{"zero_optimization": {"stage": 3}}')
    file_no_gather = {**configs["zero3-cpu"], "deepspeed_config": {"deepspeed_config_file": str(ds_json)}}
    assert "stage3_gather_16bit_weights_on_model_save" in preflight.accelerate_config_problems(file_no_gather)[0]
    assert not any(preflight.accelerate_config_problems(c) for c in configs.values())
    with pytest.raises(RecipeError, match="writes no weights"):
        preflight.check_launch(recipes["zephyr-7b-beta/dpo"], "full", "sharded", sharded)


def test_launch_picks_zero3_for_full_recipes_when_none_is_named(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(launch, "gpus_here", lambda: 8)
    monkeypatch.setattr(launch, "gpu_gib", lambda: 80.0)
    assert launch.main(["dpo", "--config", "recipes/zephyr-7b-beta/dpo.yaml", "--dry_run"]) == 0
    assert "--config_file recipes/accelerate/zero3.yaml --num_processes 8" in capsys.readouterr().out
    monkeypatch.setattr(launch, "gpus_here", lambda: 1)  # the handbook's QLoRA runs: one GPU
    assert launch.main(["dpo", "--config", "recipes/zephyr-7b-beta/dpo-qlora.yaml", "--dry_run"]) == 0
    assert "--config_file recipes/accelerate/ddp.yaml --num_processes 1" in capsys.readouterr().out
    assert launch.main(["dpo", "--config", "recipes/zephyr-7b-beta/dpo-qlora.yaml", "--dry_run",
                        "--accelerate_config", "recipes/accelerate/zero3.yaml"]) == 2
    assert "4-bit weights cannot be sharded" in capsys.readouterr().err


def test_srun_gets_the_cpus_per_task_sbatch_was_given():
    # Slurm >= 22.05: srun no longer inherits --cpus-per-task from sbatch (one CPU per task otherwise)
    script = open(os.path.join(ROOT, "slurm", "launch.sh")).read()
    srun = script[script.index("\nsrun "):].split("bash -c")[0]
    assert '--cpus-per-task="${SLURM_CPUS_PER_TASK' in srun


def test_recipes_match_their_source_or_say_why_not():
    """Zephyr against the alignment-handbook's zephyr-7b-beta configs, Anima against its rlhf/ script: the values
    that used to differ silently now match, and each recipe names what still differs and why."""
    import yaml

    def read(name):
        path = os.path.join(ROOT, "recipes", name)
        return yaml.safe_load(open(path)), open(path).read()

    sft, sft_text = read("zephyr-7b-beta/sft.yaml")
    assert sft["assistant_only_loss"] is False and "full sequence" in sft_text  # the handbook's SFT loss
    for name, global_batch in (("sft-qlora", 8), ("dpo-qlora", 16)):
        recipe, text = read(f"zephyr-7b-beta/{name}.yaml")
        assert recipe["global_batch_size"] == global_batch and recipe["use_bnb_nested_quant"] is False
        assert "Against the handbook" in text
    assert "max_prompt_length" in read("zephyr-7b-beta/dpo.yaml")[1]
    anima, text = read("anima-33b/dpo.yaml")
    assert anima["lr_scheduler_type"] == "constant" and "warmup_steps" not in anima
    assert anima["max_length"] == 1200 and "600" in text and "group_by_length" in text
