"""Models and tokenizers: hub id, local directory or GGUF file; full, LoRA or QLoRA; chat templates; saving."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile

logger = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def model_location(model_name_or_path: str, gguf_file: str | None) -> tuple[str, dict]:
    """(path or hub id for from_pretrained, extra kwargs). A path to a .gguf file is split into dir + gguf_file."""
    if gguf_file is None and model_name_or_path.endswith(".gguf"):
        if not os.path.isfile(model_name_or_path):
            raise FileNotFoundError(f"model_name_or_path: GGUF file not found: {model_name_or_path}")
        return os.path.dirname(os.path.abspath(model_name_or_path)), {"gguf_file": os.path.basename(model_name_or_path)}
    if model_name_or_path.startswith((".", "/")) and not os.path.exists(model_name_or_path):
        raise FileNotFoundError(f"model_name_or_path: no such directory: {model_name_or_path}")
    return model_name_or_path, ({"gguf_file": gguf_file} if gguf_file else {})


def trust_remote_code(recipe) -> bool:
    # TRL 1.16 keeps the switch on the trainer config; off unless a recipe sets it.
    return bool(getattr(recipe.train, "trust_remote_code", False))


def load_tokenizer(recipe, *, require_chat_template: bool = True):
    from transformers import AutoTokenizer

    from .templates import resolve_chat_template

    model_args, extras = recipe.model, recipe.extras
    path, kwargs = model_location(model_args.model_name_or_path, extras.gguf_file)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if os.path.isdir(path) and not kwargs and not any(os.path.exists(os.path.join(path, f)) for f in tokenizer_files):
        from .config import RecipeError

        raise RecipeError(f"{path} has no tokenizer ({', '.join(tokenizer_files)}); save the tokenizer with the "
                          "model (tokenizer.save_pretrained) or point model_name_or_path at a directory that has one")
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=model_args.model_revision, trust_remote_code=trust_remote_code(recipe), **kwargs
    )
    template = resolve_chat_template(extras.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    if require_chat_template and not tokenizer.chat_template:
        from .config import RecipeError

        raise RecipeError(
            f"{model_args.model_name_or_path} has no chat template and the recipe sets none; "
            "set chat_template: (e.g. zephyr or chatml)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def deepspeed_enabled(train_args) -> bool:
    """Whether DeepSpeed runs this process (accelerate launch sets the variable; a TrainingArguments config too)."""
    return bool(getattr(train_args, "deepspeed", None)) or \
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def torch_dtype(recipe, *, trains_all_weights: bool = False):
    """The dtype weights are loaded in: the recipe's `dtype` when it sets one (TRL's own default, float32, counts
    as unset), else from the precision. Half precision for weights that stay frozen (LoRA/QLoRA bases); for
    full-parameter training fp32 under bf16/fp16 autocast — the optimiser must update fp32 master weights, or at
    lr 5e-7 almost every update rounds away in bf16 — except under DeepSpeed, which keeps fp32 masters itself."""
    import torch

    model_args, train_args = recipe.model, recipe.train
    name = model_args.dtype if "dtype" in recipe.explicit_keys else None
    if name in (None, "auto"):
        name = "bfloat16" if train_args.bf16 else ("float16" if train_args.fp16 else "float32")
        if trains_all_weights and name != "float32" and not deepspeed_enabled(train_args):
            name = "float32"
    elif trains_all_weights and DTYPES.get(name) != "float32" and not deepspeed_enabled(train_args):
        logger.warning("dtype %s with full-parameter training and no DeepSpeed: the optimiser updates weights in "
                       "%s, where small updates round away; unset dtype for fp32 weights under autocast", name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {', '.join(sorted(DTYPES))}")
    return getattr(torch, DTYPES[name])


def quantization_config(model_args, extras, train_args):
    """bitsandbytes config for QLoRA (nf4 + double quantisation by default) or 8-bit, else None."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = extras.bnb_4bit_compute_dtype or ("bfloat16" if train_args.bf16 else "float32")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=getattr(torch, DTYPES[compute]),
        bnb_4bit_quant_storage=getattr(torch, model_args.bnb_4bit_quant_storage or "uint8"),
    )


