"""`alpacaeval` stage: each model's answers to an instruction set, judged by AlpacaEval against a reference.

    alignkit alpacaeval --base build/models/base --models sft=build/models/sft dpo=build/models/dpo \
        --instructions data/alpacaeval-smol/instructions.jsonl --reference sft \
        --out_dir build/alpacaeval --metrics metrics/alpacaeval.json

Instructions: `tatsu-lab/alpaca_eval` (the 805 AlpacaEval instructions from the hub, judged against AlpacaEval's
own reference outputs) or a local jsonl with an `instruction` field (judged against one of the evaluated models,
`--reference NAME`). Answers are generated greedily with each model's chat template and written in AlpacaEval's
format (`<out_dir>/outputs/<model>.json`), so they can be annotated again elsewhere.

Annotator: `--annotator` names one of AlpacaEval's evaluator configs (`weighted_alpaca_eval_gpt4_turbo`, the
AlpacaEval 2.0 default; `alpaca_eval_gpt4`; `chatgpt`; ...) and `--annotator_url` any OpenAI-compatible endpoint
(OpenAI, or a local vLLM server: `vllm serve MODEL` → http://HOST:8000/v1), the key read from the environment
variable `--annotator_key_env`. With no annotator configured the answers are still written and the stage ends
successfully with `skipped` and the reason in its metrics. The length-controlled win rate is reported when
AlpacaEval can fit it (it needs enough annotated pairs); the plain win rate always.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile

import yaml

from alignkit.artifacts import manifest, write_json, write_manifest
from alignkit.command import named_paths, run_cli
from alignkit.errors import UsageError, nearest
from alignkit.generation import Generator

logger = logging.getLogger(__name__)
HUB_SET = "tatsu-lab/alpaca_eval"


def load_instructions(source: str) -> list[dict]:
    """[{instruction, dataset}] in file order."""
    if os.path.isfile(source):
        rows = []
        with open(source) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
                    raise UsageError(f"{source}: row {i}: field 'instruction': missing or empty")
                rows.append({"instruction": row["instruction"],
                             "dataset": row.get("dataset", os.path.basename(source))})
        return rows
    if source == HUB_SET:
        import datasets

        ds = datasets.load_dataset(HUB_SET, "alpaca_eval", split="eval")
        return [{"instruction": r["instruction"], "dataset": r["dataset"]} for r in ds]
    raise FileNotFoundError(f"instruction set not found: {source} (a local jsonl, or {HUB_SET})")


def generate_outputs(base: str, models: dict[str, str], instructions: list[dict], *, chat_template, max_new_tokens,
                     batch_size, seed, backend) -> dict[str, list[dict]]:
    """AlpacaEval-format outputs of the base model and every adapter (greedy, deterministic)."""
    generator = Generator(base, models, chat_template, backend=backend)
    prompts = [[{"role": "user", "content": r["instruction"]}] for r in instructions]
    outputs = {}
    for name in ["base", *models]:
        texts, _ = generator(name, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                             desc=f"alpacaeval answers ({name})")
        outputs[name] = [{"instruction": r["instruction"], "output": t, "generator": name, "dataset": r["dataset"]}
                         for r, t in zip(instructions, texts)]
    return outputs


def annotator_config(annotator: str, model_name: str | None, client_config_path: str, directory: str) -> str:
    """A copy of AlpacaEval's evaluator config `annotator`, pointed at our endpoint; returns its path."""
    from alpaca_eval import constants  # optional: only when annotating

    source = os.path.join(constants.EVALUATORS_CONFIG_DIR, annotator, "configs.yaml")
    if not os.path.isfile(source):
        known = sorted(d for d in os.listdir(constants.EVALUATORS_CONFIG_DIR)
                       if os.path.isfile(os.path.join(constants.EVALUATORS_CONFIG_DIR, d, "configs.yaml")))
        raise UsageError(f"unknown AlpacaEval annotator '{annotator}'; nearest: {nearest(annotator, known)}")
    with open(source) as f:
        config = yaml.safe_load(f)
    (name, spec), = config.items()
    if spec.get("fn_completions") != "openai_completions":
        raise UsageError(f"annotator '{annotator}' uses {spec.get('fn_completions')}, not an OpenAI-compatible "
                         "endpoint; pick one whose fn_completions is openai_completions")
    spec["prompt_template"] = os.path.join(constants.EVALUATORS_CONFIG_DIR, spec["prompt_template"])
    spec["completions_kwargs"]["client_config_path"] = client_config_path
    if model_name:
        spec["completions_kwargs"]["model_name"] = model_name
    os.makedirs(os.path.join(directory, name), exist_ok=True)
    path = os.path.join(directory, name, "configs.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({name: spec}, f)
    return path


def annotate(model_outputs: list[dict], reference_outputs: list[dict], *, name: str, annotator: str,
             annotator_model: str | None, url: str, key_env: str, cache_dir: str) -> dict:
    """AlpacaEval's win rate (and length-controlled win rate when it can be fitted) of `name` over the reference."""
    from alpaca_eval import main as alpaca_main

    with tempfile.TemporaryDirectory(prefix="alignkit-alpacaeval-") as tmp:
        # The key lives only in this private temporary file (0600), never in outputs or logs.
        client_path = os.path.join(tmp, "client.yaml")
        fd = os.open(client_path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump({"default": [{"api_key": os.environ.get(key_env) or "none", "base_url": url}]}, f)
        config_path = annotator_config(annotator, annotator_model, client_path, tmp)
        os.makedirs(cache_dir, exist_ok=True)
        kwargs = dict(model_outputs=model_outputs, reference_outputs=reference_outputs,
                      annotators_config=config_path, name=name, output_path=None, precomputed_leaderboard=None,
                      is_return_instead_of_print=True, caching_path=os.path.join(cache_dir, f"annotations_{name}.json"))
        try:
            leaderboard, _ = alpaca_main.evaluate(fn_metric="get_length_controlled_winrate", **kwargs)
        except Exception as e:  # too few pairs (or no length variation) for AlpacaEval's length-control GLM
            logger.warning("length-controlled win rate unavailable (%s); reporting the plain win rate", e)
            leaderboard, _ = alpaca_main.evaluate(fn_metric="get_winrate", sort_by="win_rate", **kwargs)
    row = leaderboard.loc[name].to_dict()
    return {key: _maybe(row.get(key)) for key in
            ("win_rate", "standard_error", "length_controlled_winrate", "n_wins", "n_draws", "n_total", "avg_length")}


def _maybe(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit alpacaeval", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--models", nargs="*", default=[], metavar="NAME=DIR", help="PEFT adapters on --base")
    p.add_argument("--instructions", default=HUB_SET, help=f"{HUB_SET} or a local jsonl with 'instruction'")
    p.add_argument("--reference", default=None,
                   help="model whose answers are the reference (default: AlpacaEval's own for the hub set)")
    p.add_argument("--annotator", default=os.environ.get("ALIGNKIT_ALPACAEVAL_ANNOTATOR"),
                   help="an AlpacaEval evaluator config, e.g. weighted_alpaca_eval_gpt4_turbo; unset = skip judging")
    p.add_argument("--annotator_url", default=os.environ.get("ALIGNKIT_JUDGE_URL", "https://api.openai.com/v1"))
    p.add_argument("--annotator_model", default=None, help="override the config's judge model (e.g. a vLLM model)")
    p.add_argument("--annotator_key_env", default="OPENAI_API_KEY")
    p.add_argument("--chat_template", default=None)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=None,
                   help="prompts per generation call (default: 64 on CPU, 16 on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto")
    p.add_argument("--out_dir", required=True, help="answers and annotations (DVC output)")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)

    models = named_paths(args.models, "--models")
    names = ["base", *models]
    if args.reference is None and args.instructions != HUB_SET:
        raise UsageError("a local instruction set needs --reference NAME (one of: " + ", ".join(names) + ")")
    if args.reference is not None and args.reference not in names:
        raise UsageError(f"--reference {args.reference} is not an evaluated model (one of: {', '.join(names)})")
    skip_reason = None
    if not args.annotator:
        skip_reason = "no annotator configured (--annotator or ALIGNKIT_ALPACAEVAL_ANNOTATOR)"
    elif "api.openai.com" in args.annotator_url and not os.environ.get(args.annotator_key_env):
        skip_reason = (f"annotator endpoint {args.annotator_url} needs a key in ${args.annotator_key_env}, which is "
                       "unset")

    instructions = load_instructions(args.instructions)
    outputs = generate_outputs(args.base, models, instructions, chat_template=args.chat_template,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                               backend=args.backend)
    for name, rows in outputs.items():
        write_json(os.path.join(args.out_dir, "outputs", f"{name}.json"), rows, indent=1, ensure_ascii=False)

    metrics = {"instructions": args.instructions, "n_instructions": len(instructions),
               "reference": args.reference or "alpaca_eval default",
               "annotator": None if skip_reason else {"config": args.annotator, "model": args.annotator_model,
                                                       "base_url": args.annotator_url},
               "avg_output_words": {n: round(sum(len(r["output"].split()) for r in rows) / max(len(rows), 1), 2)
                                    for n, rows in outputs.items()}}
    if skip_reason:
        print(f"alignkit alpacaeval: judging skipped: {skip_reason}. Answers written to {args.out_dir}/outputs.",
              file=sys.stderr)
        metrics["skipped"] = skip_reason
    else:
        from alpaca_eval import constants

        reference = outputs[args.reference] if args.reference else constants.ALPACAEVAL_REFERENCE_OUTPUTS()
        metrics["models"] = {
            name: annotate(rows, reference, name=name, annotator=args.annotator, annotator_model=args.annotator_model,
                           url=args.annotator_url, key_env=args.annotator_key_env,
                           cache_dir=os.path.join(args.out_dir, "annotations"))
            for name, rows in outputs.items() if name != args.reference}
    write_manifest(args.out_dir, manifest("alpacaeval", inputs={"base": args.base, **models,
                                                                "instructions": args.instructions},
                                          config=vars(args), seed=args.seed, judge=metrics["annotator"]))
    write_json(args.metrics, metrics, sort_keys=True)
    print(json.dumps(metrics))
    return 0


def main(argv=None) -> int:
    return run_cli("alpacaeval", run, argv)
