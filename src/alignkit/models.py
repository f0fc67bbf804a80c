"""Models and tokenizers, loaded one way: a hub id, a local directory or a GGUF file; full, LoRA or QLoRA for
training; a model with its PEFT adapters for inference; saved model directories made byte-reproducible.

transformers, peft and bitsandbytes are imported inside the functions that need them: `alignkit check`, `plan` and
`launch --preflight` import this module and must answer in a second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

from alignkit.attention import portable_attention
from alignkit.errors import RecipeError, UsageError
from alignkit.numerics import portable_4bit
from alignkit.score_head import portable_score_head
from alignkit.templates import NAMED_TEMPLATES, resolve_chat_template

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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


# ------------------------------------------------------------------------------------------------- loading

def load_pretrained(path: str, *, auto_class=None, gguf_file: str | None = None, adapter: str | None = None,
                    adapter_trainable: bool = False, **kwargs):
    """The one `from_pretrained`: `path` (a hub id, a directory, or a directory + `gguf_file`) with `auto_class`
    (default: a causal LM), GGUF weights made plain, a one-output score head computed vendor-independently, and a PEFT
    `adapter` directory on top when given."""
    from transformers import AutoModelForCausalLM

    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model = (auto_class or AutoModelForCausalLM).from_pretrained(path, **kwargs)
    if gguf_file:
        drop_gguf_quantizer(model)
    portable_score_head(model)  # a reward model's score head: the same bits on any CPU (score_head.py)
    portable_attention(model)  # attention without MKL matrix-vector products on the CPU (attention.py)
    if adapter:
        from peft import PeftModel

        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise FileNotFoundError(f"no PEFT adapter (adapter_config.json) in {adapter}")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=adapter_trainable)
    return model


def tokenizer_from(path: str, chat_template: str | None = None, *, require_chat_template: bool = True,
                   missing_template: str = "and none was given: pass --chat_template", error=UsageError,
                   pad_with_eos: bool = True, **kwargs):
    """The tokenizer of `path` with `chat_template` (a name or a Jinja string) replacing its own when given, and a
    pad token (EOS when it has none, unless `pad_with_eos` is off: a tokenizer saved as it came). A model without a
    chat template, where one is needed, is refused before any weights load, with `missing_template` saying how to
    give one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    template = resolve_chat_template(chat_template)
    if template is not None:
        tokenizer.chat_template = template
    if require_chat_template and not tokenizer.chat_template:
        raise error(f"{path} has no chat template {missing_template} ({', '.join(NAMED_TEMPLATES)}, or a Jinja "
                    "string)")
    if pad_with_eos and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(recipe, *, require_chat_template: bool = True):
    """A training stage's tokenizer: the recipe's model, revision and chat template."""
    model_args, own = recipe.model, recipe.alignkit
    path, kwargs = model_location(model_args.model_name_or_path, own.gguf_file)
    if os.path.isdir(path) and not kwargs and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise RecipeError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer with the "
                          "model (tokenizer.save_pretrained) or point model_name_or_path at a directory that has one")
    return tokenizer_from(path, own.chat_template, require_chat_template=require_chat_template,
                          missing_template="and the recipe sets none; set chat_template:", error=RecipeError,
                          revision=model_args.model_revision, trust_remote_code=trust_remote_code(recipe), **kwargs)


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


