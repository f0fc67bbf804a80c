"""GPU benchmark: DPO optimiser micro-steps of the headline recipes' shapes, with random weights (no hub access).

    python bench/gpu_dpo_step.py --shape anima-33b --out bench/results/gpu/anima-33b.json
    python bench/gpu_dpo_step.py --shape zephyr-7b --out bench/results/gpu/zephyr-7b.json
    python bench/gpu_dpo_step.py --shape tiny-anima --device cpu --out /tmp/tiny.json   # the script itself, seconds

What the step is, taken from the recipe (recipes/anima-33b/dpo.yaml, recipes/zephyr-7b-beta/dpo.yaml): sequence
length = the recipe's max_length (prompt and answer together, per side), micro-batch = its per-device batch, β, LoRA
rank/α, the optimiser, activation checkpointing, and reference log-probs read from the ref_logps artifact (both
recipes): no reference forward in the step. The reference pass (what the ref_logps stage does once per pair) is
timed on its own. Shapes (the real architectures, weights random):
  anima-33b   LLaMA-33B (hidden 6656, 60 layers, 52 heads, FFN 17920, vocab 32000) in 4-bit nf4 with double
              quantisation, LoRA r 256 α 16 on all linear layers, bf16 compute; embeddings, norms and LM head stay
              bf16 and the adapters are cast to bf16, as TRL does (no fp32 upcast of the frozen parts, which
              PEFT's prepare_model_for_kbit_training would do); paged AdamW 32-bit.
  zephyr-7b   Mistral-7B (hidden 4096, 32 layers, 32/8 heads, FFN 14336, vocab 32000), full fine-tuning in bf16.
              Zephyr shards this over 16 GPUs with ZeRO-3; on one GPU the optimiser states are 8-bit (paged
              AdamW 8-bit) so that it fits — stated in the output, and `alignkit plan` is asked about that setting.
  tiny-*      the same code on 2-layer models (layer sizes multiples of 64: bitsandbytes' CPU packing), to check
              the script in seconds, on CPU too.

Reported, per micro-batch after 2 warm-up ones: seconds, tokens/s; peak memory three ways — PyTorch's allocator
peak, the paged optimiser's states (bitsandbytes allocates them with cudaMallocManaged, outside PyTorch's
allocator, so max_memory_allocated misses them) and their sum, and the device's used memory from NVML above the
level before the model was built (everything resident: allocator reserve, managed pages, workspaces); model
FLOPs without recomputation — 2N per token forward, backward 4N (full) or 2N (frozen base: activation gradients
only, plus the adapters' weight gradients), N = the dense-equivalent linear layers and LM head; the GPU's
peak detected twice: the nominal dense bf16 peak of its kind (alignkit plan's table) and a measured 8192³ bf16
matmul; `alignkit plan`'s prediction (peak memory, seconds per optimiser step at its default 40 % utilisation)
for the same setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))  # alignkit's plan table and architecture arithmetic, from the tree
LLAMA_33B = dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                 num_key_value_heads=52, vocab_size=32000)
MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=1024)
SHAPES = {
    "anima-33b": dict(recipe="recipes/anima-33b/dpo.yaml", kind="qlora", arch=LLAMA_33B),
    "zephyr-7b": dict(recipe="recipes/zephyr-7b-beta/dpo.yaml", kind="full", arch=MISTRAL_7B,
                      optim="paged_adamw_8bit"),
    "tiny-anima": dict(recipe="recipes/anima-33b/dpo.yaml", kind="qlora", arch={**TINY, "num_key_value_heads": 4},
                       max_length=64, lora_r=16),
    "tiny-zephyr": dict(recipe="recipes/zephyr-7b-beta/dpo.yaml", kind="full", arch={**TINY, "num_key_value_heads": 2},
                        max_length=64, micro=2, optim="paged_adamw_8bit"),
}


def setting(shape: dict) -> dict:
    """The benchmark's step as the recipe states it (tiny shapes shorten sequences and batches)."""
    recipe = yaml.safe_load(open(os.path.join(ROOT, shape["recipe"])))
    micro = shape.get("micro", recipe["per_device_train_batch_size"])
    return dict(seq=shape.get("max_length", recipe["max_length"]), micro=micro, beta=recipe["beta"],
                accumulation=recipe["global_batch_size"] // micro, lora_r=shape.get("lora_r", recipe.get("lora_r")),
                lora_alpha=recipe.get("lora_alpha"), optim=shape.get("optim", recipe.get("optim", "adamw_torch")),
                checkpointing=bool(recipe.get("activation_checkpointing")), reference_precomputed="ref_logps" in recipe)


