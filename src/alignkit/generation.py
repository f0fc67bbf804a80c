"""Batched generation with the model's chat template, through transformers or vLLM (shared by evaluation and the
stages that build data from a model's answers)."""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import logging
import os
import re
import string
import time

from alignkit.errors import UsageError
from alignkit.models import load_with_adapters, split_models, tokenizer_from, use_model

logger = logging.getLogger(__name__)


# Rows per generate() call unless a stage is told otherwise. On a CPU decoding is bound by reading the weights, once
# per step for the whole batch: 64 rows cost a step little more than 16 (the smol evaluation's answers: 2.2x faster)
# and, greedy, give the same answers (tests/test_generation.py). On a GPU the KV cache of a 7B model sets the limit.
DEFAULT_BATCH = {"cpu": 64, "gpu": 16}


def default_batch_size(model) -> int:
    return DEFAULT_BATCH["cpu" if model.device.type == "cpu" else "gpu"]


def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int | None = None,
             temperature: float | list[float] = 0.0, top_p: float = 1.0, seed: int | list[int] = 0,
             desc: str | None = None) -> tuple[list[str], dict]:
    """Complete each conversation (a list of messages ending with a user turn). Greedy where temperature == 0.

    `temperature` and `seed` are one value for every prompt or one per prompt. A sampled prompt draws from its own
    random stream (`RowSampler`), seeded by its own seed, or by (seed, its index) when one seed is given: its answer
    does not depend on the prompts beside it, the batch size or the order of calls. Returns the completions and
    throughput stats. Prompts are processed longest-first so that each batch holds similar lengths (less padding);
    results come back in the input order. `batch_size` None: DEFAULT_BATCH.
    """
    import torch
    from tqdm.auto import tqdm

    batch_size = batch_size or default_batch_size(model)
    temperatures = per_prompt(temperature, len(prompts), "temperature")
    seeds = row_seeds(seed, len(prompts))
    ids = prompt_ids(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    results: list[str] = [""] * len(ids)
    new_tokens, start = 0, time.time()
    for b in tqdm(range(0, len(order), batch_size), desc=desc or "generating", unit="batch",
                  disable=desc is None and len(order) <= batch_size):
        idx = order[b : b + batch_size]
        enc = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(model.device)
        sampler = [RowSampler([temperatures[i] for i in idx], [seeds[i] for i in idx], top_p)] \
            if any(temperatures[i] > 0 for i in idx) else []
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, do_sample=False, logits_processor=sampler,
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


def per_prompt(value, n: int, name: str) -> list:
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise UsageError(f"{len(value)} values of {name} for {n} prompts")
    return value


def row_seeds(seed: int | list[int], n: int) -> list[int]:
    """Each prompt's seed: the ones given, or one derived from (seed, the prompt's index)."""
    return per_prompt(seed, n, "seed") if isinstance(seed, list) else [row_seed(seed, i) for i in range(n)]


def row_seed(*parts) -> int:
    """A 63-bit seed from (seed, row, …): distinct rows get unrelated streams, not seed, seed + 1, …"""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RowSampler:
    """Sampling in which every row of a batch draws from its own random stream (a transformers logits processor,
    given to a greedy `generate`). transformers' sampling draws the whole batch's next tokens from the one global
    stream, so a row's answer changes with the rows beside it, the batch size and the calls made before; here it
    depends only on the row's prompt, temperature and seed.

    Gumbel-max: argmax(logits / T + G) with G i.i.d. Gumbel(0, 1) is an exact sample of softmax(logits / T), so the
    greedy step after this processor samples. top-p is transformers' own warper on the scaled logits. Rows with
    temperature 0 are left as they are: greedy.
    """

    def __init__(self, temperatures: list[float], seeds: list[int], top_p: float = 1.0):
        import torch
        from transformers import TopPLogitsWarper

        self.streams = [torch.Generator().manual_seed(s) if t > 0 else None for t, s in zip(temperatures, seeds)]
        self.groups: dict[float, list[int]] = {}  # temperature -> its rows
        for row, t in enumerate(temperatures):
            if t > 0:
                self.groups.setdefault(t, []).append(row)
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids, scores):
        import torch

        out = scores.clone()
        for t, rows in self.groups.items():
            if self.top_p is None:
                scaled = (scores[row].float() / t for row in rows)
            else:
                # One top-p call for the group: its sort of the vocabulary runs on all threads, one row per thread
                # (a row alone sorts on one), and each row comes out the same bits as alone (division, sort, softmax
                # and cumsum run row by row). Without top-p, gathering the rows would cost more than it saves.
                index = torch.tensor(rows, device=scores.device)
                scaled = iter(self.top_p(input_ids[index], scores[index].float() / t))
            for row, logits in zip(rows, scaled):
                out[row] = (logits - self.gumbel(row, logits.shape[-1]).to(logits.device)).to(out.dtype)
        return out

    def gumbel(self, row: int, vocab: int):
        """The row's Gumbel noise, -G = log(-log(U)), from its own stream, computed on the CPU: the same bits
        whatever the device, the batch or the other rows — and the CPU's vendor: `torch.log` is MKL's vector math,
        whose bits differ between Intel and AMD (numerics.mkl_vendor_dependent), `log1p` ATen's own; in float64,
        log1p(x - 1) is log(x) well past float32's precision (x - 1 is exact for U's multiples of 2^-24)."""
        import torch

        u = torch.rand(vocab, generator=self.streams[row]).double()
        return torch.log1p(-torch.log1p(u - 1) - 1).float()


