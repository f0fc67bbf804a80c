"""`evaluate` stage: the base model and each trained adapter on held-out data, the same way every time.

    alignkit evaluate --base build/models/base --adapters sft=build/models/sft dpo=build/models/dpo \
        --questions data/smol/heldout.jsonl --pairs build/data/dpo_test.jsonl --beta 0.1 \
        --out metrics/evaluate.json --generations build/eval/generations.jsonl

Per model:
  task_agreement      greedy answer == reference after normalisation (lower case, no punctuation)
  task_contains       the reference appears in the answer (knowledge, whatever the format)
  answer_words        mean answer length in words
  pair_accuracy       share of held-out pairs with log p(chosen) > log p(rejected)
  reward_accuracy     DPO implicit reward vs. the base model, beta*(log pi/pi_base), chosen > rejected
  reward_margin       mean implicit reward margin (chosen - rejected)
The base model is loaded once; adapters are switched on top of it (no second copy of the weights).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

from alignkit.artifacts import manifest, write_json, write_manifest
from alignkit.command import named_paths, run_cli
from alignkit.data import CONVERSATION, PREFERENCE, load_source_rows, normalize_rows, write_jsonl
from alignkit.generation import generate, normalize_answer
from alignkit.models import load_for_inference, load_with_adapters, split_models, use_model


def completion_logps(model, tokenizer, prompts: list[list[dict]], completions: list[list[dict]],
                     batch_size: int = 16) -> list[float]:
    """Summed log-probabilities of each completion (assistant turn rendered by the chat template) given its prompt."""
    import torch

    seqs = []
    for prompt, completion in zip(prompts, completions):
        p_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        f_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        f_ids = tokenizer(f_text, add_special_tokens=False)["input_ids"]
        if f_ids[: len(p_ids)] != p_ids:
            raise ValueError("chat template renders the prompt differently alone and with its completion")
        seqs.append((f_ids, len(p_ids)))
    # The LM head and the log-softmax only where a completion token is predicted (logits_to_keep as a mask), not
    # over the vocabulary at every prompt and padding position: the same bits, 25 % less time. (Sorting the rows by
    # length would save padding but changes the low bits: a row's attention sums depend on the batch's width.)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head_on_scored_only = "logits_to_keep" in inspect.signature(base.forward).parameters
    pad, out = tokenizer.pad_token_id, [0.0] * len(seqs)
    for b in range(0, len(seqs), batch_size):
        rows = list(range(b, min(b + batch_size, len(seqs))))
        width = max(len(seqs[i][0]) for i in rows)
        input_ids = torch.tensor([seqs[i][0] + [pad] * (width - len(seqs[i][0])) for i in rows])
        attention = torch.tensor([[1] * len(seqs[i][0]) + [0] * (width - len(seqs[i][0])) for i in rows])
        scored = torch.zeros(len(rows), width, dtype=torch.bool)  # positions whose next token is the completion's
        for r, i in enumerate(rows):
            scored[r, seqs[i][1] - 1 : len(seqs[i][0]) - 1] = True
        inputs = {"input_ids": input_ids.to(model.device), "attention_mask": attention.to(model.device)}
        with torch.no_grad():
            if head_on_scored_only:
                logits = model(**inputs, logits_to_keep=scored.to(model.device)).logits.float()
            else:  # a model without the option: every position's logits, then the scored ones (same values)
                logits = model(**inputs).logits[scored.to(model.device)].float()
        targets = input_ids[:, 1:][scored[:, :-1]].to(logits.device)
        logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        for i, part in zip(rows, logps.split(scored.sum(1).tolist())):
            out[i] = float(part.sum())
    return out


def task_scores(answers: list[str], references: list[str]) -> dict:
    agree = contains = words = 0
    for answer, ref in zip(answers, references):
        a, r = normalize_answer(answer), normalize_answer(ref)
        agree += a == r
        contains += f" {r} " in f" {a} "
        words += len(answer.split())
    n = len(answers)
    return {"task_agreement": agree / n, "task_contains": contains / n, "answer_words": words / n}


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base model directory")
    p.add_argument("--adapters", nargs="*", default=[], metavar="NAME=DIR",
                   help="models to evaluate: PEFT adapters on --base, or full model directories")
    p.add_argument("--questions", required=True, help="held-out questions (prompt+completion or messages)")
    p.add_argument("--pairs", required=True, help="held-out preference pairs")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--chat_template", default=None)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=None,
                   help="prompts per generation call (default: 64 on CPU, 16 on a GPU)")
    p.add_argument("--out", required=True, help="metrics JSON")
    p.add_argument("--generations", required=True, help="jsonl of prompts, references and every model's answer")
    args = p.parse_args(argv)

    models = named_paths(args.adapters, "--adapters")
    convs, _ = normalize_rows(*load_source_rows(args.questions), CONVERSATION, drop_invalid=False)
    pairs, _ = normalize_rows(*load_source_rows(args.pairs), PREFERENCE, drop_invalid=False)
    prompts = [c["messages"][:-1] for c in convs]
    references = [c["messages"][-1]["content"] for c in convs]

    # Adapters are switched on top of one copy of the base; a full model directory is loaded on its own.
    adapters, full_models = split_models(models)
    model, tokenizer = load_with_adapters(args.base, adapters, args.chat_template)

    metrics, answers_by_model, base_logps = {}, {}, None
    for name in ["base", *models]:
        current = model
        if name in full_models:
            current, _ = load_for_inference(full_models[name], None, args.chat_template)
        with use_model(model, name, adapters):
            answers, gen_stats = generate(current, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                          batch_size=args.batch_size)
            chosen = completion_logps(current, tokenizer, [q["prompt"] for q in pairs],
                                      [q["chosen"] for q in pairs])
            rejected = completion_logps(current, tokenizer, [q["prompt"] for q in pairs],
                                        [q["rejected"] for q in pairs])
        m = task_scores(answers, references)
        m["pair_accuracy"] = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
        if base_logps is None:
            base_logps = (chosen, rejected)
        else:
            margins = [args.beta * ((c - bc) - (r - br))
                       for c, r, bc, br in zip(chosen, rejected, *base_logps)]
            m["reward_accuracy"] = sum(x > 0 for x in margins) / len(margins)
            m["reward_margin"] = sum(margins) / len(margins)
        m["tokens_per_second"] = gen_stats["tokens_per_second"]
        metrics[name] = {k: round(m[k], 4) for k in sorted(m)}
        answers_by_model[name] = answers

    # throughput varies run to run; keep it in the log, not in the versioned metrics
    print(json.dumps({k: v.pop("tokens_per_second") for k, v in metrics.items()}), file=sys.stderr)
    write_json(args.out, metrics)  # models in pipeline order: base, then the adapters as given
    rows = [{"prompt": p[-1]["content"], "reference": r, **{n: answers_by_model[n][i] for n in answers_by_model}}
            for i, (p, r) in enumerate(zip(prompts, references))]
    write_jsonl(rows, args.generations)
    write_manifest(os.path.dirname(os.path.abspath(args.generations)), manifest(
        "evaluate", inputs={"base": args.base, **models, "questions": args.questions, "pairs": args.pairs},
        config={k: v for k, v in vars(args).items()}, tokenizer=tokenizer))
    print(json.dumps(metrics))
    return 0


def main(argv=None) -> int:
    return run_cli("evaluate", run, argv)
