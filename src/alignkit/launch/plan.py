"""`plan`: will this recipe fit, and how long will a step take — before the queue wait and the model load.

    alignkit plan recipes/zephyr-7b-beta/dpo.yaml --gpus 8xH100-80GB --accelerate_config recipes/accelerate/zero3.yaml
    alignkit plan recipes/anima-33b/dpo.yaml --gpus 1xH100-80GB

Peak memory per GPU is the sum of
  weights        bf16 (2 B/param) when frozen (LoRA) or under DeepSpeed; fp32 when trained without DeepSpeed (the
                 optimiser's master weights, bf16 autocast) and on CPU; nf4 for QLoRA (~4.13 bits)
  reference      a second frozen copy for full-parameter DPO/KTO; none under LoRA (adapter disabled) or with
                 precomputed reference log-probs
  trainable      gradients + optimiser states: Adam keeps two states per trainable parameter (fp32 for the
                 32-bit optimisers and under DeepSpeed, which also keeps fp32 master weights; the parameter's
                 dtype for torch AdamW; 1 B each for 8-bit optimisers); ZeRO-1/2/3 divide the optimiser states /
                 + gradients / + weights by the world size; LoRA trains r·(in+out) per adapted linear layer; DDP
                 keeps a second copy of the trainable gradients in its all-reduce buckets
  activations    per token and layer: 34·h bytes without checkpointing (attention through SDPA/flash: no
                 s² term), 2·h with checkpointing plus one layer recomputed; tokens = micro-batch × max_length ×
                 2 for pair losses (chosen and rejected go through together)
  logits         micro-batch tokens × vocabulary × 10 B (bf16 logits, fp32 log-softmax and its gradient)
  overhead       1 GiB (CUDA context, allocator slack)
On CPU (`--gpus cpu`, fp32) three terms are calibrated against the measured peak RSS of the smol SFT and DPO runs
(bench/plan_calibration.py, which also reports the error on runs not used to fit them): activations
CPU_ACTIVATION_BYTES·h per token and layer, logits CPU_LOGIT_BYTES per token and vocabulary entry (fp32 logits
and the copies the losses and TRL's token metrics make), and the process itself (Python, torch, transformers,
TRL imported). The GPU terms are not calibrated yet: that needs a GPU run (bench/gpu_dpo_step.py reports peaks).
Time per optimiser step = FLOPs / (GPUs × peak × utilisation): 6·N per trained token (4·N when the base is
frozen: activation gradients only) + 2·N recomputed under checkpointing + 2·N for a reference forward (DPO/KTO
without precomputed reference log-probs).
The architecture comes from the model's config.json (local directory or the hub cache), or a table of the
headline models for hub names not cached here.
"""

from __future__ import annotations

import argparse
import json
import re

from alignkit.architecture import GiB, architecture, lora_parameters, parameter_counts
from alignkit.command import run_cli
from alignkit.errors import UsageError
from alignkit.launch.preflight import preflight, zero_stage
from alignkit.train import STAGES, stage_of

# CPU, fp32: fitted to the measured peak RSS of the smol SFT/DPO runs with and without checkpointing
# (bench/results/plan_calibration.md)
CPU_ACTIVATION_BYTES = 100  # × hidden size, per token and layer without checkpointing
CPU_LOGIT_BYTES = 47  # per token and vocabulary entry
CPU_RUNTIME_GIB = 0.41  # python + torch + transformers + TRL + PEFT imported, nothing loaded
# usable memory (GiB) and dense bf16 peak (TFLOP/s) of common GPUs; `cpu` uses fp32 and this machine's RAM
GPUS = {
    "H100-80GB": (79.6, 989.0), "H200-141GB": (140.4, 989.0), "A100-80GB": (80.0, 312.0),
    "A100-40GB": (40.0, 312.0), "L40S-48GB": (44.5, 362.0), "L4-24GB": (22.0, 121.0), "A10-24GB": (22.0, 125.0),
    "RTX4090-24GB": (24.0, 165.0),
}
PAIR_STAGES = {"dpo", "orpo", "cpo", "reward"}