def prompt_ids(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """The token ids every backend feeds the model: the chat template rendered with the generation prompt and
    tokenized without special tokens — the template already writes its BOS; a tokenizer adding another would
    start every prompt with two."""
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and surrounding space: 'Paris.' == ' paris' (exact-match agreement)."""
    text = text.strip().lower()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def pick_backend(requested: str = "auto") -> str:
    """`hf` (transformers) or `vllm`: vLLM when asked for, or for `auto` when it is installed and a GPU is present."""
    import torch

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


class Generator:
    """Answers from the base model, its PEFT adapters or merged models, through transformers or vLLM.

    One engine at a time: the base with every adapter (transformers: adapters switched per call; vLLM: LoRA enabled,
    each adapter a `LoRARequest`), or one merged model. The one loaded is released before the next loads — two
    7B vLLM engines, or two 33B models, do not fit one GPU — so callers ask for one model's answers at a time.
    Prompts are the same token ids on either backend (`prompt_ids`).
    """

    BASE = "base"

    def __init__(self, base: str, models: dict[str, str], chat_template: str | None = None, backend: str = "auto"):
        self.base, self.chat_template, self.backend = base, chat_template, pick_backend(backend)
        self.adapters, self.merged = split_models(models)
        self.loaded = None  # (which engine: BASE or a merged model's name, engine, tokenizer)

    def engine(self, name: str):
        """(engine, tokenizer) serving `name`, releasing the loaded engine first when it is another one."""
        key = name if name in self.merged else self.BASE
        if self.loaded is None or self.loaded[0] != key:
            self.release()
            path, adapters = (self.merged[key], {}) if key in self.merged else (self.base, self.adapters)
            if self.backend == "hf":
                engine, tokenizer = load_with_adapters(path, adapters, self.chat_template)
            else:
                engine, tokenizer = self.new_vllm_engine(path, adapters), tokenizer_from(path, self.chat_template)
            self.loaded = (key, engine, tokenizer)
        return self.loaded[1], self.loaded[2]

    def default_batch_size(self) -> int:
        """DEFAULT_BATCH for where this generator's models run."""
        import torch

        return DEFAULT_BATCH["cpu" if self.backend == "hf" and not torch.cuda.is_available() else "gpu"]

    def release(self) -> None:
        """Free the loaded engine's memory (GPU memory included) before another one loads."""
        if self.loaded is None:
            return
        engine, self.loaded = self.loaded[1], None
        shutdown = getattr(engine, "shutdown", None)  # vLLM's LLM: stops its engine process and frees the KV cache
        if self.backend == "vllm" and callable(shutdown):
            shutdown()
        del engine
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @staticmethod
    def new_vllm_engine(path: str, adapters: dict[str, str]):
        from vllm import LLM

        ranks = [json.load(open(os.path.join(d, "adapter_config.json")))["r"] for d in adapters.values()]
        return LLM(model=path, enable_lora=bool(ranks), max_lora_rank=max(ranks, default=16),
                   max_loras=max(len(ranks), 1), seed=0, trust_remote_code=False)

    def __call__(self, name: str, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int | None = None,
                 temperature: float | list[float] = 0.0, top_p: float = 1.0, seed: int | list[int] = 0,
                 desc: str | None = None):
        sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        engine, tokenizer = self.engine(name)
        if self.backend == "hf":
            with use_model(engine, name, {} if name in self.merged else self.adapters):
                return generate(engine, tokenizer, prompts, batch_size=batch_size, desc=desc, **sampling)
        lora = (name, list(self.adapters).index(name) + 1, self.adapters[name]) if name in self.adapters else None
        return vllm_generate(engine, tokenizer, prompts, lora=lora, **sampling)


def vllm_prompts(tokenizer, prompts: list[list[dict]]) -> list[dict]:
    """vLLM's inputs: token ids, not text — vLLM tokenizes text with the tokenizer's special tokens, which starts a
    prompt whose template writes BOS with a second one; ids make both backends see the same prompt."""
    return [{"prompt_token_ids": ids} for ids in prompt_ids(tokenizer, prompts)]


def vllm_generate(llm, tokenizer, prompts, *, lora, max_new_tokens, temperature, top_p, seed):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    # one stream per prompt, as RowSampler gives the transformers backend (the streams themselves differ)
    params = [SamplingParams(temperature=t, top_p=top_p, max_tokens=max_new_tokens, seed=s)
              for t, s in zip(per_prompt(temperature, len(prompts), "temperature"), row_seeds(seed, len(prompts)))]
    start = time.time()
    outs = llm.generate(vllm_prompts(tokenizer, prompts), params, lora_request=LoRARequest(*lora) if lora else None,
                        use_tqdm=True)
    seconds = time.time() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return [o.outputs[0].text.strip() for o in outs], {
        "generated_tokens": tokens, "generation_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else 0.0}
