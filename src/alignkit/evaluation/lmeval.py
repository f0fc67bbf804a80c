"""`lmeval` stage: lm-evaluation-harness benchmarks on the base model and each trained model, at a fixed path.

    alignkit lmeval --base build/models/base --models sft=build/models/sft dpo=build/models/dpo \
        --tasks eval/lm_eval/smol --apply_chat_template --out metrics/lmeval.json --samples build/lmeval

`--tasks` is one of
  leaderboard-v1      the Open LLM Leaderboard v1 set (GPU recipes): ARC-challenge 25-shot acc_norm, HellaSwag
                      10-shot acc_norm, MMLU 5-shot acc, TruthfulQA mc2 0-shot, Winogrande 5-shot acc, GSM8K
                      5-shot exact match (strict) — datasets from the hub (or its cache)
  a directory         local task YAMLs written by this project (eval/lm_eval/smol for the CPU twins); their
                      `data_files` are repository-relative, so the stock `lm_eval --include_path eval/lm_eval/smol`
                      works from the repository root; here they resolve from the YAML's folder upwards, from anywhere
  names               lm-eval task names, each optionally `:N` for N-shot: `arc_easy:0,gsm8k:5`
A model is a PEFT adapter on `--base` (lm-eval's `peft=`) or, when its directory holds full weights, a merged
model. lm-eval's Python API is used (its CLI writes to a timestamped folder, which DVC cannot track); the
metrics hold only what is reproducible — scores, stderr, task versions, shots, sample counts — and the
per-sample records go to `--samples/<model>/<task>.jsonl` in document order.
"""

from __future__ import annotations

import argparse
import json
import os

import yaml

from alignkit.artifacts import atomic_output, manifest, write_json, write_manifest
from alignkit.attention import portable_implementation
from alignkit.command import named_paths, run_cli
from alignkit.errors import UsageError
from alignkit.models import inference_dtype, split_models

# (task, shots, the metric the leaderboard reported) — Open LLM Leaderboard v1.
LEADERBOARD_V1 = [
    ("arc_challenge", 25, "acc_norm,none"),
    ("hellaswag", 10, "acc_norm,none"),
    ("mmlu", 5, "acc,none"),
    ("truthfulqa_mc2", 0, "acc,none"),
    ("winogrande", 5, "acc,none"),
    ("gsm8k", 5, "exact_match,strict-match"),
]


def task_plan(spec: str) -> list[tuple[str | dict, int | None, str | None]]:
    """`--tasks` → [(task name or config dict, shots or None = the task's own, headline metric or None = all)]."""
    if spec == "leaderboard-v1":
        return [(name, shots, metric) for name, shots, metric in LEADERBOARD_V1]
    if os.path.isdir(spec):
        return [(config, None, None) for config in local_task_configs(spec)]
    if os.path.splitext(spec)[1] in (".yaml", ".yml") or os.sep in spec:
        raise FileNotFoundError(f"lm-eval task directory not found: {spec}")
    plan = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, shots = item.partition(":")
        plan.append((name, int(shots) if shots else None, None))
    return plan


def data_file(yaml_path: str, split: str, rel: str) -> str:
    """A task's data file: absolute as given, else the first of the YAML's folder and its parents that holds `rel`
    (the stock lm-eval CLI reads it from the current directory: the repository root for the project's tasks)."""
    if os.path.isabs(rel):
        candidates = [rel]
    else:
        folder, candidates = os.path.dirname(os.path.abspath(yaml_path)), []
        while True:
            candidates.append(os.path.normpath(os.path.join(folder, rel)))
            if os.path.dirname(folder) == folder:
                break
            folder = os.path.dirname(folder)
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        raise FileNotFoundError(f"{yaml_path}: data_files.{split}: {rel} does not exist (in "
                                f"{os.path.dirname(os.path.abspath(yaml_path))} or any folder above it)")
    return found


def local_task_configs(directory: str) -> list[dict]:
    """Every task YAML in `directory` as a config dict with `data_files` made absolute (sorted by task name)."""
    configs = []
    for fname in sorted(os.listdir(directory)):
        if not fname.endswith((".yaml", ".yml")):
            continue
        path = os.path.join(directory, fname)
        with open(path) as f:
            config = yaml.safe_load(f)
        if not isinstance(config, dict) or "task" not in config:
            raise UsageError(f"{path}: not an lm-eval task config (no 'task' key)")
        files = config.get("dataset_kwargs", {}).get("data_files", {})
        for split, rel in files.items():
            files[split] = data_file(path, split, rel)
        configs.append(config)
    if not configs:
        raise FileNotFoundError(f"no lm-eval task YAML in {directory}")
    return sorted(configs, key=lambda c: c["task"])


def model_args(base: str, model_dir: str | None, batch_size: int) -> dict:
    """lm-eval `hf` model arguments: base + PEFT adapter, or a merged/full model directory."""
    import torch

    gpu = torch.cuda.is_available()
    # the dtype named, never "auto": a merged checkpoint saved in float32 would load in float32
    args = {"pretrained": base, "dtype": inference_dtype(gpu), "device": "cuda" if gpu else "cpu",
            "batch_size": batch_size, "trust_remote_code": False}
    attention = portable_implementation("sdpa", on_cpu=not gpu)  # the same bits on any CPU (attention.py)
    if attention != "sdpa":
        args["attn_implementation"] = attention
    if model_dir:
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        adapters, _ = split_models({"model": model_dir})
        args["peft" if adapters else "pretrained"] = model_dir
        if os.path.isfile(os.path.join(model_dir, "tokenizer_config.json")):
            args["tokenizer"] = model_dir  # the trained model's chat template, not the base's
    return args


