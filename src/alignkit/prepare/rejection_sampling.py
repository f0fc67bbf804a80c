"""Rejection-sampling stage: N completions per prompt from a policy, scored by a reward model; writes a
best-of-N SFT set and best-vs-worst DPO pairs, keeping every score.

    alignkit rejection_sampling --policy build/models/base --reward_model build/models/reward \
        --prompts data/smol/dpo_prompts.jsonl --n 4 --temperature 0.8 --top_p 0.95 --out build/rs

Work is done in shards of `--shard_size` prompts, each written atomically to `<out>/shards/`; a rerun after a
crash skips finished shards. Each shard is sampled with its own seed (`seed + shard index`), so a resumed run
produces exactly what an uninterrupted one would. Outputs:
  <out>/samples.jsonl   every prompt with all N completions and their scores
  <out>/sft.jsonl       best-of-N conversations (prompt + argmax completion)
  <out>/dpo.jsonl       prompt, chosen = argmax, rejected = argmin, with both scores
  <out>/stats.json      counts, mean best/worst/all scores (reproducible: no timings)
  --metrics FILE        the same plus generation throughput (tokens/s) of this run (outside the DVC output,
                        so a rerun's timing does not invalidate the stages that train on the samples)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Callable

from alignkit.artifacts import manifest, write_json, write_manifest
from alignkit.command import run_cli
from alignkit.data import (
    CONVERSATION,
    PREFERENCE,
    detect_format,
    load_source_rows,
    normalize_rows,
    read_jsonl,
    write_jsonl,
)
from alignkit.errors import DataError
from alignkit.generation import generate, row_seed
from alignkit.models import inference_placement, load_for_inference, load_pretrained, tokenizer_from

logger = logging.getLogger(__name__)

Scorer = Callable[[list[list[dict]], list[str]], list[float]]


class RewardModelScorer:
    """Scores (conversation, completion) with a sequence-classification reward model (full or LoRA adapter)."""

    def __init__(self, path: str, chat_template: str | None = None, batch_size: int = 16, on_gpu: bool | None = None):
        from transformers import AutoModelForSequenceClassification

        # on the GPU when there is one (bf16), as the policy that samples: scoring N completions per prompt on the
        # CPU beside a GPU would take longer than sampling them
        placement = inference_placement(on_gpu)
        base, adapter = path, None
        if os.path.isfile(os.path.join(path, "adapter_config.json")):  # a LoRA reward model: its base, then it
            with open(os.path.join(path, "adapter_config.json")) as f:
                base, adapter = json.load(f)["base_model_name_or_path"], path
        model = load_pretrained(base, auto_class=AutoModelForSequenceClassification, adapter=adapter, num_labels=1,
                                **placement)
        self.tokenizer = tokenizer_from(path, chat_template)
        self.tokenizer.padding_side = "right"
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model, self.batch_size = model.eval(), batch_size

    def __call__(self, prompts: list[list[dict]], completions: list[str]) -> list[float]:
        import torch

        texts = [self.tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
                 for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for b in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[b:b + self.batch_size], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.model.device)
            with torch.no_grad():
                scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        return scores


def select(prompt: list[dict], completions: list[str], scores: list[float]) -> tuple[dict, dict | None]:
    """Best-of-N SFT row and the best-vs-worst pair (None when every completion scored the same or is identical)."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties → earliest sample
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    sft_row = {"messages": prompt + [{"role": "assistant", "content": completions[best]}], "score": scores[best]}
    if scores[best] == scores[worst] or completions[best].strip() == completions[worst].strip():
        return sft_row, None
    pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": completions[best]}],
            "rejected": [{"role": "assistant", "content": completions[worst]}],
            "chosen_score": scores[best], "rejected_score": scores[worst]}
    return sft_row, pair


