"""SFT and DPO speed on SmolLM2: alignkit's recipe defaults vs stock TRL defaults, same data, model, LoRA and
global batch, on this machine. A benchmark, not a test (`make bench`; needs the smol pipeline's outputs).

    python bench/trainer_speed.py --stage dpo --variant alignkit --out bench/results/speed_dpo_alignkit.json

alignkit: the recipe as alignkit resolves it (fp32 on CPU, gradient checkpointing off where memory allows, freed
memory kept for reuse (`cpu_keep_freed_memory`), reference log-probs for DPO read from the pipeline's ref_logps
artifact — computed once per reference model and data, its cost is the ref_logps stage's in
bench/results/smol_pipeline.json). stock: TRL's
own config defaults for everything the recipe does not state (gradient checkpointing on, random batches, reference
forward every step), with only `bf16=False, use_cpu=True` added because TRL's bf16 default cannot run on this CPU.
Both run one full epoch of the same rows with the same global batch.
Reported: seconds per step (mean over the epoch, first step excluded as warm-up), tokens/s (the tokens the step
needs through the policy, below), padding fraction of the batches, peak RSS, and utilisation = model FLOP/s ÷ this
machine's fp32 matmul peak measured in the same process.

Model FLOPs count the work the algorithm needs, the same for both variants, not what an implementation does: the
backbone (every weight but the embedding/LM head, N_b) once per needed token — for DPO the prompt once and both
answers, for SFT every token — and the LM head (vocabulary × hidden, N_h) only where a log-prob is scored (DPO: the
answers; SFT: the labelled tokens). 2 FLOPs per weight and token forward; backward the same again through a frozen
base (LoRA computes input gradients only) or twice that for full fine-tuning. Not counted: a reference forward (its
log-probs can be computed once, as alignkit does), recomputation under gradient checkpointing, padding, the prompt's
second pass and the prompt positions' LM head in TRL's layout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import machine  # bench/machine.py: the script's own folder is on sys.path

RECIPES = {"sft": "recipes/smol/sft.yaml", "dpo": "recipes/smol/dpo.yaml"}
STOCK_TRAINERS = {"sft": "trl:SFTTrainer", "dpo": "trl:DPOTrainer"}  # TRL's own, for the stock variant


def matmul_peak_gflops(size: int = 1024, repeats: int = 20) -> float:
    """Measured fp32 matmul throughput of this process's threads (the denominator of utilisation)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def build(stage: str, variant: str, steps: int | None, bf16: bool = False, compile_model: bool = False):
    """The stage's trainer for the smol recipe; `steps` None = the recipe's own length (one epoch)."""
    import importlib

    from alignkit.train.stage import import_object, load_inputs, make_trainer

    module = importlib.import_module(f"alignkit.train.{stage}")
    spec = module.SPEC
    max_steps = steps or -1  # -1: num_train_epochs decides
    overrides = ["--max_steps", str(max_steps), "--output_dir", f"/tmp/alignkit-bench-{stage}-{variant}",
                 "--save_strategy", "no", "--logging_steps", "1"]
    if variant == "stock":  # TRL in a plain process: glibc's own malloc, no stored reference log-probs
        overrides += ["--cpu_keep_freed_memory", "false"] + (["--ref_logps", ""] if stage == "dpo" else [])
    if bf16:  # alignkit's opt-in CPU precision: bf16 autocast, fp32 master weights
        overrides += ["--bf16", "true", "--use_cpu", "true"]
    if compile_model:  # TrainingArguments.torch_compile: the model through torch.compile (inductor)
        overrides += ["--torch_compile", "true"]
    recipe = spec.parse(["--config", RECIPES[stage], *overrides])
    if variant == "stock":
        config_cls = import_object(spec.config)
        stated = {k: getattr(recipe.train, k) for k in recipe.explicit_keys if hasattr(recipe.train, k)}
        stated.update(max_steps=max_steps, output_dir=recipe.train.output_dir, save_strategy="no", logging_steps=1,
                      report_to="none", bf16=False, use_cpu=True)
        stated.pop("precompute_ref_log_probs", None)  # a recipe choice alignkit makes by default for DPO
        recipe.train = config_cls(**stated)
    train_ds, eval_ds, _, tokenizer, model = load_inputs(recipe, spec.data_kind, prepare_data=spec.prepare_data)
    trainer_cls = import_object(STOCK_TRAINERS[stage] if variant == "stock" else spec.trainer)
    trainer = make_trainer(trainer_cls, recipe, model, tokenizer, train_ds, eval_ds)
    return recipe, trainer, model