def quantization_config(model_args, own, train_args):
    """bitsandbytes config for QLoRA (nf4 + double quantisation by default) or 8-bit, else None."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = own.bnb_4bit_compute_dtype or ("bfloat16" if train_args.bf16 else "float32")
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
    model_args, own, train_args = recipe.model, recipe.alignkit, recipe.train
    path, kwargs = model_location(model_args.model_name_or_path, own.gguf_file)
    quant = quantization_config(model_args, own, train_args)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if own.adapter_path and not os.path.isfile(os.path.join(own.adapter_path, "adapter_config.json")):
        raise FileNotFoundError(f"adapter_path: no adapter_config.json in {own.adapter_path}")
    model = load_pretrained(
        path,
        auto_class=auto_class,
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code(recipe),
        dtype=torch_dtype(recipe, trains_all_weights=not (model_args.use_peft or own.adapter_path)),
        attn_implementation=model_args.attn_implementation or "sdpa",
        **kwargs,
        **model_kwargs,
    )
    if quant is not None and getattr(quant, "load_in_4bit", False):
        portable_4bit(model)  # the same bits on any CPU (numerics.py); then no layer is packed
        check_cpu_4bit_packing(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    if own.adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, own.adapter_path, is_trainable=True)
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
            raise RecipeError(
                f"load_in_4bit on this CPU (AVX-512 BF16): bitsandbytes packs 4-bit weights for its CPU kernel and "
                f"needs out-features divisible by 32 and in-features by {block}; layer {name} is "
                f"{m.in_features} -> {m.out_features}. Use a model with such layer sizes, or a GPU")


def drop_gguf_quantizer(model) -> None:
    # transformers dequantises GGUF weights on load but keeps the quantizer, which then refuses to save
    # ("quantized with gguf and is not serializable"). The weights are plain tensors: drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


# ----------------------------------------------------------------------------------------------- inference

def inference_dtype(on_gpu: bool | None = None) -> str:
    """The dtype models are loaded in for inference, named explicitly (a checkpoint's own `torch_dtype` may be
    float32: a 33B model then needs 130 GB): bfloat16 on a GPU, float32 on a CPU (bf16 there is up to 10x slower,
    and fp32 keeps CPU results the same on every instruction set)."""
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    return "bfloat16" if on_gpu else "float32"


def inference_placement(on_gpu: bool | None = None) -> dict:
    """`from_pretrained` arguments for inference: `inference_dtype`, spread over the GPUs when there are any."""
    import torch

    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    return {"dtype": getattr(torch, inference_dtype(on_gpu)), "device_map": "auto" if on_gpu else None}


def load_for_inference(model_path: str, adapter_path: str | None = None, chat_template: str | None = None):
    """(model, tokenizer) in eval mode: a model directory, optionally with a PEFT adapter on top (not merged)."""
    tokenizer = tokenizer_from(adapter_path or model_path, chat_template)
    tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    model = load_pretrained(model_path, adapter=adapter_path, **inference_placement())
    model.eval()
    return model, tokenizer


def load_with_adapters(base: str, adapters: dict[str, str], chat_template: str | None = None):
    """One copy of the base model with every named PEFT adapter loaded on top (switch with `use_model`)."""
    model, tokenizer = load_for_inference(base, None, chat_template)
    if adapters:
        from peft import PeftModel

        names = list(adapters)
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        model.eval()
    return model, tokenizer


def use_model(model, name: str, adapters: dict):
    """Context in which `model` acts as `name`: an adapter switched on, or the base with adapters disabled."""
    if name in adapters:
        model.set_adapter(name)
        return contextlib.nullcontext()
    return model.disable_adapter() if adapters else contextlib.nullcontext()


def split_models(models: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """{name: dir} → (PEFT adapters to put on the base, merged/full models to load on their own)."""
    adapters, merged = {}, {}
    for name, path in models.items():
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            adapters[name] = path
        elif os.path.isfile(os.path.join(path, "config.json")):
            merged[name] = path
        else:
            raise UsageError(f"model '{name}': {path} holds neither a PEFT adapter (adapter_config.json) "
                             "nor a model (config.json)")
    return adapters, merged


# ------------------------------------------------------------------------------------------- saved models

def normalize_saved_configs(out_dir: str) -> None:
    """Make saved JSON configs independent of the process that wrote them, so reruns are byte-identical:
    PEFT stores `target_modules` from a set (order follows the per-process string hash seed), and
    tokenizers record `local_files_only`, which follows HF_HUB_OFFLINE."""
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
