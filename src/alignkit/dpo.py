"""DPO stage: direct preference optimisation with TRL's DPOTrainer.

    python -m alignkit.dpo --config recipes/smol/dpo.yaml [--key value ...]

recipe → preference data (normalised prompt/chosen/rejected, held-out split) → tokenizer + chat template →
policy (full / LoRA / QLoRA, or the SFT stage's adapter or merged model) → DPOTrainer → train → held-out
reward accuracy and margin → save (atomic) + metrics.json + train_log.csv + config.yaml.

Reference model: with LoRA/QLoRA it is the policy with the adapter disabled (no second model in memory);
starting from an SFT adapter, TRL keeps a frozen copy of that adapter as the reference; with
`precompute_ref_log_probs: true` reference log-probs are computed once up front and no reference is kept.
"""

from __future__ import annotations

from .stage import finish, load_inputs, make_trainer, parse_stage_args, run_cli, train_and_evaluate

# Every loss TRL 1.16's DPOTrainer implements (DPOConfig.loss_type; several can be combined with loss_weights).
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


STAGE_DEFAULTS: dict = {}


def config_class():
    from trl import DPOConfig

    return DPOConfig


def stage_check(recipe, fail) -> None:
    args = recipe.train
    if recipe.asks("fp16"):
        fail("fp16 is refused for DPO: the loss is a difference of summed log-probs, which fp16 rounds and "
             "overflows; use bf16 (GPU) or fp32")
    unknown = [t for t in args.loss_type if t not in LOSS_TYPES]
    if unknown:
        fail(f"loss_type: unknown {unknown}; valid: {', '.join(LOSS_TYPES)}")
    if "exo_pair" in args.loss_type and not args.label_smoothing > 0:
        fail("loss_type exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    if args.use_liger_kernel and args.precompute_ref_log_probs:
        fail("use_liger_kernel cannot be combined with precompute_ref_log_probs (TRL's Liger DPO loss "
             "computes the reference itself)")


def train(argv: list[str]) -> dict:
    from trl import DPOTrainer

    from .data import PREFERENCE

    # 1. Recipe.
    recipe = parse_stage_args(argv, config_class(), stage_check=stage_check, stage_defaults=STAGE_DEFAULTS)

    # 2-3. Data (normalised prompt/chosen/rejected), tokenizer, policy: a new LoRA adapter (use_peft), the SFT
    # stage's adapter (adapter_path), or full weights.
    train_ds, eval_ds, data_report, tokenizer, model = load_inputs(recipe, PREFERENCE)

    # 4. Trainer. No ref_model: TRL derives the reference from the policy (see module docstring).
    trainer = make_trainer(DPOTrainer, recipe, model, tokenizer, train_ds, eval_ds)

    # 5. Train; held-out reward accuracy and margin (implicit rewards vs. the reference).
    metrics, ev = train_and_evaluate(trainer, data_report)
    metrics.update({
        "eval_reward_accuracy": ev["eval_rewards/accuracies"],
        "eval_reward_margin": ev["eval_rewards/margins"],
        "eval_reward_chosen": ev["eval_rewards/chosen"],
        "eval_reward_rejected": ev["eval_rewards/rejected"],
    })

    # 6. Save.
    return finish("dpo", recipe, trainer, tokenizer, metrics)


def main(argv=None) -> int:
    return run_cli("dpo", lambda a: (train(a), 0)[1], argv)


if __name__ == "__main__":
    raise SystemExit(main())
