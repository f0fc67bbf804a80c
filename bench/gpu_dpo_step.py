"""GPU benchmark: one DPO optimiser step of the headline recipes' shapes, with random weights (no hub access).

    python bench/gpu_dpo_step.py --shape anima-33b --out bench/results/gpu_anima-33b.json
    python bench/gpu_dpo_step.py --shape zephyr-7b --out bench/results/gpu_zephyr-7b.json

Shapes (the real configs, weights random):
  anima-33b   LLaMA-33B (hidden 6656, 60 layers, 52 heads, FFN 17920, vocab 32000) in 4-bit nf4 with double
              quantisation, LoRA r 256 α 16 on all linear layers (Anima's choice), bf16 compute, trainable weights
              in bf16 (as TRL casts them), gradient checkpointing, paged AdamW 32-bit; reference = the same model
              with the adapter disabled (no second copy). Micro-batch 1 pair, Anima's 16 micro-batches per step.
  zephyr-7b   Mistral-7B (hidden 4096, 32 layers, 32/8 heads, FFN 14336, vocab 32000), full fine-tuning in bf16 with
              gradient checkpointing and a frozen bf16 reference copy. Zephyr shards this over 16 GPUs with ZeRO-3;
              on one GPU the optimiser states are 8-bit (paged AdamW 8-bit) so that it fits — stated in the output.
  tiny-*      the same code on 2-layer models, to check the script in seconds (also runs on CPU: --device cpu).

The step is the DPO computation TRL's DPOTrainer does (policy log-probs of chosen and rejected, reference
log-probs without gradient, sigmoid loss with β) written out directly, so the benchmark needs only torch,
transformers, peft and bitsandbytes. Reports seconds per micro-batch, tokens/s, peak GPU memory, model FLOP/s
and utilisation against the H100's dense bf16 peak (989 TFLOP/s), and Anima's 100 steps extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import time

SHAPES = {
    "anima-33b": dict(kind="qlora", hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                      num_attention_heads=52, num_key_value_heads=52, vocab_size=32000, seq=1024, micro=1, accum=16,
                      lora_r=256, lora_alpha=16, beta=0.1),
    "zephyr-7b": dict(kind="full", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, seq=1024, micro=4, accum=2,
                      beta=0.01),
    "tiny-anima": dict(kind="qlora", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=1000, seq=128, micro=1, accum=4,
                       lora_r=16, lora_alpha=16, beta=0.1),
    "tiny-zephyr": dict(kind="full", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, seq=128, micro=2, accum=2,
                        beta=0.01),
}
H100_BF16_DENSE_PEAK = 989e12


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                       num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
                       num_key_value_heads=shape["num_key_value_heads"], vocab_size=shape["vocab_size"],
                       max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa")


def random_4bit_model(config, device: str):
    """A causal LM whose decoder linears are nf4 (double-quantised) bnb layers holding random weights, built one
    layer at a time so the bf16 model never exists in full (66 GB for 33B)."""
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    std = config.initializer_range
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                weight = torch.randn(linear.out_features, linear.in_features, dtype=torch.bfloat16, device=device) * std
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to(device)
                setattr(parent, name, q)
    norms = [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    for module in (model.model.embed_tokens, model.lm_head, model.model.norm, *norms):
        for pname, p in list(module.named_parameters(recurse=False)):
            data = (torch.ones_like(p, device=device) if "norm" in type(module).__name__.lower()
                    else torch.randn(p.shape, dtype=torch.bfloat16, device=device) * std)
            setattr(module, pname, torch.nn.Parameter(data, requires_grad=False))
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) marks; PEFT reads it
    return model.to(device)


def sequence_logps(model, ids):
    """Summed log-probabilities of each sequence's tokens after the first (the DPO quantity)."""
    import torch

    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1).sum(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=4, help="timed micro-batches (after 2 warm-up ones)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import bitsandbytes as bnb
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    config = llama_config(shape)
    cuda = args.device.startswith("cuda")
    t0 = time.time()
    if shape["kind"] == "qlora":
        model = random_4bit_model(config, args.device)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=shape["lora_r"], lora_alpha=shape["lora_alpha"], lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
        reference = None  # adapter disabled
        optimizer = bnb.optim.PagedAdamW32bit([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        optimiser_name = "paged_adamw_32bit"
    else:
        from transformers import AutoModelForCausalLM

        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            reference = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval().requires_grad_(False)
        reference.load_state_dict(model.state_dict())  # reference = the starting policy: step-1 loss is ln 2
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        optimizer = bnb.optim.PagedAdamW8bit(model.parameters(), lr=5e-7)
        optimiser_name = "paged_adamw_8bit (one GPU; the recipe uses ZeRO-3 over 16)"
    build_seconds = time.time() - t0
    total = sum(q.numel() * (2 if getattr(q, "quant_type", None) else 1) for q in model.parameters())
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    model.train()

    micro, seq, beta = shape["micro"], shape["seq"], shape["beta"]
    chosen = torch.randint(0, config.vocab_size, (micro, seq), device=args.device)
    rejected = torch.randint(0, config.vocab_size, (micro, seq), device=args.device)
    both = torch.cat([chosen, rejected])

    def micro_step():
        logps = sequence_logps(model, both)
        with torch.no_grad():
            if reference is None:
                with model.disable_adapter():
                    ref = sequence_logps(model, both)
            else:
                ref = sequence_logps(reference, both)
        ratio = (logps[:micro] - ref[:micro]) - (logps[micro:] - ref[micro:])
        loss = -F.logsigmoid(beta * ratio).mean()
        loss.backward()
        return float(loss)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(2 + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.time()
        losses.append(micro_step())
        optimizer.step()  # one optimiser step per micro-batch here: the cost is measured, the schedule is not
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.time() - start)
    per_micro = sum(times[2:]) / args.steps
    tokens = 2 * micro * seq
    n_params = sum(q.numel() for n, q in model.named_parameters() if "lora_" not in n) if shape["kind"] == "full" \
        else _dense_params(config)
    # per token: policy forward 2N + backward 4N (full; 2N when the base is frozen: activation grads only)
    # + checkpoint recompute 2N + reference forward 2N
    flops_per_token = n_params * (2 + (4 if shape["kind"] == "full" else 2) + 2 + 2)
    result = {
        "shape": args.shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "bitsandbytes": bnb.__version__, "config": shape,
        "optimiser": optimiser_name, "parameters_total": total, "parameters_trainable": trainable,
        "build_seconds": round(build_seconds, 1), "seconds_per_micro_batch": round(per_micro, 3),
        "tokens_per_second": round(tokens / per_micro, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "model_tflops_per_second": round(flops_per_token * tokens / per_micro / 1e12, 1),
        "utilisation_of_h100_bf16_peak": round(flops_per_token * tokens / per_micro / H100_BF16_DENSE_PEAK, 3),
        "first_loss": round(losses[0], 6), "losses": [round(x, 4) for x in losses],
        "step_seconds_at_recipe_accumulation": round(per_micro * shape["accum"], 2),
    }
    if args.shape == "anima-33b":
        result["anima_100_steps_hours"] = round(per_micro * shape["accum"] * 100 / 3600, 2)
        result["anima_reported_hours"] = 5.0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


def _dense_params(config) -> int:
    """Parameter count of the dense (unquantised) equivalent, for FLOP accounting."""
    h, f, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = h * config.num_key_value_heads // config.num_attention_heads
    return n * (2 * h * h + 2 * h * kv + 3 * h * f) + 2 * v * h


if __name__ == "__main__":
    main()
