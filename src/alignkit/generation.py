"""Batched generation with the model's chat template (shared by evaluation and the pair-building stage)."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


def load_for_inference(model_path: str, adapter_path: str | None = None, chat_template: str | None = None):
    """(model, tokenizer) in eval mode: a model directory, optionally with a PEFT adapter on top (not merged)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .templates import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(adapter_path or model_path)
    template = resolve_chat_template(chat_template)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
    model.eval()
    return model, tokenizer


def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> tuple[list[str], dict]:
    """Complete each conversation (a list of messages ending with a user turn). Greedy when temperature == 0.

    Returns the completions and throughput stats. Prompts are processed longest-first so that each batch
    holds similar lengths (less padding); results come back in the input order.
    """
    import torch

    torch.manual_seed(seed)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    results: list[str] = [""] * len(texts)
    new_tokens, start = 0, time.time()
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
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