# how the profile groups operators (self time, so nothing is counted twice)
PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv"}


def profile_summary(prof, seconds: list[float], model_gflop_per_step: float, peak_gflops: float) -> dict:
    """The profiled steps (`seconds` each): each operator's self time and the products' FLOPs (the profiler's own
    count), beside the step's counted model FLOPs and the same products replayed alone."""
    events = prof.key_averages()
    steps, wall = len(seconds), sum(seconds)
    self_s = {e.key: e.self_cpu_time_total / 1e6 / steps for e in events}
    products = sum(t for k, t in self_s.items() if k in PRODUCTS)
    product_gflop = sum(e.flops for e in events if e.key in PRODUCTS) / 1e9 / steps
    calls = sum(e.count for e in events if e.key in PRODUCTS) // steps
    top = sorted(self_s.items(), key=lambda kv: -kv[1])[:12]
    replayed = replay_products(prof, steps)
    return {
        "steps": steps, "seconds_per_step": round(wall / steps, 3),
        "products_seconds_per_step": round(products, 3), "products_share": round(products * steps / wall, 3),
        "product_calls_per_step": calls, "product_gflop_per_step": round(product_gflop, 1),
        "model_gflop_per_step": round(model_gflop_per_step, 1),
        "products_gflops": round(product_gflop / products, 1),
        "products_utilisation_of_matmul_peak": round(product_gflop / products / peak_gflops, 3),
        # the profiler slows every operator down; the same products replayed alone, at this step's shapes and
        # counts, time them without it
        "replayed_products_seconds_per_step": round(replayed, 3),
        "replayed_products_utilisation_of_matmul_peak": round(product_gflop / replayed / peak_gflops, 3),
        # the step's utilisation if every operator but the products took no time at all
        "utilisation_if_only_products_took_time": round(model_gflop_per_step / replayed / peak_gflops, 3),
        "top_self_seconds_per_step": {k: round(t, 3) for k, t in top},
    }


def replay_products(prof, steps: int, repeats: int = 3) -> float:
    """Seconds per step of the profiled steps' matrix products replayed alone: each (operator, input shapes) as many
    times per step as it ran, on random contiguous inputs, best of `repeats`."""
    import torch

    total = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in PRODUCTS:
            continue
        shapes = [s for s in e.input_shapes if s]
        op = getattr(torch.ops.aten, e.key.removeprefix("aten::"))
        inputs = [torch.randn(s) for s in shapes]
        calls = max(1, round(e.count / steps))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                op(*inputs)
            best = min(best, time.perf_counter() - start)
        total += best
    return total


def needed_tokens_per_example(trainer, stage: str) -> tuple[float, float]:
    """(backbone tokens, LM-head tokens) the algorithm needs per example (see the module's docstring)."""
    ds = trainer.train_dataset
    if stage == "dpo":
        work = [(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]),
                 len(r["chosen_ids"]) + len(r["rejected_ids"])) for r in ds]
    elif "labels" in ds.column_names:  # alignkit's tokenized rows: -100 where no log-prob is scored
        work = [(len(r["input_ids"]), sum(label != -100 for label in r["labels"][1:])) for r in ds]
    else:
        mask = "assistant_masks" if "assistant_masks" in ds.column_names else "completion_mask"
        work = [(len(r["input_ids"]), sum(r[mask]) if mask in ds.column_names else len(r["input_ids"]) - 1)
                for r in ds]
    return sum(b for b, _ in work) / len(work), sum(h for _, h in work) / len(work)


