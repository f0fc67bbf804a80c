"""DPO stage: direct preference optimisation with TRL's DPOTrainer.

    alignkit dpo --config recipes/smol/dpo.yaml [--key value ...]

Data: preference pairs in any format the data module recognises. Every TRL DPO loss (`loss_type`, several
combined with `loss_weights`). Metrics add held-out implicit-reward accuracy and margin.

Reference model: with LoRA/QLoRA it is the policy with the adapter disabled (no second model in memory);
starting from an SFT adapter (`adapter_path`), TRL keeps a frozen copy of that adapter as the reference;
with `precompute_ref_log_probs: true` reference log-probs are computed once up front and none is kept; with
`ref_logps: DIR` as well they are read from the artifact `alignkit ref_logps` wrote (ref_logps.py,
stored_reference.py), so a β or loss sweep computes them once.

Scoring: each pair runs through the policy as one row, prompt · chosen · rejected, and only completion positions go
through the LM head (scoring.py) — TRL's own loss code on the same numbers, with less work; TRL's forward
where a model or batch does not allow it.

Reference log-probs are precomputed by default (TRL's default is a reference forward every step): the same
numbers, a forward pass per step saved, and no reference model kept in memory for full fine-tuning.

`train_sampling_strategy: group_by_length` (with `remove_unused_columns: false`) groups rows of similar length
(prompt + the longer reply) into batches; the fraction of padding positions is reported either way as
`train_padding_fraction`. Not a default: transformers' length-grouped sampler draws its order from the global RNG,
so a resumed run would not see the uninterrupted run's batches, and batches would depend on the world size.
"""

from __future__ import annotations

from alignkit.data import PREFERENCE
from alignkit.errors import RecipeError
from alignkit.train.stage import StageSpec, reward_metrics
from alignkit.train.stored_reference import attach

# Every loss TRL 1.16's DPOTrainer implements (DPOConfig.loss_type; several can be combined with loss_weights).
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


def check(recipe, fail) -> None:
    args = recipe.train
    unknown = [t for t in args.loss_type if t not in LOSS_TYPES]
    if unknown:
        fail(f"loss_type: unknown {unknown}; valid: {', '.join(LOSS_TYPES)}")
    if "exo_pair" in args.loss_type and not args.label_smoothing > 0:
        fail("loss_type exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    if args.use_liger_kernel and args.precompute_ref_log_probs:
        fail("use_liger_kernel cannot be combined with precompute_ref_log_probs (on by default; TRL's Liger DPO "
             "loss computes the reference itself): set precompute_ref_log_probs: false")
    if args.sync_ref_model and args.precompute_ref_log_probs:
        fail("sync_ref_model updates the reference during training, so its log-probs cannot be precomputed "
             "(precompute_ref_log_probs is on by default): set precompute_ref_log_probs: false")
    if recipe.alignkit.ref_logps and not args.precompute_ref_log_probs:
        fail("ref_logps (stored reference log-probs) needs precompute_ref_log_probs: true — without it TRL runs "
             "the reference model every step and ignores them")
    if args.train_sampling_strategy == "group_by_length" and args.remove_unused_columns:
        fail("train_sampling_strategy group_by_length needs remove_unused_columns: false for DPO (the length "
             "column must reach the sampler; DPO's collator ignores columns it does not use)")


def prompt_length(tokenizer, row: dict) -> int:
    """Tokens of a row's prompt as TRL's DPOTrainer counts them: the prompt rendered with the generation prompt,
    cut where it stops being a prefix of prompt + chosen / prompt + rejected."""
    def ids(messages, **kw):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)

    prompt = ids(row["prompt"], add_generation_prompt=True)
    if isinstance(prompt, dict):
        prompt = prompt["input_ids"]

    def common(other):
        other = other["input_ids"] if isinstance(other, dict) else other
        n = 0
        while n < min(len(prompt), len(other)) and prompt[n] == other[n]:
            n += 1
        return n

    return min(common(ids(row["prompt"] + row["chosen"])), common(ids(row["prompt"] + row["rejected"])))


def check_rows_fit(recipe, tokenizer, train_ds, eval_ds):
    """Refuse, before any weights load, a run where TRL would drop every row: with `keep_start` truncation it drops
    rows whose prompt alone fills max_length, and a split left empty dies in `torch.cat()` deep inside the trainer.
    Stops at the first row that fits (nearly always the first), so it costs nothing on a sensible recipe."""
    t = recipe.train
    if t.max_length is None or t.truncation_mode != "keep_start":
        return
    for split, ds in (("train", train_ds), ("held-out", eval_ds)):
        longest = 0
        for row in ds:
            n = prompt_length(tokenizer, row)
            if n < t.max_length:
                break
            longest = max(longest, n)
        else:
            if len(ds):
                raise RecipeError(
                    f"{recipe.path or 'command line'}: max_length {t.max_length} leaves no {split} row: every prompt "
                    f"alone fills it (the longest has {longest} tokens, TRL drops such rows); raise max_length, or "
                    "set truncation_mode: keep_end")
    return train_ds, eval_ds


def prepare(recipe, tokenizer, train_ds, eval_ds):
    """Before weights load: some rows must survive truncation; stored reference log-probs attached."""
    return attach(recipe, tokenizer, *check_rows_fit(recipe, tokenizer, train_ds, eval_ds))


SPEC = StageSpec(
    name="dpo",
    config="trl:DPOConfig",
    # TRL's, reading attached reference log-probs, scoring each pair in one row (scoring.py)
    trainer="alignkit.train.scoring:PairScoringDPOTrainer",
    data_kind=PREFERENCE,
    check=check,
    defaults={"precompute_ref_log_probs": True},
    prepare_data=prepare,
    fp16_refused="the loss is a difference of summed log-probs, which fp16 rounds and overflows",
    metrics=reward_metrics,
)
train, main = SPEC.train, SPEC.main