def run_shards(prompts: list[list[dict]], *, n: int, shard_size: int, out_dir: str,
               sample: Callable[[list[list[dict]], int], tuple[list[str], dict]], score: Scorer) -> dict:
    """Sample and score shard by shard; finished shards (on disk) are skipped. Returns generation stats of this run."""
    from tqdm.auto import tqdm

    shard_dir = os.path.join(out_dir, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    n_shards = (len(prompts) + shard_size - 1) // shard_size
    done = ran = tokens = 0
    seconds = 0.0
    for k in tqdm(range(n_shards), desc="rejection sampling (shards)"):
        path = os.path.join(shard_dir, f"shard-{k:05d}.jsonl")
        if os.path.exists(path):
            done += 1
            continue
        shard = prompts[k * shard_size:(k + 1) * shard_size]
        expanded = [p for p in shard for _ in range(n)]
        completions, stats = sample(expanded, k)
        scores = score(expanded, completions)
        write_jsonl([{"prompt": prompt, "completions": completions[i * n:(i + 1) * n],
                      "scores": scores[i * n:(i + 1) * n]} for i, prompt in enumerate(shard)],
                    path)  # atomically: a shard is either complete on disk or absent
        ran += 1
        tokens += stats["generated_tokens"]
        seconds += stats["generation_seconds"]
    logger.info("shards: %d total, %d already done, %d sampled now", n_shards, done, ran)
    return {"shards": n_shards, "shards_resumed": done, "shards_sampled": ran, "generated_tokens": tokens,
            "tokens_per_second": round(tokens / seconds, 1) if seconds else None}


def collect(out_dir: str, n_shards: int) -> dict:
    """Merge shards into samples.jsonl, sft.jsonl and dpo.jsonl; return counts and score summaries."""
    samples, sft_rows, pairs = [], [], []
    for k in range(n_shards):
        samples.extend(read_jsonl(os.path.join(out_dir, "shards", f"shard-{k:05d}.jsonl")))
    for s in samples:
        sft_row, pair = select(s["prompt"], s["completions"], s["scores"])
        sft_rows.append(sft_row)
        if pair is not None:
            pairs.append(pair)
    for name, rows in (("samples", samples), ("sft", sft_rows), ("dpo", pairs)):
        write_jsonl(rows, os.path.join(out_dir, f"{name}.jsonl"))
    mean = lambda xs: round(sum(xs) / len(xs), 6) if xs else None  # noqa: E731
    return {"prompts": len(samples), "sft_rows": len(sft_rows), "dpo_pairs": len(pairs),
            "pairs_dropped_all_equal": len(samples) - len(pairs),
            "mean_best_score": mean([max(s["scores"]) for s in samples]),
            "mean_worst_score": mean([min(s["scores"]) for s in samples]),
            "mean_score": mean([x for s in samples for x in s["scores"]])}


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit rejection_sampling", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="policy model directory (or hub id)")
    p.add_argument("--policy_adapter", default=None, help="optional PEFT adapter on top of --policy")
    p.add_argument("--reward_model", required=True, help="reward model directory (full or LoRA adapter)")
    p.add_argument("--prompts", required=True, help="prompts: any conversation or preference file (prompt turns used)")
    p.add_argument("--out", required=True)
    p.add_argument("--chat_template", default=None)
    p.add_argument("--n", type=int, default=4, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--shard_size", type=int, default=16, help="prompts per shard (the unit of resumption)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", default=None, help="also write stats with throughput here (e.g. metrics/...)")
    args = p.parse_args(argv)
    if args.n < 2:
        p.error("--n must be at least 2 to form best-vs-worst pairs")
    if args.temperature <= 0:
        p.error("--temperature must be > 0: greedy decoding gives N identical completions")

    prompts = prompt_turns(*load_source_rows(args.prompts))
    policy, tokenizer = load_for_inference(args.policy, args.policy_adapter, args.chat_template)
    scorer = RewardModelScorer(args.reward_model, args.chat_template, args.batch_size)

    def sample(expanded, shard_index):
        # completion j of prompt i draws from a stream seeded by (seed, i, j): the samples do not depend on the
        # shard size or the batch size, which only say how the work is cut
        first = shard_index * args.shard_size
        seeds = [row_seed(args.seed, first + r // args.n, r % args.n) for r in range(len(expanded))]
        return generate(policy, tokenizer, expanded, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        temperature=args.temperature, top_p=args.top_p, seed=seeds)

    gen_stats = run_shards(prompts, n=args.n, shard_size=args.shard_size, out_dir=args.out, sample=sample,
                           score=scorer)
    stats = {**collect(args.out, gen_stats["shards"]), "shards": gen_stats["shards"], "n": args.n,
             "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    write_json(os.path.join(args.out, "stats.json"), stats, sort_keys=True)
    write_manifest(args.out, manifest("rejection_sampling", inputs={
        "policy": args.policy, "reward_model": args.reward_model, "prompts": args.prompts},
        config={k: v for k, v in vars(args).items() if k != "metrics"}, seed=args.seed))
    # The metrics are what a rerun reproduces (DVC hashes them); this run's tokens, speed and resumed shards
    # depend on the machine and on what was killed before, so they go to the log only.
    metrics = stats
    if args.metrics:
        write_json(args.metrics, metrics, sort_keys=True)
    print(json.dumps({**metrics, **gen_stats}))
    return 0


def prompt_turns(label: str, rows: list) -> list[list[dict]]:
    """The prompt turns of each row: prompt-only rows, conversations (answer dropped) or preference pairs."""
    if rows and isinstance(rows[0], dict) and set(rows[0]) & {"prompt", "messages", "chosen"} == {"prompt"} \
            and "completion" not in rows[0]:
        rows = [{**r, "completion": "-"} for r in rows]  # prompt-only: a placeholder answer, dropped below
    try:
        kind = PREFERENCE if detect_format(rows[0]).endswith(("rejected", "rlhf", "conversations")) else CONVERSATION
    except (DataError, IndexError, AttributeError, TypeError):
        kind = CONVERSATION  # normalize_rows reports the bad row properly
    norm, _ = normalize_rows(label, rows, kind, drop_invalid=False)
    return [r["prompt"] for r in norm] if kind == PREFERENCE else [r["messages"][:-1] for r in norm]


def main(argv=None) -> int:
    return run_cli("rejection_sampling", run, argv)
