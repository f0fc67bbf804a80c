"""bench/gpu_check.sh, the GPU check a lent GPU host runs, on CPU with tiny shapes: every case runs through the real
commands (alignkit sft / dpo, the QLoRA nf4 path, gpu_dpo_step's Anima- and Zephyr-shaped DPO steps) and reports
what the GPU run reports, with alignkit plan's prediction beside it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_check(*args, env=None):
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "GPU_BUNDLE": os.devnull, **(env or {})},
                          timeout=900)  # no bundle: this environment has every package (a .gpu/ here is cp312's)


def test_gpu_check_runs_every_case_on_cpu_with_tiny_shapes(tmp_path, tiny_model):
    r = gpu_check("--tiny", "--shape-dir", tiny_model, "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.load(open(tmp_path / "gpu_check.json"))
    runs = {run.get("case", run.get("shape")): run for run in results["runs"]}
    assert set(runs) == {"sft-bf16-sdpa", "dpo-bf16-sdpa", "sft-qlora-nf4", "tiny-anima", "tiny-zephyr"}
    for name in ("sft-bf16-sdpa", "dpo-bf16-sdpa", "sft-qlora-nf4"):
        run = runs[name]
        assert run["steps"] == 2 and run["seconds_per_step"] > 0 and run["tokens_per_second"] > 0, run
        assert run["peak_memory_gib"] > 0.1 and run["plan"]["peak_gib"] > 0, run
        assert math.isfinite(run["train_loss"])
    for shape in ("tiny-anima", "tiny-zephyr"):
        run = runs[shape]
        # reference log-probs precomputed from the starting policy (the recipes' ref_logps): step 1 is exactly ln 2
        assert abs(run["first_loss"] - math.log(2)) < 1e-6 and run["setting"]["reference_precomputed"], run
        assert run["losses"][-1] < run["losses"][0] and run["model_flops_per_token"] > 0
        assert run["plan"]["peak_gib"] > 0 and run["reference_seconds_per_micro_batch"] > 0
    # the 1200 tokens the Anima recipe allows per sequence are the benchmark's, unless a tiny shape shortens them
    assert runs["tiny-anima"]["setting"]["seq"] == 64 and runs["tiny-anima"]["setting"]["optim"] == "paged_adamw_32bit"
    assert "| sft-qlora-nf4 |" in open(tmp_path / "gpu_check.md").read()


def test_without_a_gpu_the_full_check_refuses_in_one_line(tmp_path, tiny_model):
    r = gpu_check("--shape-dir", tiny_model, "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip() == "gpu_check: no CUDA GPU here; --tiny runs the script's small " \
                                                      "shapes on CPU"


def test_anima_benchmark_takes_the_recipes_setting():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_dpo_step

    s = gpu_dpo_step.setting(gpu_dpo_step.SHAPES["anima-33b"])
    assert s == {"seq": 1200, "micro": 1, "beta": 0.1, "accumulation": 16, "lora_r": 256, "lora_alpha": 16,
                 "optim": "paged_adamw_32bit", "checkpointing": True, "reference_precomputed": True}
