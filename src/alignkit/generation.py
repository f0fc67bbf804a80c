"""Batched generation with the model's chat template (shared by evaluation and the pair-building stage)."""

from __future__ import annotations

import json
import logging
import os
import time

logger = logging.getLogger(__name__)


def load_for_inference(model_path: str, adapter_path: str | None = None, chat_template: str | None = None):
    """(model, tokenizer) in eval mode: a model directory, optionally with a PEFT adapter on top (not merged)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer_only(adapter_path or model_path, chat_template)
    tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # bf16 on a GPU (a 33B model in fp32 does not fit one), fp32 on a CPU (no bf16 units: 10x slower there).
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if on_gpu else torch.float32,
                                                 device_map="auto" if on_gpu else None)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
    model.eval()
    return model, tokenizer


def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, desc: str | None = None,
             ) -> tuple[list[str], dict]:
    """Complete each conversation (a list of messages ending with a user turn). Greedy when temperature == 0.

    Returns the completions and throughput stats. Prompts are processed longest-first so that each batch
    holds similar lengths (less padding); results come back in the input order.
    """
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    results: list[str] = [""] * len(texts)
    new_tokens, start = 0, time.time()
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    for b in tqdm(range(0, len(order), batch_size), desc=desc or "generating", unit="batch",
                  disable=desc is None and len(order) <= batch_size):
        idx = order[b : b + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, **sampling,
            )
        for row, i in enumerate(idx):
            gen = out[row, enc["input_ids"].shape[1]:]
            gen = gen[gen != tokenizer.pad_token_id] if tokenizer.pad_token_id == tokenizer.eos_token_id else gen
            new_tokens += int(gen.numel())
            results[i] = tokenizer.decode(gen, skip_special_tokens=True).strip()
    seconds = time.time() - start
    stats = {"generated_tokens": new_tokens, "generation_seconds": round(seconds, 2),
             "tokens_per_second": round(new_tokens / seconds, 1) if seconds else 0.0}
    return results, stats


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and surrounding space: 'Paris.' == ' paris' (exact-match agreement)."""
    import re
    import string

    text = text.strip().lower()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


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
    import contextlib

    if name in adapters:
        model.set_adapter(name)
        return contextlib.nullcontext()
    return model.disable_adapter() if adapters else contextlib.nullcontext()


def pick_backend(requested: str = "auto") -> str:
    """`hf` (transformers) or `vllm`: vLLM when asked for, or for `auto` when it is installed and a GPU is present."""
    import importlib.util

    import torch

    from .stage import UsageError

    has_vllm = importlib.util.find_spec("vllm") is not None
    if requested == "vllm" and not has_vllm:
        raise UsageError("backend vllm asked for, but vLLM is not installed (pip install vllm, on a CUDA host)")
    if requested == "vllm" and not torch.cuda.is_available():
        raise UsageError("backend vllm needs a CUDA GPU; none is visible")
    if requested in ("hf", "vllm"):
        return requested
    if requested != "auto":
        raise UsageError(f"unknown generation backend '{requested}' (auto, hf, vllm)")
    return "vllm" if has_vllm and torch.cuda.is_available() else "hf"


def split_models(models: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """{name: dir} → (PEFT adapters to put on the base, merged/full models to load on their own)."""
    from .stage import UsageError

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


class Generator:
    """Answers from the base model, its PEFT adapters or merged models, through transformers or vLLM.

    transformers: one copy of the base with every adapter loaded and switched per call; a merged model is loaded
    when first asked for. vLLM: the base served with LoRA enabled, each adapter a `LoRARequest`; a merged model
    gets its own engine. Prompts are rendered with the same chat template either way.
    """

    def __init__(self, base: str, models: dict[str, str], chat_template: str | None = None, backend: str = "auto"):
        self.base, self.chat_template, self.backend = base, chat_template, pick_backend(backend)
        self.adapters, self.merged = split_models(models)
        self.current = None  # (name of the loaded merged model, its model, its tokenizer)
        if self.backend == "hf":
            self.model, self.tokenizer = load_with_adapters(base, self.adapters, chat_template)
        else:
            self.tokenizer, self.llm = load_tokenizer_only(base, chat_template), self._engine(base, self.adapters)

    @staticmethod
    def _engine(path: str, adapters: dict[str, str]):
        from vllm import LLM

        ranks = [json.load(open(os.path.join(d, "adapter_config.json")))["r"] for d in adapters.values()]
        return LLM(model=path, enable_lora=bool(ranks), max_lora_rank=max(ranks, default=16),
                   max_loras=max(len(ranks), 1), seed=0, trust_remote_code=False)

    def _merged(self, name: str):
        if self.current is None or self.current[0] != name:
            self.current = None  # free the previous one first
            loaded = (load_for_inference(self.merged[name], None, self.chat_template) if self.backend == "hf"
                      else (self._engine(self.merged[name], {}), load_tokenizer_only(self.merged[name],
                                                                                      self.chat_template)))
            self.current = (name, *loaded)
        return self.current[1], self.current[2]

    def __call__(self, name: str, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, desc: str | None = None):
        sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if self.backend == "hf":
            if name in self.merged:
                model, tokenizer = self._merged(name)
                return generate(model, tokenizer, prompts, batch_size=batch_size, desc=desc, **sampling)
            with use_model(self.model, name, self.adapters):
                return generate(self.model, self.tokenizer, prompts, batch_size=batch_size, desc=desc, **sampling)
        llm, tokenizer = self._merged(name) if name in self.merged else (self.llm, self.tokenizer)
        return vllm_generate(llm, tokenizer, prompts, lora=(name, list(self.adapters).index(name) + 1,
                                                            self.adapters[name]) if name in self.adapters else None,
                             **sampling)


def vllm_generate(llm, tokenizer, prompts, *, lora, max_new_tokens, temperature, top_p, seed):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
    start = time.time()
    outs = llm.generate(texts, params, lora_request=LoRARequest(*lora) if lora else None, use_tqdm=True)
    seconds = time.time() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return [o.outputs[0].text.strip() for o in outs], {
        "generated_tokens": tokens, "generation_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else 0.0}


def load_tokenizer_only(path: str, chat_template: str | None = None):
    """The tokenizer of `path`, with `chat_template` (a name or a Jinja string) replacing its own when given."""
    from transformers import AutoTokenizer

    from .templates import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(path)
    template = resolve_chat_template(chat_template)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer
