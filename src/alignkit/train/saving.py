"""Saving a trained model: the weights (safetensors) checked against the model that was trained, a LoRA adapter
merged into its base when the recipe asks, the per-step log and the model card."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from alignkit.config import Recipe
from alignkit.errors import SaveError
from alignkit.models import (
    DTYPES,
    load_pretrained,
    model_location,
    normalize_saved_configs,
    torch_dtype,
    trust_remote_code,
)


def save_trained(trainer, tokenizer, out_dir: str, merge_into=None) -> None:
    """Save the model (or adapter) as safetensors plus the tokenizer, then check what was written. Every rank calls
    this (ZeRO-3 and FSDP gather the weights from all of them); the main process writes. `merge_into(out_dir)`, when
    given, writes the adapter merged into its base under merged/ (see merge_saved_adapter)."""
    model = trainer.model
    main = trainer.args.should_save
    if hasattr(model, "peft_config") and len(model.peft_config) > 1:
        # DPO from an SFT adapter adds a frozen "ref" copy of it; only the trained adapter is the result.
        if main:
            model.save_pretrained(out_dir, selected_adapters=["default"])
    else:
        trainer.save_model(out_dir)  # safetensors (transformers 5 always saves safetensors)
    if not main:
        return
    tokenizer.save_pretrained(out_dir)
    normalize_saved_configs(out_dir)
    verify_saved(out_dir, expected_shapes(model))
    if merge_into is not None:  # (config.validate refuses merge_adapter without an adapter)
        merge_into(out_dir)


def _saved_name(name: str) -> str:
    """A parameter's or saved tensor's name without wrapper prefixes and PEFT's adapter name, so the two compare."""
    for prefix in ("module.", "base_model.model.", "_orig_mod."):
        name = name.removeprefix(prefix)
    name = name.replace(".default.", ".").replace(".modules_to_save.", ".")  # PEFT saves a module_to_save as itself
    return name.replace("._fsdp_wrapped_module.", ".").replace("._checkpoint_wrapped_module.", ".")


def expected_shapes(model) -> dict[str, tuple]:
    """{saved name: full shape} of what a save must contain: the trainable parameters of a PEFT model (its adapter),
    every parameter of a full one. Sharded parameters report their full shape (ZeRO-3: `ds_shape`; FSDP2's
    DTensors: `shape`), so this needs no gather."""
    peft = hasattr(model, "peft_config")
    shapes = {}
    for name, p in model.named_parameters():
        if peft and (not p.requires_grad or ".ref." in name):
            continue
        shapes[_saved_name(name)] = tuple(getattr(p, "ds_shape", None) or p.shape)
    return shapes