def llama_config(arch: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**arch, max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa")


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
            data = (torch.ones(p.shape, dtype=torch.bfloat16, device=device) if "norm" in type(module).__name__.lower()
                    else torch.randn(p.shape, dtype=torch.bfloat16, device=device) * std)
            setattr(module, pname, torch.nn.Parameter(data, requires_grad=False))
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) marks; PEFT reads it
    return model.to(device)


def sequence_logps(model, ids):
    """Summed log-probabilities of each sequence's tokens after the first (the DPO quantity), fp32 log-softmax."""
    import torch

    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1).sum(-1)


class PeakMemory:
    """Peak memory while something runs, polled every 20 ms: on a GPU its used memory as NVML sees it (all of it:
    allocator reserve, managed pages resident on the device, workspaces) above the level at the start; on CPU the
    peak RSS (VmHWM) of the process `pid` (a child, set once started)."""

    def __init__(self, cuda: bool):
        self.cuda, self.pid, self.peak, self.running = cuda, None, 0, True
        if cuda:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
            self.base = self.read()
        else:
            self.base = 0
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def read(self) -> int:
        if self.cuda:
            return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used
        try:
            with open(f"/proc/{self.pid}/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, TypeError, StopIteration):
            return 0

    def poll(self):
        while self.running:
            self.peak = max(self.peak, self.read())
            time.sleep(0.02)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return round((max(self.peak, self.read()) - self.base) / 2 ** 30, 3)


def matmul_peak_tflops(device: str, size: int, repeats: int = 10) -> float:
    """Measured dense bf16 matmul throughput (the practical peak of this device)."""
    import torch

    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12


def sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def nominal_gpu(name: str) -> tuple[str | None, float | None]:
    """alignkit plan's GPU kind and nominal dense bf16 peak (TFLOP/s) for a CUDA device name."""
    import torch

    from alignkit.launch.plan import GPUS

    gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    for kind, (_, peak) in GPUS.items():
        model, memory = kind.rsplit("-", 1)
        if model.replace("RTX", "") in name.replace(" ", "") and abs(float(memory[:-2]) - gib) / gib < 0.15:
            return kind, peak
    return None, None


def plan_prediction(shape: dict, s: dict, config, gpus: str) -> dict:
    """`alignkit plan --json` for the recipe with the benchmark's architecture, micro-batch, optimiser and
    sequence length."""
    recipe = yaml.safe_load(open(os.path.join(ROOT, shape["recipe"])))
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)  # plan reads the architecture from a local model directory's config.json
        recipe.update(model_name_or_path=tmp, per_device_train_batch_size=s["micro"], optim=s["optim"],
                      max_length=s["seq"], global_batch_size=s["micro"] * s["accumulation"])
        if shape["kind"] == "qlora":
            recipe["lora_r"] = s["lora_r"]
        path = os.path.join(tmp, "dpo.yaml")  # the stage is read from the file name
        with open(path, "w") as f:
            yaml.safe_dump(recipe, f)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(ROOT, "src"),
                                                                          os.environ.get("PYTHONPATH")]))}
        r = subprocess.run([sys.executable, "-m", "alignkit", "plan", path, "--gpus", gpus, "--json"],
                           capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode not in (0, 1):  # 1: does not fit, still a prediction
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    est = json.loads(r.stdout.strip().splitlines()[-1])
    return {k: est[k] for k in ("peak_gib", "parts_gib", "seconds_per_step", "utilisation", "fits", "gpus")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=4, help="timed micro-batches (after 2 warm-up ones)")
    p.add_argument("--micro", type=int, default=None, help="micro-batch (pairs); default the recipe's")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import bitsandbytes as bnb
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    shape = SHAPES[args.shape]
    s = setting(shape)
    if args.micro:
        s["accumulation"] = s["accumulation"] * s["micro"] // args.micro
        s["micro"] = args.micro
    torch.manual_seed(0)
    config = llama_config(shape["arch"])
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        monitor = PeakMemory(cuda=True)
    t0 = time.time()
    if shape["kind"] == "qlora":
        model = random_4bit_model(config, args.device)
        model = get_peft_model(model, LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)  # TRL casts the adapters to the compute dtype
    else:
        from transformers import AutoModelForCausalLM

        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if s["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if shape["kind"] == "qlora":
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need an input with grad
    model.config.use_cache = False
    trained = [q for q in model.parameters() if q.requires_grad]
    optimiser = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
                 "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[s["optim"]](trained, lr=1e-4)
    build_seconds = time.time() - t0
    total = sum(q.numel() * (2 if getattr(q, "quant_type", None) else 1) for q in model.parameters())
    trainable = sum(q.numel() for q in trained)

    micro, seq, beta = s["micro"], s["seq"], s["beta"]
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randint(0, config.vocab_size, (micro, seq), generator=generator).to(args.device)
    rejected = torch.randint(0, config.vocab_size, (micro, seq), generator=generator).to(args.device)
    both = torch.cat([chosen, rejected])

    # the reference log-probs, as the ref_logps stage computes them once (the starting policy, no gradient)
    model.eval()
    ref_times = []
    for _ in range(3):
        sync(args.device)
        start = time.perf_counter()
        with torch.no_grad():
            reference = sequence_logps(model, both)
        sync(args.device)
        ref_times.append(time.perf_counter() - start)
    model.train()

    def micro_step():
        logps = sequence_logps(model, both)
        ratio = (logps[:micro] - reference[:micro]) - (logps[micro:] - reference[micro:])
        loss = -F.logsigmoid(beta * ratio).mean()
        loss.backward()
        return float(loss)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(2 + args.steps):
        sync(args.device)
        start = time.perf_counter()
        losses.append(micro_step())
        optimiser.step()  # one optimiser step per micro-batch here: the cost is measured, the schedule is not
        optimiser.zero_grad(set_to_none=True)
        sync(args.device)
        times.append(time.perf_counter() - start)
    per_micro = sum(times[2:]) / args.steps
    tokens = 2 * micro * seq
    # paged optimiser states live in managed memory, outside PyTorch's allocator statistics
    managed = sum(t.numel() * t.element_size() for state in optimiser.state.values() for t in state.values()
                  if torch.is_tensor(t) and t.numel() > 1)
    dense = weights_per_token({**shape["arch"], "tie_word_embeddings": False, "gated": True})
    adapters = trainable if shape["kind"] == "qlora" else 0
    # forward 2N; backward: full 4N, frozen base 2N (activation gradients) + 2 per adapter weight (its gradient)
    flops_per_token = 2 * dense + (4 * dense if shape["kind"] == "full" else 2 * dense + 2 * adapters)
    model_flops = flops_per_token * tokens / per_micro
    result = {
        "shape": args.shape, "recipe": shape["recipe"], "setting": s, "device": device_name(args.device),
        "torch": torch.__version__, "bitsandbytes": bnb.__version__, "architecture": shape["arch"],
        "optimiser": s["optim"] + (" (one GPU; the recipe uses ZeRO-3 over 16)" if args.shape == "zephyr-7b" else ""),
        "parameters_total": total, "parameters_trainable": trainable, "build_seconds": round(build_seconds, 1),
        "seconds_per_micro_batch": round(per_micro, 4), "tokens_per_second": round(tokens / per_micro, 1),
        "reference_seconds_per_micro_batch": round(min(ref_times[1:]), 4),
        "step_seconds_at_recipe_accumulation": round(per_micro * s["accumulation"], 2),
        "model_flops_per_token": flops_per_token, "model_tflops_per_second": round(model_flops / 1e12, 2),
        "first_loss": round(losses[0], 6), "losses": [round(x, 4) for x in losses],
    }
    if cuda:
        allocated = torch.cuda.max_memory_allocated()
        kind, nominal = nominal_gpu(torch.cuda.get_device_name())
        measured = matmul_peak_tflops(args.device, 8192)
        result.update(
            peak_allocated_gib=round(allocated / 2 ** 30, 2), paged_optimiser_states_gib=round(managed / 2 ** 30, 2),
            peak_allocated_plus_managed_gib=round((allocated + managed) / 2 ** 30, 2),
            peak_device_used_gib=monitor.stop(),
            gpu_kind=kind, nominal_bf16_tflops=nominal, measured_bf16_matmul_tflops=round(measured, 1),
            utilisation_of_nominal_peak=round(model_flops / 1e12 / nominal, 3) if nominal else None,
            utilisation_of_measured_peak=round(model_flops / 1e12 / measured, 3),
            plan=plan_prediction(shape, s, config, f"1x{kind}") if kind
            else {"error": "GPU kind not in alignkit plan's table"})
    else:
        import resource

        # on CPU this checks the script; no utilisation (CPUs without bf16 units emulate bf16 matmuls)
        result.update(peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
                      paged_optimiser_states_gib=round(managed / 2 ** 30, 4),
                      plan=plan_prediction(shape, s, config, "cpu"))
    if args.shape == "anima-33b":
        result["anima_100_steps_hours"] = round(per_micro * s["accumulation"] * 100 / 3600, 2)
        result["anima_reported_hours"] = 5.0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def weights_per_token(a: dict) -> int:
    """The weights every token is multiplied with, N in the FLOP count: the (dense-equivalent) linear layers and
    the LM head; the input embedding is a lookup. `a`: an architecture as alignkit.architecture describes it."""
    from alignkit.architecture import parameter_counts

    return parameter_counts(a)["linear"] + a["vocab_size"] * a["hidden_size"]


if __name__ == "__main__":
    main()
