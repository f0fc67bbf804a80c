"""`pairs` stage: build preference pairs from questions with reference answers (Anima's recipe).

    alignkit pairs --model build/models/base --questions data/smol/dpo_prompts.jsonl \
        --out build/data/dpo_train.jsonl
    alignkit pairs --model build/models/base --questions train.jsonl heldout.jsonl \
        --out train_pairs.jsonl test_pairs.jsonl

chosen = the reference answer, rejected = the model's own greedy answer. A pair whose generated answer
agrees with the reference is not a preference and is dropped (counted in the stats file). Several question files
(each with its own --out, in the same order) are answered by one loaded model, file by file: each output, its stats
and its manifest are what a run on that file alone writes, without a second start-up and model load.
"""

from __future__ import annotations

import argparse
import json
import os

from alignkit.architecture import architecture, check_generation_fits
from alignkit.artifacts import manifest, write_json, write_manifest
from alignkit.command import run_cli
from alignkit.data import CONVERSATION, load_source_rows, normalize_rows, write_jsonl
from alignkit.errors import UsageError
from alignkit.generation import DEFAULT_BATCH, generate, normalize_answer, prompt_ids
from alignkit.models import load_for_inference, tokenizer_from


def build_pairs(conversations: list[dict], answers: list[str]) -> tuple[list[dict], int]:
    pairs, dropped = [], 0
    for conv, answer in zip(conversations, answers):
        prompt, reference = conv["messages"][:-1], conv["messages"][-1]
        if not answer.strip() or normalize_answer(answer) == normalize_answer(reference["content"]):
            dropped += 1
            continue
        pairs.append({"prompt": prompt, "chosen": [reference], "rejected": [{"role": "assistant", "content": answer}]})
    return pairs, dropped


def check_fits_gpu(args, prompts: list[list[dict]]) -> None:
    """On GPUs, refuse before the weights load a batch whose KV cache cannot fit beside them (Anima 33B in bf16
    is 61 GiB: 16 answers of 512 tokens do not fit an 80 GB GPU beside it). Batches are longest-first, so the
    first holds the longest prompt. On a CPU nothing to check (and no tokenizer loaded for it)."""
    import torch

    if not torch.cuda.is_available():
        return
    tokenizer = tokenizer_from(args.adapter or args.model, args.chat_template)
    total = sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    longest = max(len(ids) for ids in prompt_ids(tokenizer, prompts))
    check_generation_fits(args.model, architecture(args.model), batch=args.batch_size or DEFAULT_BATCH["gpu"],
                          tokens=longest + args.max_new_tokens, gpu_gib=total / 2**30)


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit pairs", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory whose own answers become the rejected side")
    p.add_argument("--adapter", default=None, help="optional PEFT adapter on top of --model")
    p.add_argument("--questions", required=True, nargs="+",
                   help="jsonl/json/parquet with prompt+completion or messages rows (one or more files)")
    p.add_argument("--out", required=True, nargs="+",
                   help="output .jsonl of prompt/chosen/rejected rows, one per --questions file, in its order")
    p.add_argument("--chat_template", default=None)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--batch_size", type=int, default=None,
                   help="prompts per generation call (default: 64 on CPU, 16 on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if len(args.questions) != len(args.out):
        raise UsageError(f"--questions names {len(args.questions)} files and --out {len(args.out)}: give one output "
                         "per questions file, in the same order")

    conversations = {}
    for questions in args.questions:  # every file read and checked before any weights load
        label, raw = load_source_rows(questions)
        conversations[questions], _ = normalize_rows(label, raw, CONVERSATION, drop_invalid=False)
    check_fits_gpu(args, [c["messages"][:-1] for convs in conversations.values() for c in convs])
    model, tokenizer = load_for_inference(args.model, args.adapter, args.chat_template)
    for questions, out in zip(args.questions, args.out):
        counts, speed = write_pairs(model, tokenizer, conversations[questions], out,
                                    {**vars(args), "questions": questions, "out": out})
        print(json.dumps({**counts, "tokens_per_second": speed}))
    return 0


def write_pairs(model, tokenizer, conversations: list[dict], out: str, config: dict) -> tuple[dict, float]:
    """One questions file's pairs, stats and manifest (`config`: the arguments as a run on this file alone)."""
    answers, stats = generate(model, tokenizer, [c["messages"][:-1] for c in conversations],
                              max_new_tokens=config["max_new_tokens"], batch_size=config["batch_size"],
                              seed=config["seed"])
    pairs, dropped = build_pairs(conversations, answers)
    write_jsonl(pairs, out)  # atomic: never a half-written pair file
    counts = {"questions": len(conversations), "pairs": len(pairs), "dropped_agreeing": dropped,
              "generated_tokens": stats["generated_tokens"]}
    # Only reproducible numbers go next to the data (a DVC output): timings would change its hash every run.
    write_json(os.path.splitext(out)[0] + ".stats.json", counts, sort_keys=True)
    # the output is a file: its manifest is a sibling, <out>.manifest.json
    write_manifest(os.path.splitext(out)[0] + ".manifest.json", manifest(
        "pairs", inputs={"model": config["model"], "adapter": config["adapter"], "questions": config["questions"]},
        config=config, seed=config["seed"], tokenizer=tokenizer))
    return counts, stats["tokens_per_second"]


def main(argv=None) -> int:
    return run_cli("pairs", run, argv)