def estimate(recipe, stage: str, a: dict, *, world: int, device: str, zero: int = 0, fsdp: bool = False,
             utilisation: float = 0.4, peak_tflops: float | None = None, seq_length: float | None = None) -> dict:
    """Predicted peak memory per device (bytes, by part) and seconds per optimiser step. `seq_length`: tokens per
    sequence in the largest (padded) micro-batch; default the recipe's max_length, the worst case. `zero` is the
    sharding stage (FSDP full shard counts as 3, with `fsdp`)."""
    m, t, x = recipe.model, recipe.train, recipe.alignkit
    cpu = device == "cpu"
    counts = parameter_counts(a)
    N, h, L = counts["total"], a["hidden_size"], a["num_hidden_layers"]
    lora = bool(m.use_peft or x.adapter_path)
    qlora = lora and bool(m.load_in_4bit)
    deepspeed = zero > 0 and not fsdp
    # full-parameter training without DeepSpeed loads fp32 weights (the optimiser's masters) under bf16 autocast
    # (models.torch_dtype); DeepSpeed loads bf16 and keeps its own fp32 masters (counted in its optimiser states)
    wbytes = 4 if cpu or (not lora and not deepspeed) else 2
    trainable = lora_parameters(a, m.lora_r, m.lora_target_modules) if lora else N
    shard_w = world if zero == 3 else 1
    shard_g = world if zero >= 2 else 1
    shard_o = world if zero >= 1 else 1
    parts = {}
    if qlora:
        parts["weights"] = counts["linear"] * 4.127 / 8 + (counts["embedding"] + counts["norms"]) * wbytes
    else:
        parts["weights"] = N * wbytes / shard_w
    full_reference = stage in ("dpo", "kto") and not lora and not getattr(t, "precompute_ref_log_probs", False)
    parts["reference"] = N * wbytes / shard_w if full_reference else 0
    # trainable weights' own copy (LoRA: PEFT keeps adapters in fp32, QLoRA: TRL casts them to bf16)
    pbytes = wbytes if not lora else (2 if qlora and not cpu else 4)
    if lora:
        parts["adapter"] = trainable * pbytes
    optim = str(getattr(t.optim, "value", t.optim))
    if deepspeed:
        state_bytes = 12  # DeepSpeed: fp32 master + two fp32 Adam states
    elif "8bit" in optim:
        state_bytes = 2
    elif "32bit" in optim or pbytes == 4:
        state_bytes = 8
    else:
        state_bytes = 2 * pbytes
    parts["gradients"] = trainable * pbytes / shard_g
    # DDP all-reduces through its own gradient buckets: a second copy of every trainable gradient
    parts["ddp_buckets"] = trainable * pbytes if world > 1 and not zero else 0
    parts["optimizer"] = trainable * state_bytes / shard_o
    pair = 2 if stage in PAIR_STAGES or stage == "kto" else 1
    # worst case: every sequence at max_length (batches are padded to their longest sequence)
    max_length = seq_length or getattr(t, "max_length", None) or 1024
    tokens = t.per_device_train_batch_size * max_length * pair
    act = CPU_ACTIVATION_BYTES * h if cpu else 34 * h * wbytes / 2
    checkpointing = bool(t.activation_checkpointing)
    parts["activations"] = tokens * (2 * h * (wbytes / 2) * L + act) if checkpointing else tokens * act * L
    parts["logits"] = tokens * a["vocab_size"] * (CPU_LOGIT_BYTES if cpu else 10)
    parts["overhead"] = CPU_RUNTIME_GIB * GiB if cpu else GiB
    peak = sum(parts.values())
    # a reference forward every step unless its log-probs are precomputed (LoRA: the adapter-disabled model)
    reference_forward = stage in ("dpo", "kto") and not getattr(t, "precompute_ref_log_probs", False)
    flops_per_token = (6 if not lora else 4) * N + (2 * N if checkpointing else 0) + (2 * N if reference_forward else 0)
    accumulation = x.global_batch_size // (world * t.per_device_train_batch_size) if x.global_batch_size else \
        t.gradient_accumulation_steps
    step_tokens = tokens * accumulation * world
    seconds = None
    if peak_tflops:
        seconds = flops_per_token * step_tokens / (world * peak_tflops * 1e12 * utilisation)
    return {"parameters": N, "trainable": trainable, "parts_gib": {k: round(v / GiB, 3) for k, v in parts.items()},
            "peak_gib": round(peak / GiB, 2), "tokens_per_micro_batch": tokens, "tokens_per_step": step_tokens,
            "gradient_accumulation_steps": accumulation, "flops_per_token": flops_per_token,
            "seconds_per_step": None if seconds is None else round(seconds, 2), "utilisation": utilisation}