def lora_config(model_args, task_type: str = "CAUSAL_LM"):
    """LoRA settings from the recipe; default targets: every linear projection ("all-linear")."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear",
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        bias="none",
    )


def load_model(recipe, tokenizer, *, auto_class=None, **model_kwargs):
    """Load the base model (and the starting adapter, if any) ready for a TRL trainer."""
    from transformers import AutoModelForCausalLM

    model_args, extras, train_args = recipe.model, recipe.extras, recipe.train
    auto_class = auto_class or AutoModelForCausalLM
    path, kwargs = model_location(model_args.model_name_or_path, extras.gguf_file)
    quant = quantization_config(model_args, extras, train_args)
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = auto_class.from_pretrained(
        path,
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code(recipe),
        dtype=torch_dtype(recipe, trains_all_weights=not (model_args.use_peft or extras.adapter_path)),
        attn_implementation=model_args.attn_implementation or "sdpa",
        **kwargs,
        **model_kwargs,
    )
    if "gguf_file" in kwargs:
        _drop_gguf_quantizer(model)
    if quant is not None and getattr(quant, "load_in_4bit", False):
        check_cpu_4bit_packing(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    if extras.adapter_path:
        from peft import PeftModel

        if not os.path.isfile(os.path.join(extras.adapter_path, "adapter_config.json")):
            raise FileNotFoundError(f"adapter_path: no adapter_config.json in {extras.adapter_path}")
        model = PeftModel.from_pretrained(model, extras.adapter_path, is_trainable=True)
    return model


def check_cpu_4bit_packing(model, packs: bool | None = None) -> None:
    """On a CPU with AVX-512 BF16, bitsandbytes repacks every 4-bit weight for its inference kernel the first time a
    layer runs in eval mode without gradients (evaluation, the reference pass), and the packing needs out-features
    divisible by 32 and in-features by the quantisation block size. Fail before training with the layer named, not
    with a reshape error after it. `packs`: whether this machine takes that path (default: ask bitsandbytes)."""
    import bitsandbytes as bnb

    linear4 = [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not linear4 or next(model.parameters()).device.type != "cpu":
        return
    if packs is None:
        packs = bool(linear4[0][1].support_avx512bf16_for_cpu)
    if not packs:
        return
    for name, m in linear4:
        block = m.weight.quant_state.blocksize if m.weight.quant_state is not None else 64
        if m.out_features % 32 or m.in_features % block:
            from .config import RecipeError

            raise RecipeError(
                f"load_in_4bit on this CPU (AVX-512 BF16): bitsandbytes packs 4-bit weights for its CPU kernel and "
                f"needs out-features divisible by 32 and in-features by {block}; layer {name} is "
                f"{m.in_features} -> {m.out_features}. Use a model with such layer sizes, or a GPU")


def _drop_gguf_quantizer(model) -> None:
    # transformers dequantises GGUF weights on load but keeps the quantizer, which then refuses to save
    # ("quantized with gguf and is not serializable"). The weights are plain tensors: drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _temporary_prefix(name: str, kind: str) -> str:
    # host and pid in the name, so a rerun can tell a dead run's leftovers from a live writer's
    return f".{name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def remove_stale_temporaries(parent: str, name: str) -> list[str]:
    """Remove the `.<name>.tmp-*` / `.<name>.old-*` siblings that killed runs of this output left behind (for a
    merged 7B model, gigabytes per kill): those of a process on this host that is gone, the shared one of a
    multi-process save, and unnamed ones from before writers named themselves. Returns what was removed."""
    removed = []
    if not os.path.isdir(parent):
        return removed
    host = socket.gethostname()
    for entry in os.listdir(parent):
        for kind in ("tmp", "old"):
            prefix = f".{name}.{kind}-"
            if not entry.startswith(prefix):
                continue
            rest = entry[len(prefix):]
            parts = rest.rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit():
                if parts[0] != host or _alive(int(parts[1])):
                    continue  # another host's, or a live writer's
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d temporary director%s a killed run left beside %s: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", name, ", ".join(sorted(removed)))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output(final_dir: str, *, main: bool = True, barrier=None):
    """Yield a temporary sibling directory; rename it to `final_dir` only if the block finishes.

    A crash (or kill) leaves at most a `.<name>.tmp-*` directory, never a half-written `final_dir`
    that DVC would take as complete. In a multi-process run pass `barrier` (every rank calls this, since
    ZeRO-3 gathers the weights from all ranks to save them): the ranks share one temporary directory, the
    main process creates and renames it.
    """
    final_dir = os.path.abspath(final_dir)
    parent, name = os.path.split(final_dir)
    if main:
        remove_stale_temporaries(parent, name)
    if barrier is None:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=_temporary_prefix(name, "tmp"), dir=parent)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    else:
        tmp = os.path.join(parent, f".{name}.tmp-shared")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
    try:
        yield tmp
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if barrier is not None:
        barrier()  # every rank has written its part
    if main:
        old = None
        if os.path.exists(final_dir):
            old = tempfile.mkdtemp(prefix=_temporary_prefix(name, "old"), dir=parent)
            os.rename(final_dir, os.path.join(old, name))
        os.rename(tmp, final_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    if barrier is not None:
        barrier()


def normalize_saved_configs(out_dir: str) -> None:
    """Make saved JSON configs independent of the process that wrote them, so reruns are byte-identical:
    PEFT stores `target_modules` from a set (order follows the per-process string hash seed), and
    tokenizers record `local_files_only`, which follows HF_HUB_OFFLINE."""
    import json

    for name, fix in (("adapter_config.json", _sort_target_modules), ("tokenizer_config.json", _drop_run_flags)):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            fix(data)
            with open(path, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")


def _sort_target_modules(data: dict) -> None:
    for key in ("target_modules", "modules_to_save"):
        if isinstance(data.get(key), list):
            data[key] = sorted(data[key])


def _drop_run_flags(data: dict) -> None:
    data.pop("local_files_only", None)


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


class SaveError(RuntimeError):
    """What was saved is not the model that was trained (missing, empty or mis-shaped tensors)."""


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
    import json
    import subprocess
    import sys

    import torch

    path, kwargs = model_location(recipe.model.model_name_or_path, recipe.extras.gguf_file)
    dtype = torch_dtype(recipe)
    if recipe.model.load_in_4bit or recipe.model.load_in_8bit:
        dtype = getattr(torch, DTYPES[recipe.extras.bnb_4bit_compute_dtype or
                                      ("bfloat16" if recipe.train.bf16 else "float32")])
    job = {"base": path, "kwargs": {"revision": recipe.model.model_revision, "dtype": str(dtype).split(".")[-1],
                                    "trust_remote_code": trust_remote_code(recipe), **kwargs},
           "adapter": out_dir, "target": os.path.join(out_dir, "merged")}
    code = "import json, sys; from alignkit import models; models.merge_adapter_files(**json.loads(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SaveError(f"merge_adapter: merging {out_dir} into {path} failed: {done.stderr.strip()[-2000:]}")
    tokenizer.save_pretrained(job["target"])
    normalize_saved_configs(job["target"])


def merge_adapter_files(base: str, kwargs: dict, adapter: str, target: str) -> None:
    """The adapter in `adapter` merged into the model `base` (on the CPU), saved to `target` and checked."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {**kwargs, "dtype": getattr(torch, kwargs["dtype"])}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if "gguf_file" in kwargs:
        _drop_gguf_quantizer(model)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(target)
    verify_saved(target, expected_shapes(merged))
