"""What the trainer's batches hold, measured from the trainer itself: rows dropped or cut by truncation, the
share of padding, and the lengths a length-grouped sampler needs."""

from __future__ import annotations

import logging

logger = logging.getLogger("alignkit")


def with_length_column(dataset):
    """`length` per row for the Trainer's length-grouped sampler, from the trainer's tokenised columns where there is
    no `input_ids` to measure (DPO: prompt + the longer of chosen and rejected — both are padded to the longest)."""
    if dataset is None or "input_ids" in dataset.column_names or "length" in dataset.column_names:
        return dataset
    prompt = [c for c in dataset.column_names if c.startswith("prompt") and c.endswith("_ids")]
    replies = [c for c in dataset.column_names if c.endswith("_ids") and c not in prompt]
    if not replies:
        return dataset

    def length(row):
        return {"length": sum(len(row[c]) for c in prompt) + max(len(row[c]) for c in replies)}

    return dataset.map(length, desc="Measuring lengths for length-grouped batches")


def truncation_metrics(trainer, given: dict[str, int]) -> dict:
    """Per split: rows the trainer dropped (TRL drops a preference row whose prompt alone fills max_length, silently)
    and, where its columns show it, rows cut to max_length (prompt + the longer reply over it)."""
    max_length = getattr(trainer.args, "max_length", None)
    metrics = {}
    for split, ds in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        if ds is None:
            continue
        dropped = given[split] - len(ds)
        metrics[f"{split}_rows_dropped_by_truncation"] = dropped
        if dropped:
            logger.warning("%s: %d of %d %s rows dropped: their prompt alone fills max_length %s", trainer.args.run_name
                           or "stage", dropped, given[split], split, max_length)
        replies = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in ds.column_names]
        if max_length and "prompt_ids" in ds.column_names and replies:
            prompt = [len(p) for p in ds["prompt_ids"]]
            longest = [max(len(r) for r in rs) for rs in zip(*(ds[c] for c in replies))]
            metrics[f"{split}_rows_truncated"] = sum(p + r > max_length for p, r in zip(prompt, longest))
    return metrics


def padding_fraction(trainer, max_batches: int = 1000) -> float:
    """Share of padding positions in the training batches as the trainer's sampler and collator make them (one
    pass, up to `max_batches`, with the torch RNG forked so training is not disturbed): what length grouping
    (`train_sampling_strategy: group_by_length`) cuts."""
    import torch

    real = total = 0
    with torch.random.fork_rng():
        torch.manual_seed(trainer.args.seed)
        for i, batch in enumerate(trainer.get_train_dataloader()):
            # attention_mask, or chosen_/rejected_attention_mask (ORPO, CPO); none when padding-free / packed
            masks = [v for k, v in batch.items() if k.endswith("attention_mask")] or \
                [torch.ones_like(v) for k, v in batch.items() if k.endswith("input_ids")]
            real, total = real + sum(int(m.sum()) for m in masks), total + sum(m.numel() for m in masks)
            if i + 1 >= max_batches:
                break
    return 1 - real / total if total else 0.0
