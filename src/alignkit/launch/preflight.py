"""The checks before a run, in a second and before anything loads: the recipe validated for the world size it will
run at (gradient accumulation derived from `global_batch_size`), a GPU recipe refused on a machine without GPUs,
and an accelerate config that would save no weights, or shard 4-bit weights, refused with the reason."""

from __future__ import annotations

import json
import os

import yaml

from alignkit.config import derive_accumulation, needs_gpu
from alignkit.errors import RecipeError, UsageError
from alignkit.train import STAGES, stage_module


def gpus_here() -> int:
    import torch  # CUDA is initialised only when asked

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30


def preflight(stage: str, recipe_path: str, overrides: list[str], *, world: int, gpus: int):
    """Validate `recipe_path` for a run of `world` processes on machines with `gpus` GPUs each; return the
    recipe (with gradient accumulation derived for that world size)."""
    if stage not in STAGES:
        raise UsageError(f"unknown stage '{stage}' (one of: {', '.join(STAGES)})")
    recipe = stage_module(stage).SPEC.parse(["--config", recipe_path, *overrides], for_check=True)
    if needs_gpu(recipe) and gpus == 0:
        raise RecipeError(f"{recipe_path}: this recipe needs CUDA GPUs and this machine has none; nothing was "
                          "loaded. Run it on a GPU host (make train-*, sbatch slurm/<stage>.sh, docker run --gpus all)")
    if recipe.alignkit.global_batch_size is not None:
        def fail(msg):
            raise RecipeError(f"{recipe_path}: {msg}")

        derive_accumulation(recipe, world, fail)
    return recipe



ACCELERATE_CONFIGS = "recipes/accelerate"


def default_accelerate_config(recipe, gpus: int) -> str:
    """The accelerate config a recipe runs under unless one is named: data parallel for LoRA and QLoRA (the frozen
    base fits each GPU; 4-bit weights cannot be sharded here), ZeRO-3 for full-parameter training (a 7B model's
    fp32 masters, gradients and Adam states do not fit one GPU). On a machine without GPUs, the same on 2 CPU
    processes (ddp-cpu.yaml, zero3-cpu.yaml): the CPU twins run the multi-process path GPU users take."""
    lora = recipe.model.use_peft or recipe.alignkit.adapter_path
    return os.path.join(ACCELERATE_CONFIGS, ("ddp" if lora else "zero3") + ("" if gpus else "-cpu") + ".yaml")


def read_accelerate_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"accelerate config not found: {path}")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict) or "distributed_type" not in config:
        raise UsageError(f"{path}: not an accelerate config (no distributed_type)")
    return config


def accelerate_config_problems(config: dict) -> list[str]:
    """What in an accelerate config makes the final save write no (or empty) weights."""
    problems = []
    kind = config.get("distributed_type")
    fsdp, ds = config.get("fsdp_config") or {}, config.get("deepspeed_config") or {}
    if kind == "FSDP" and fsdp.get("fsdp_state_dict_type", "FULL_STATE_DICT") != "FULL_STATE_DICT":
        problems.append(f"fsdp_state_dict_type {fsdp['fsdp_state_dict_type']}: Trainer.save_model writes no weights "
                        "with it; use FULL_STATE_DICT")
    if kind == "DEEPSPEED" and ds.get("deepspeed_config_file"):
        zero = deepspeed_json(ds["deepspeed_config_file"]).get("zero_optimization", {})
        if int(zero.get("stage", 0)) == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
            problems.append(f"{ds['deepspeed_config_file']}: ZeRO-3 without stage3_gather_16bit_weights_on_model_save: "
                            "true: the final save holds no gathered weights")
    elif kind == "DEEPSPEED" and int(ds.get("zero_stage", 0)) == 3 and not ds.get("zero3_save_16bit_model"):
        problems.append("ZeRO-3 without zero3_save_16bit_model: true: the final save holds no gathered weights")
    return problems


def deepspeed_json(path: str) -> dict:
    """DeepSpeed's own JSON config that an accelerate config names (paths from the working directory)."""
    with open(path) as f:
        return json.load(f)


def zero_stage(accelerate_config: str | None) -> tuple[int, str | None]:
    """(ZeRO stage, FSDP or None) of an accelerate config; (0, None) for DDP or none."""
    if not accelerate_config:
        return 0, None
    return zero_stage_of(yaml.safe_load(open(accelerate_config)))


def zero_stage_of(cfg: dict) -> tuple[int, str | None]:
    """zero_stage of an accelerate config already read."""
    if cfg.get("distributed_type") == "DEEPSPEED":
        ds = cfg.get("deepspeed_config", {})
        if ds.get("deepspeed_config_file"):  # the stage is in DeepSpeed's own JSON
            return int(deepspeed_json(ds["deepspeed_config_file"]).get("zero_optimization", {}).get("stage", 0)), None
        return int(ds.get("zero_stage", 0)), None
    if cfg.get("distributed_type") == "FSDP":
        return 3, "FSDP"
    return 0, None


def check_launch(recipe, recipe_path: str, config_path: str, config: dict) -> None:
    """Refuse a recipe/accelerate-config pair that cannot work, before anything loads."""
    problems = accelerate_config_problems(config)
    sharded = zero_stage_of(config)[0] == 3  # ZeRO-3, or FSDP full shard
    if sharded and (recipe.model.load_in_4bit or recipe.model.load_in_8bit):
        problems.append("QLoRA (load_in_4bit/8bit) under ZeRO-3 or FSDP: 4-bit weights cannot be sharded without "
                        "bnb_4bit_quant_storage, which alignkit does not set; use recipes/accelerate/ddp.yaml or "
                        "zero2.yaml")
    if problems:
        raise RecipeError(f"{recipe_path} with {config_path}: " + "; ".join(problems))

