"""`alignkit plan` against measured memory: the CPU speed runs (bench/trainer_speed.py) report their peak RSS; the
planner predicts it for the same recipe, batch and measured mean sequence length (device cpu: fp32). The
process baseline (Python + torch + transformers + TRL imported, nothing loaded) is measured here and added.
Writes bench/results/plan_calibration.md. Run after `make bench`."""

import importlib
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def baseline_gib() -> float:
    code = ("import resource, torch, transformers, trl, peft; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    from alignkit.plan import architecture, estimate

    base = baseline_gib()
    rows = ["| stage | variant | mean tokens/sequence | predicted GiB (+ baseline) | measured peak RSS GiB | error |",
            "|---|---|---|---|---|---|"]
    errors = []
    for stage, recipe_path in (("sft", "recipes/smol/sft.yaml"), ("dpo", "recipes/smol/dpo.yaml")):
        spec = importlib.import_module(f"alignkit.{stage}").SPEC
        for variant in ("stock", "alignkit"):
            r = json.load(open(os.path.join(RESULTS, f"speed_{stage}_{variant}.json")))
            recipe = spec.parse(["--config", recipe_path, "--gradient_checkpointing", str(r["gradient_checkpointing"]),
                                 "--precompute_ref_log_probs" if stage == "dpo" else "--seed",
                                 str(r["precompute_ref_log_probs"]) if stage == "dpo" else "42"], for_check=True)
            pair = 2 if stage == "dpo" else 1
            mean = r["tokens_per_step"] / (r["global_batch"] * pair)
            a = architecture("build/models/base")
            est = estimate(recipe, stage, a, world=1, device="cpu", mean_length=mean)
            predicted = est["peak_gib"] + base
            error = (predicted - r["peak_rss_gib"]) / r["peak_rss_gib"]
            errors.append(abs(error))
            rows.append(f"| {stage} | {variant} | {mean:.0f} | {predicted:.2f} ({est['peak_gib']:.2f} + {base:.2f}) | "
                        f"{r['peak_rss_gib']:.2f} | {error:+.0%} |")
    text = "\n".join(["# alignkit plan vs measured memory (CPU, SmolLM2-135M + LoRA, fp32)", "", *rows, "",
                      f"mean absolute error {sum(errors) / len(errors):.0%}; baseline process {base:.2f} GiB", ""])
    with open(os.path.join(RESULTS, "plan_calibration.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