def table(results_dir: str) -> str:
    """bench/results/trainer_speed.md from the four JSON results: side by side, with the speed-up ratio."""
    rows = ["| stage | variant | grad. ckpt | precomputed ref | freed memory kept | batches | padding | s/step | "
            "tokens/s | peak RSS GiB | utilisation of fp32 matmul peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for stage in sorted(RECIPES):
        r = {v: json.load(open(os.path.join(results_dir, f"speed_{stage}_{v}.json"))) for v in ("stock", "alignkit")}
        for v, x in r.items():
            rows.append(f"| {stage} | {v} | {x['gradient_checkpointing']} | {x['precompute_ref_log_probs']} | "
                        f"{x['keeps_freed_memory']} | {x['sampling']} | {x['padding_fraction']:.1%} | "
                        f"{x['seconds_per_step']:.2f} | {x['tokens_per_second']:.1f} | {x['peak_rss_gib']:.2f} | "
                        f"{x['utilisation_of_matmul_peak']:.1%} of {x['matmul_peak_gflops']:.0f} GFLOP/s |")
        ratios.append(f"{stage}: alignkit {r['stock']['seconds_per_step'] / r['alignkit']['seconds_per_step']:.2f}x "
                      "stock TRL per step")
    return "\n".join([f"# Trainer speed, SmolLM2-135M-Instruct + LoRA, fp32, {os.cpu_count()} CPU threads "
                      f"({machine.cpu_name()})", "",
                      *rows, "", "; ".join(ratios), ""])


def interleave(stage: str, rounds: int, steps: int | None, out_dir: str) -> None:
    """Each variant ROUNDS times in fresh processes, alternating ABBA; per variant the mean of its rounds' seconds per
    step (and tokens/s, utilisation from it), every round kept under "rounds"."""
    import subprocess
    import tempfile

    order = [v for r in range(rounds) for v in (("stock", "alignkit") if r % 2 == 0 else ("alignkit", "stock"))]
    runs: dict[str, list] = {"stock": [], "alignkit": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(order):
            out = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--variant", variant, "--out", out]
            subprocess.run(cmd + (["--steps", str(steps)] if steps else []), check=True, stdout=subprocess.DEVNULL)
            runs[variant].append(json.load(open(out)))
            print(f"{stage} {variant}: {runs[variant][-1]['seconds_per_step']} s/step", file=sys.stderr)
    os.makedirs(out_dir, exist_ok=True)
    for variant, results in runs.items():
        merged = dict(results[0])
        per_step = sum(r["seconds_per_step"] for r in results) / len(results)
        scale = results[0]["seconds_per_step"] / per_step
        merged.update(seconds_per_step=round(per_step, 3),
                      tokens_per_second=round(results[0]["tokens_per_second"] * scale, 1),
                      model_gflops_per_second=round(results[0]["model_gflops_per_second"] * scale, 1),
                      matmul_peak_gflops=round(sum(r["matmul_peak_gflops"] for r in results) / len(results), 1),
                      peak_rss_gib=max(r["peak_rss_gib"] for r in results),
                      rounds=[{k: r[k] for k in ("seconds_per_step", "matmul_peak_gflops", "step_seconds")}
                              for r in results])
        merged.pop("step_seconds")  # the first round's: each round's are under "rounds"
        merged["utilisation_of_matmul_peak"] = round(merged["model_gflops_per_second"] / merged["matmul_peak_gflops"],
                                                     3)
        with open(os.path.join(out_dir, f"speed_{stage}_{variant}.json"), "w") as f:
            json.dump(merged, f, indent=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=sorted(RECIPES))
    p.add_argument("--variant", choices=["alignkit", "stock"])
    p.add_argument("--steps", type=int, default=None, help="default: one epoch")
    p.add_argument("--bf16", action="store_true", help="the opt-in CPU precision (alignkit variant); with "
                   "ALIGNKIT_CPU_NUMERICS=native, or the bf16 units stay unused")
    p.add_argument("--torch_compile", action="store_true", help="the model through torch.compile (alignkit variant)")
    p.add_argument("--profile", type=int, metavar="STEPS", default=0,
                   help="also profile STEPS steps after the first (torch.profiler): where the step's time goes, the "
                        "matrix products' own FLOP rate, and the utilisation the step would reach if nothing but its "
                        "products took time (the result's \"profile\")")
    p.add_argument("--out")
    p.add_argument("--table", metavar="RESULTS_DIR", help="write RESULTS_DIR/trainer_speed.md from the four runs")
    p.add_argument("--interleave", type=int, metavar="ROUNDS",
                   help="run both variants of --stage ROUNDS times each, in the order stock, alignkit, alignkit, "
                        "stock, ... (machine noise hits both), into --out DIR/speed_<stage>_<variant>.json")
    args = p.parse_args()
    if args.interleave:
        interleave(args.stage, args.interleave, args.steps, args.out)
        return
    if args.table:
        text = table(args.table)
        with open(os.path.join(args.table, "trainer_speed.md"), "w") as f:
            f.write(text)
        print(text)
        return

    import torch
    from transformers import TrainerCallback

    from alignkit.numerics import in_effect
    from alignkit.train.batches import padding_fraction

    peak = matmul_peak_gflops()
    recipe, trainer, model = build(args.stage, args.variant, args.steps, args.bf16, args.torch_compile)

    class StepTimes(TrainerCallback):
        """Each step's seconds; with --profile, steps 2 .. PROFILE+1 (the first is warm-up) under torch.profiler."""

        def __init__(self):
            self.times, self.start, self.prof = [], None, None

        def on_step_begin(self, a, s, c, **k):
            if args.profile and len(self.times) == 1:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   with_flops=True, record_shapes=True)
                self.prof.__enter__()
            self.start = time.perf_counter()

        def on_step_end(self, a, s, c, **k):
            self.times.append(time.perf_counter() - self.start)
            if self.prof is not None and len(self.times) == 1 + args.profile:
                self.prof.__exit__(None, None, None)

        def on_train_end(self, a, s, c, **k):
            if self.prof is not None and len(self.times) < 1 + args.profile:  # fewer steps than --profile asked
                self.prof.__exit__(None, None, None)

    timer = StepTimes()
    trainer.add_callback(timer)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    steady = timer.times[1:] or timer.times
    per_step = sum(steady) / len(steady)
    examples = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    backbone_tokens, head_tokens = (x * examples for x in needed_tokens_per_example(trainer, args.stage))
    tokens = backbone_tokens
    head = model.get_output_embeddings().weight.numel()
    n_backbone = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name) - head
    if not model.config.tie_word_embeddings:
        n_backbone -= model.get_input_embeddings().weight.numel()
    lora = any("lora_" in name for name, _ in model.named_parameters())
    forward = 2 * n_backbone * backbone_tokens + 2 * head * head_tokens
    flops = forward * (2 if lora else 3)
    result = {
        "stage": args.stage, "variant": args.variant, "steps": trainer.state.global_step,
        "sampling": str(getattr(trainer.args.train_sampling_strategy, "value", trainer.args.train_sampling_strategy)),
        "padding_fraction": round(padding_fraction(trainer), 4),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "precompute_ref_log_probs": bool(getattr(trainer.args, "precompute_ref_log_probs", False)),
        "keeps_freed_memory": recipe.alignkit.cpu_keep_freed_memory,
        "global_batch": examples, "tokens_per_step": round(tokens, 1),
        "seconds_per_step": round(per_step, 3), "tokens_per_second": round(tokens / per_step, 1),
        "train_seconds_total": round(total, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "matmul_peak_gflops": round(peak, 1),
        "lm_head_tokens_per_step": round(head_tokens, 1),
        "model_gflops_per_second": round(flops / per_step / 1e9, 1),
        "utilisation_of_matmul_peak": round(flops / per_step / 1e9 / peak, 3),
        "threads": torch.get_num_threads(), "numerics": in_effect()["cpu"],
        "precision": "bf16 autocast" if trainer.args.bf16 else "fp32",
        "torch_compile": bool(trainer.args.torch_compile),
        "step_seconds": [round(t, 3) for t in timer.times],
    }
    if timer.prof is not None:
        result["profile"] = profile_summary(timer.prof, timer.times[1:1 + args.profile], flops / 1e9, peak)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    import alignkit  # noqa: F401  (before torch: its CPU numerics act only when they come first)

    main()
