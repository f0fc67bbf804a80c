"""SFT stage: supervised fine-tuning on conversations, loss on assistant tokens only.

    python -m alignkit.sft --config recipes/smol/sft.yaml [--key value ...]

recipe → data (normalised conversations, held-out split) → tokenizer + chat template → model (full / LoRA /
QLoRA) → TRL SFTTrainer → train → held-out loss → save (atomic) + metrics.json + train_log.csv + config.yaml.
"""

from __future__ import annotations

from .config import RecipeError
from .stage import finish, load_inputs, make_trainer, parse_stage_args, run_cli, train_and_evaluate


# SFT trains on the assistant's tokens only unless the recipe says otherwise.
STAGE_DEFAULTS = {"assistant_only_loss": True}


def config_class():
    from trl import SFTConfig

    return SFTConfig


def stage_check(recipe, fail) -> None:
    from trl.chat_template_utils import has_generation_markers

    from .templates import resolve_chat_template

    template = resolve_chat_template(recipe.extras.chat_template)
    if recipe.train.assistant_only_loss and template is not None and not has_generation_markers(template):
        fail("assistant_only_loss needs a chat template with {% generation %} markers; "
             "use a named one (smollm2, chatml, zephyr) or set assistant_only_loss: false")


def check_tokenizer(recipe, tokenizer) -> None:
    from trl.chat_template_utils import has_generation_markers

    if recipe.train.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        raise RecipeError(
            f"{recipe.model.model_name_or_path}'s chat template has no {{% generation %}} markers, which "
            "assistant_only_loss needs; set chat_template: (smollm2, chatml, zephyr) in the recipe"
        )


def train(argv: list[str]) -> dict:
    from trl import SFTTrainer

    from .data import CONVERSATION

    # 1. Recipe.
    recipe = parse_stage_args(argv, config_class(), stage_check=stage_check, stage_defaults=STAGE_DEFAULTS)

    # 2-3. Data (every source normalised to {"messages": [...]}), tokenizer + chat template, model.
    train_ds, eval_ds, data_report, tokenizer, model = load_inputs(recipe, CONVERSATION,
                                                                   check_tokenizer=check_tokenizer)

    # 4. Trainer.
    trainer = make_trainer(SFTTrainer, recipe, model, tokenizer, train_ds, eval_ds)

    # 5. Train; held-out loss.
    metrics, _ = train_and_evaluate(trainer, data_report)

    # 6. Save.
    return finish("sft", recipe, trainer, tokenizer, metrics)


def main(argv=None) -> int:
    return run_cli("sft", lambda a: (train(a), 0)[1], argv)


if __name__ == "__main__":
    raise SystemExit(main())