def parse_gpus(spec: str) -> tuple[int, str, float, float]:
    """'8xH100-80GB' → (8, 'H100-80GB', usable GiB, peak TFLOP/s)."""
    match = re.fullmatch(r"(\d+)x(.+)", spec)
    if not match or match.group(2) not in GPUS:
        raise UsageError(f"--gpus {spec!r}: expected NxTYPE with TYPE one of {', '.join(GPUS)} (e.g. 8xH100-80GB)")
    count, kind = int(match.group(1)), match.group(2)
    return count, kind, *GPUS[kind]


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit plan", description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+")
    p.add_argument("--gpus", default="1xH100-80GB", help="NxTYPE per node, e.g. 8xH100-80GB; or 'cpu'")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--accelerate_config", default=None, help="DDP (none), ZeRO stage or FSDP from this config")
    p.add_argument("--utilisation", type=float, default=0.4, help="share of the GPU's bf16 peak assumed for time")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    if args.gpus == "cpu":
        count, kind, usable, peak = 1, "cpu", None, None
    else:
        count, kind, usable, peak = parse_gpus(args.gpus)
    world = count * args.nodes
    zero, fsdp = zero_stage(args.accelerate_config)
    worst = 0
    for path in args.recipes:
        stage = stage_of(path)
        if stage not in STAGES:
            raise UsageError(f"{path}: cannot tell the stage from the file name")
        recipe = preflight(stage, path, [], world=world, gpus=count)  # validated, accumulation for this world
        a = architecture(recipe.model.model_name_or_path, recipe.alignkit.gguf_file, path)
        est = estimate(recipe, stage, a, world=world, device="cpu" if kind == "cpu" else "cuda", zero=zero,
                       fsdp=bool(fsdp),
                       utilisation=args.utilisation, peak_tflops=peak)
        fits = usable is None or est["peak_gib"] <= usable * 0.95
        worst = max(worst, 0 if fits else 1)
        est.update(recipe=path, stage=stage, gpus=f"{args.nodes}x{args.gpus}", zero_stage=zero, fsdp=bool(fsdp),
                   fits=fits, usable_gib=usable)
        if args.json:
            print(json.dumps(est))
            continue
        parts = ", ".join(f"{k} {v:.2f}" for k, v in est["parts_gib"].items() if v)
        verdict = "fits" if fits else f"DOES NOT FIT in {usable:.0f} GiB"
        time_text = f"; ~{est['seconds_per_step']:.1f} s per optimiser step at {args.utilisation:.0%} of peak" \
            if est["seconds_per_step"] is not None else ""
        print(f"{path}: {stage}, {est['parameters'] / 1e9:.2f} B parameters ({est['trainable'] / 1e6:.1f} M "
              f"trained) on {world} x {kind}" + (f", ZeRO-{zero}" if zero and not fsdp else ", FSDP" if fsdp else "")
              + f": peak {est['peak_gib']:.1f} GiB per device — {verdict} [{parts} GiB]{time_text}")
    return worst


def main(argv=None) -> int:
    return run_cli("plan", run, argv)