def verify_saved(out_dir: str, expected: dict[str, tuple]) -> None:
    """Read back every tensor's shape (no data) from the safetensors files in `out_dir` and compare them with the
    model's: a main-process save of partitioned parameters writes (0,)-shaped tensors, a sharded-state-dict save
    none at all, and both otherwise pass for success."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    if not files:
        raise SaveError(f"no weights were written to {out_dir} (no .safetensors file): with FSDP use "
                        "fsdp_state_dict_type: FULL_STATE_DICT; with ZeRO-3 zero3_save_16bit_model: true")
    saved = {}
    for name in files:
        with safe_open(os.path.join(out_dir, name), "pt") as f:
            saved.update({_saved_name(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    empty = [k for k, shape in saved.items() if 0 in shape]
    wrong = [f"{k} {saved[k]} (model {expected[k]})" for k in saved if k in expected and saved[k] != expected[k]]
    missing = [k for k in expected if k not in saved and not k.endswith("lm_head.weight")]  # tied heads are not saved
    if empty or wrong or missing:
        detail = "; ".join(filter(None, [
            f"{len(empty)} empty tensors, e.g. {empty[0]}" if empty else "",
            f"{len(wrong)} mis-shaped, e.g. {wrong[0]}" if wrong else "",
            f"{len(missing)} missing, e.g. {missing[0]}" if missing else ""]))
        raise SaveError(f"the weights saved to {out_dir} are not the trained model's: {detail}. Under ZeRO-3 or FSDP "
                        "every rank must take part in the save (nothing was put at the output path)")


def merge_saved_adapter(recipe, tokenizer, out_dir: str) -> None:
    """Write `out_dir`/merged: the base model as the recipe names it, loaded afresh on the CPU in the compute dtype
    (not quantised: a QLoRA adapter merges into bf16 weights, as the handbook does), with the adapter saved in
    `out_dir` merged in. From disk, not from the trained model in memory, so it is the same under DDP, ZeRO-3 (whose
    in-memory parameters are partitions) and FSDP, and never merges into 4-bit weights. In a fresh interpreter: in
    a ZeRO-3 process transformers would load the base partitioned, a collective the other ranks never join."""
    import torch

    path, kwargs = model_location(recipe.model.model_name_or_path, recipe.alignkit.gguf_file)
    dtype = torch_dtype(recipe)
    if recipe.model.load_in_4bit or recipe.model.load_in_8bit:
        dtype = getattr(torch, DTYPES[recipe.alignkit.bnb_4bit_compute_dtype or
                                      ("bfloat16" if recipe.train.bf16 else "float32")])
    job = {"base": path, "kwargs": {"revision": recipe.model.model_revision, "dtype": str(dtype).split(".")[-1],
                                    "trust_remote_code": trust_remote_code(recipe), **kwargs},
           "adapter": out_dir, "target": os.path.join(out_dir, "merged")}
    code = "import json, sys; from alignkit.train import saving; saving.merge_adapter_files(**json.loads(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SaveError(f"merge_adapter: merging {out_dir} into {path} failed: {done.stderr.strip()[-2000:]}")
    tokenizer.save_pretrained(job["target"])
    normalize_saved_configs(job["target"])


def merge_adapter_files(base: str, kwargs: dict, adapter: str, target: str) -> None:
    """The adapter in `adapter` merged into the model `base` (on the CPU), saved to `target` and checked."""
    import torch

    kwargs = {**kwargs, "dtype": getattr(torch, kwargs["dtype"])}
    merged = load_pretrained(base, adapter=adapter, **kwargs).merge_and_unload()
    merged.save_pretrained(target)
    verify_saved(target, expected_shapes(merged))


def log_rows(log_history: list[dict]) -> list[dict]:
    """Per-step training log entries (not eval entries, not the final summary)."""
    return [e for e in log_history if "loss" in e and "train_runtime" not in e]


def write_log_csv(log_history: list[dict], path: str) -> None:
    rows = log_rows(log_history)
    columns = ["step"] + sorted({k for r in rows for k in r} - {"step"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def round_floats(d: dict, digits: int = 6) -> dict:
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in d.items()}


def model_card(stage: str, recipe: Recipe, metrics: dict, is_adapter: bool) -> str:
    """README.md for a trained model directory: what it is, how it was made, its metrics (deterministic text)."""
    m, t, x = recipe.model, recipe.train, recipe.alignkit
    base = m.model_name_or_path + (f" ({x.gguf_file})" if x.gguf_file else "")
    if m.use_peft or x.adapter_path:
        method = (("QLoRA 4-bit " + str(m.bnb_4bit_quant_type)) if m.load_in_4bit else "LoRA") + \
            f" r {m.lora_r} α {m.lora_alpha} dropout {m.lora_dropout} on {m.lora_target_modules or 'all-linear'}"
    else:
        method = "full fine-tuning"
    batch = f"{t.per_device_train_batch_size} per device × {t.gradient_accumulation_steps} accumulation"
    length = "max_steps " + str(t.max_steps) if t.max_steps and t.max_steps > 0 else f"{t.num_train_epochs} epoch(s)"
    scheduler = getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)
    rows = [("stage", f"`{stage}`"), ("base model", f"`{base}`"),
            ("starting adapter", f"`{x.adapter_path}`" if x.adapter_path else "–"), ("method", method),
            ("training data", ", ".join(f"`{d.get('path')}`" for d in recipe.data.datasets) or "–"),
            ("held-out data", ", ".join(f"`{d.get('path')}`" for d in recipe.data.test_datasets)
             or f"seeded split ({recipe.data.test_split_size})"),
            ("optimisation", f"lr {t.learning_rate} {scheduler}, warmup {t.warmup_steps}, {length}, "
                             f"batch {batch}, seed {t.seed}")]
    for key in ("beta", "loss_type", "max_length"):
        if getattr(t, key, None) is not None:
            rows.append((key, f"{getattr(t, key)}"))
    library = "peft" if is_adapter else "transformers"
    title = f"# {os.path.basename(os.path.normpath(recipe.output_dir))} — alignkit `{stage}`"
    lines = ["---", f"library_name: {library}", f"base_model: {m.model_name_or_path}", "tags:", "- alignkit",
             f"- {stage}", "---", "", title, "",
             f"Made by `alignkit {stage} --config {recipe.path}`; the full resolved recipe is `config.yaml` "
             "beside this file, the loss curve `train_log.csv`.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    loader = ("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(DIR)"
              if is_adapter else "from transformers import AutoModelForCausalLM\n"
              "model = AutoModelForCausalLM.from_pretrained(DIR)")
    if stage == "reward":
        loader = loader.replace("CausalLM", "SequenceClassification")
    lines += ["", "## Load", "", "```python", loader, "```", ""]
    return "\n".join(lines)


def plain(value):
    """YAML-safe copy (enums and other objects become strings)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
