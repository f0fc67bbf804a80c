"""DPO stage: direct preference optimisation with TRL's DPOTrainer.

    python -m alignkit.dpo --config recipes/smol/dpo.yaml [--key value ...]

Data: preference pairs in any format the data module recognises. Every TRL DPO loss (`loss_type`, several
combined with `loss_weights`). Metrics add held-out implicit-reward accuracy and margin.

Reference model: with LoRA/QLoRA it is the policy with the adapter disabled (no second model in memory);
starting from an SFT adapter (`adapter_path`), TRL keeps a frozen copy of that adapter as the reference;
with `precompute_ref_log_probs: true` reference log-probs are computed once up front and none is kept.
"""

from __future__ import annotations

from .data import PREFERENCE
from .stage import StageSpec, reward_metrics

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
        fail("use_liger_kernel cannot be combined with precompute_ref_log_probs (TRL's Liger DPO loss "
             "computes the reference itself)")


SPEC = StageSpec(
    name="dpo",
    config="trl:DPOConfig",
    trainer="trl:DPOTrainer",
    data_kind=PREFERENCE,
    check=check,
    fp16_refused="the loss is a difference of summed log-probs, which fp16 rounds and overflows",
    metrics=reward_metrics,
)
train, main = SPEC.train, SPEC.main

if __name__ == "__main__":
    raise SystemExit(main())