def evaluate_model(args_for_model: dict, plan, *, apply_chat_template: bool, limit, seed: int) -> tuple[dict, dict]:
    """Run every planned task on one model. Returns (results by task, samples by task)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # The project's own task configs need none of lm-eval's bundled task YAMLs, whose index simple_evaluate would
    # parse anew for each model (thousands of files: about a third of the smol lmeval stage on CPU). The metadata
    # is what simple_evaluate attaches by default: the model arguments.
    local = all(isinstance(task, dict) for task, _, _ in plan)
    task_manager = TaskManager(include_defaults=False, metadata=dict(args_for_model)) if local else None
    results, samples, configs = {}, {}, {}
    groups: dict[int | None, list] = {}
    for task, shots, metric in plan:
        groups.setdefault(shots, []).append(task)
    for shots, tasks in groups.items():
        out = lm_eval.simple_evaluate(
            model="hf", model_args=args_for_model, tasks=tasks, task_manager=task_manager, num_fewshot=shots,
            limit=limit,
            apply_chat_template=apply_chat_template, fewshot_as_multiturn=apply_chat_template, log_samples=True,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            bootstrap_iters=1000,
        )
        results.update(out["results"])
        samples.update(out.get("samples", {}))
        for name in out["results"]:
            configs[name] = {"n_shot": out.get("n-shot", {}).get(name), "version": out.get("versions", {}).get(name),
                             "samples": out.get("n-samples", {}).get(name, {}).get("effective")}
    return results, {"samples": samples, "configs": configs}


def select_metrics(results: dict, plan) -> dict:
    """{task: {metric: value}} — the leaderboard's headline metric where planned, else every score and stderr."""
    headline = {t if isinstance(t, str) else t["task"]: m for t, _, m in plan}
    table = {}
    for task in sorted(results):
        values = {k: v for k, v in results[task].items()
                  if k not in ("alias", "sample_len") and isinstance(v, (int, float))}
        metric = headline.get(task)
        if metric:
            values = {k: v for k, v in values.items() if k == metric or k == metric.replace(",", "_stderr,", 1)}
        if values:
            table[task] = {k: round(float(v), 6) for k, v in sorted(values.items())}
    return table


def write_samples(directory: str, name: str, samples: dict) -> None:
    """Per-sample records of one model in document order (what the model answered, what it scored)."""
    os.makedirs(os.path.join(directory, name), exist_ok=True)
    for task, rows in sorted(samples.items()):
        with open(os.path.join(directory, name, f"{task}.jsonl"), "w") as f:
            for r in sorted(rows, key=lambda r: r["doc_id"]):
                keep = {"doc_id": r["doc_id"], "target": r.get("target"), "filtered_resps": r.get("filtered_resps"),
                        **{k: r[k] for k in r if k in ("acc", "acc_norm", "exact_match")}}
                f.write(json.dumps(keep, ensure_ascii=False, default=str) + "\n")


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit lmeval", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the base model directory (or hub name)")
    p.add_argument("--models", nargs="*", default=[], metavar="NAME=DIR", help="adapters on --base or merged models")
    p.add_argument("--tasks", required=True, help="leaderboard-v1 | a local task directory | name[:shots],...")
    p.add_argument("--apply_chat_template", action="store_true", help="prompt through the chat template")
    p.add_argument("--limit", type=float, default=None, help="at most this many documents per task (smoke runs)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="metrics JSON")
    p.add_argument("--samples", required=True, help="directory for per-sample records (DVC output)")
    args = p.parse_args(argv)

    import lm_eval

    plan = task_plan(args.tasks)
    models = {"base": None, **named_paths(args.models, "--models")}
    metrics = {"harness": {"lm_eval": lm_eval.__version__, "tasks": args.tasks,
                           "apply_chat_template": args.apply_chat_template, "limit": args.limit}, "models": {}}
    with atomic_output(args.samples) as tmp:
        for name, model_dir in models.items():
            results, extra = evaluate_model(model_args(args.base, model_dir, args.batch_size), plan,
                                            apply_chat_template=args.apply_chat_template, limit=args.limit,
                                            seed=args.seed)
            metrics["models"][name] = select_metrics(results, plan)
            metrics["harness"].setdefault("tasks_run", {}).update(
                {t: c for t, c in sorted(extra["configs"].items()) if t in metrics["models"][name]})
            write_samples(tmp, name, extra["samples"])
        write_manifest(tmp, manifest("lmeval", inputs={"base": args.base, **{k: v for k, v in models.items() if v},
                                                       **({"tasks": args.tasks} if os.path.isdir(args.tasks) else {})},
                                     config=vars(args), seed=args.seed, judge={"harness": metrics["harness"]}))
    write_json(args.out, metrics, sort_keys=True)
    print(json.dumps(metrics["models"]))
    return 0


def main(argv=None) -> int:
    return run_cli("lmeval", run, argv)
