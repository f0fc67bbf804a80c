"""What the portable CPU numerics (alignkit.numerics: MKL, ATen and oneDNN held to AVX2 code paths) cost on this
machine: the same SmolLM2 work in portable mode (the default) and native mode (ALIGNKIT_CPU_NUMERICS=native), each
in a fresh process — the settings act only before torch loads — with the modes interleaved so machine noise hits
both. A benchmark, not a test (`make bench`; needs the smol pipeline's outputs: build/models/base, build/ref_logps).

    python bench/cpu_numerics.py --rounds 2 --out bench/results/cpu_numerics.json

Measured per mode: the fp32 1024² matmul throughput, seconds per SFT and per DPO optimiser step
(bench/trainer_speed.py, alignkit's recipe), and greedy generation tokens/s (the evaluation stages' work). On an
AVX2-only CPU both modes run the same code and the cost is ~0; on AVX-512 it is what the README states.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import machine  # bench/machine.py: the script's own folder is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("portable", "native")


def generation_speed(prompts: int, new_tokens: int) -> dict:
    """Greedy answers of the base model to the smol held-out questions, as the evaluation stages make them."""
    import time

    from alignkit.data import read_jsonl
    from alignkit.generation import generate
    from alignkit.models import load_for_inference
    from alignkit.numerics import in_effect

    model, tokenizer = load_for_inference("build/models/base")
    rows = read_jsonl("data/smol/heldout.jsonl")[:prompts]
    conversations = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    generate(model, tokenizer, conversations[:2], max_new_tokens=4)  # warm-up
    start = time.perf_counter()
    _, stats = generate(model, tokenizer, conversations, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - start
    return {"generated_tokens": stats["generated_tokens"], "generation_seconds": round(seconds, 2),
            "tokens_per_second": round(stats["generated_tokens"] / seconds, 1), "numerics": in_effect()["cpu"]}


def in_mode(mode: str, args: list[str]) -> dict:
    env = {**os.environ, "ALIGNKIT_CPU_NUMERICS": mode}
    for key in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):  # let alignkit decide, not the shell
        env.pop(key, None)
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"cpu_numerics: {' '.join(args)} failed in {mode} mode:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="interleaved portable/native rounds")
    p.add_argument("--steps", type=int, default=6, help="optimiser steps per training run (the first is warm-up)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu_numerics.json"))
    p.add_argument("--generation", action="store_true", help=argparse.SUPPRESS)  # one child process
    args = p.parse_args()
    if args.generation:
        print(json.dumps(generation_speed(args.prompts, args.new_tokens)))
        return

    runs: dict[str, dict[str, list]] = {m: {"sft": [], "dpo": [], "generation": []} for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                for stage in ("sft", "dpo"):
                    out = os.path.join(tmp, f"{stage}-{mode}-{r}.json")
                    runs[mode][stage].append(in_mode(mode, [os.path.join(HERE, "trainer_speed.py"), "--stage", stage,
                                                            "--variant", "alignkit", "--steps", str(args.steps),
                                                            "--out", out]))
                runs[mode]["generation"].append(in_mode(mode, [os.path.abspath(__file__), "--generation", "--prompts",
                                                               str(args.prompts), "--new_tokens",
                                                               str(args.new_tokens)]))
                print(f"round {r + 1} {mode}: done", file=sys.stderr)

    def median(mode, stage, key):
        return statistics.median(x[key] for x in runs[mode][stage])

    summary = {m: {"matmul_gflops": median(m, "sft", "matmul_peak_gflops"),
                   "sft_seconds_per_step": median(m, "sft", "seconds_per_step"),
                   "dpo_seconds_per_step": median(m, "dpo", "seconds_per_step"),
                   "generation_tokens_per_second": median(m, "generation", "tokens_per_second")} for m in MODES}
    result = {
        "machine": machine.describe(),
        "rounds": args.rounds, "steps": args.steps, "prompts": args.prompts, "new_tokens": args.new_tokens,
        "median": summary,
        "portable_slower_by": {
            "sft_step": round(summary["portable"]["sft_seconds_per_step"] / summary["native"]["sft_seconds_per_step"]
                              - 1, 3),
            "dpo_step": round(summary["portable"]["dpo_seconds_per_step"] / summary["native"]["dpo_seconds_per_step"]
                              - 1, 3),
            "generation": round(summary["native"]["generation_tokens_per_second"]
                                / summary["portable"]["generation_tokens_per_second"] - 1, 3)},
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("machine", "median", "portable_slower_by")}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    import alignkit  # noqa: F401  (before torch: its CPU numerics act only when they come first)

    main()
