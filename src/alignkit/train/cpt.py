"""CPT stage: continued pretraining (causal LM) on raw text, packed into fixed-length blocks.

    alignkit cpt --config recipes/gpt2-nl/cpt.yaml [--key value ...]

Data: a `text` column (local files or a hub dataset). Each document is tokenised, followed by EOS, the
documents are concatenated and cut into `max_length` blocks; only the final remainder (< one block) is
dropped. The packed blocks are cached under `cache_dir`, keyed by tokenizer, text and block size, so a rerun
(or a β sweep downstream) does not tokenise again. Full or LoRA. Metrics: held-out perplexity before and
after training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os

from alignkit.artifacts import atomic_output
from alignkit.command import run_cli
from alignkit.data import TEXT, load_splits
from alignkit.models import load_model, load_tokenizer
from alignkit.train.checkpoints import checkpoints
from alignkit.train.stage import StageSpec, finish, import_object, make_trainer, prepared, train_and_evaluate

logger = logging.getLogger(__name__)


def check(recipe, fail) -> None:
    if not recipe.train.max_length:
        fail("max_length (the block size of packed text) must be set for CPT")


# TRL's SFTTrainer, scoring as the SFT stage does (scoring.py: on the CPU, log-probs whose bits do not depend on the
# CPU's vendor)
SPEC = StageSpec(name="cpt", config="trl:SFTConfig", trainer="alignkit.train.scoring:CompletionScoringSFTTrainer",
                 data_kind=TEXT, check=check,
                 defaults={"packing": False, "assistant_only_loss": False})


def pack_documents(token_lists: list[list[int]], eos_id: int, block_size: int) -> tuple[list[list[int]], dict]:
    """Concatenate documents with EOS after each and cut into `block_size` blocks (the last partial one dropped)."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    n_blocks = len(stream) // block_size
    blocks = [stream[i * block_size:(i + 1) * block_size] for i in range(n_blocks)]
    return blocks, {"documents": len(token_lists), "tokens": len(stream),
                    "tokens_dropped": len(stream) - n_blocks * block_size, "blocks": n_blocks}


def packed_dataset(rows, tokenizer, block_size: int, cache_dir: str, split: str):
    """Tokenise + pack once; later runs with the same tokenizer, text and block size load it from the cache."""
    import datasets

    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(f"{tokenizer.eos_token_id}:{block_size}".encode())
    for row in rows:
        h.update(row["text"].encode())
        h.update(b"\0")
    path = os.path.join(cache_dir, "cpt", f"{split}-{h.hexdigest()[:24]}")
    if os.path.isdir(path):
        logger.info("packed %s blocks from cache %s", split, path)
        with open(os.path.join(path, "packing.json")) as f:
            return datasets.load_from_disk(os.path.join(path, "data")), json.load(f)
    ids = tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]
    blocks, stats = pack_documents(ids, tokenizer.eos_token_id, block_size)
    if not blocks:
        raise ValueError(f"{split}: {stats['tokens']} tokens make no block of max_length {block_size}")
    ds = datasets.Dataset.from_dict({"input_ids": blocks})
    with atomic_output(path) as tmp:
        ds.save_to_disk(os.path.join(tmp, "data"))
        with open(os.path.join(tmp, "packing.json"), "w") as f:
            json.dump(stats, f)
    return datasets.load_from_disk(os.path.join(path, "data")), stats


def train(argv: list[str]) -> dict:
    # 1. Recipe.
    recipe = SPEC.parse(argv)
    block = recipe.train.max_length

    # 2. Data: raw text → EOS-separated token stream → fixed blocks (cached).
    train_rows, eval_rows, data_report = load_splits(recipe.data, TEXT, seed=recipe.train.seed)
    tokenizer = load_tokenizer(recipe, require_chat_template=False)
    train_ds, train_pack = packed_dataset(train_rows, tokenizer, block, recipe.alignkit.cache_dir, "train")
    eval_ds, eval_pack = packed_dataset(eval_rows, tokenizer, block, recipe.alignkit.cache_dir, "eval")
    if recipe.alignkit.prepare_only:
        return prepared("cpt", data_report, train_blocks=train_pack["blocks"], eval_blocks=eval_pack["blocks"])

    # 3-4. Model and trainer (pre-tokenised blocks: the trainer neither re-tokenises nor pads).
    model = load_model(recipe, tokenizer)
    trainer = make_trainer(import_object(SPEC.trainer), recipe, model, tokenizer, train_ds, eval_ds,
                           tracked_as=SPEC.name)

    # 5. Held-out perplexity before, train, perplexity after.
    loss_before = trainer.evaluate()["eval_loss"]
    metrics, _ = train_and_evaluate(trainer, data_report, resume_from=checkpoints(trainer, recipe))
    metrics.update({
        "eval_perplexity_before": math.exp(loss_before),
        "eval_perplexity": math.exp(metrics["eval_loss"]),
        "eval_loss_before": loss_before,
        "train_blocks": train_pack["blocks"], "train_tokens": train_pack["tokens"],
        "train_tokens_dropped": train_pack["tokens_dropped"], "eval_blocks": eval_pack["blocks"],
    })

    # 6. Save.
    return finish("cpt", recipe, trainer, tokenizer, metrics)


def main(argv=None) -> int:
    return run_cli("cpt", lambda a: (train(a), 0)[1], argv)
