"""SFT stage: supervised fine-tuning on conversations, loss on the assistant's tokens only (TRL's SFTTrainer).

    alignkit sft --config recipes/smol/sft.yaml [--key value ...]

Data: conversations (`messages`, or `prompt`/`completion`). `assistant_only_loss` is on unless the recipe
turns it off; it needs a chat template with `{% generation %}` markers (the named ones have them).
`packing: true` packs conversations into `max_length` blocks.
"""

from __future__ import annotations

from trl.chat_template_utils import has_generation_markers

from alignkit.data import CONVERSATION
from alignkit.errors import RecipeError
from alignkit.templates import resolve_chat_template
from alignkit.train.stage import StageSpec


def check(recipe, fail) -> None:
    template = resolve_chat_template(recipe.alignkit.chat_template)
    if recipe.train.assistant_only_loss and template is not None and not has_generation_markers(template):
        fail("assistant_only_loss needs a chat template with {% generation %} markers; "
             "use a named one (smollm2, chatml, zephyr) or set assistant_only_loss: false")


def check_tokenizer(recipe, tokenizer) -> None:
    if recipe.train.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        raise RecipeError(
            f"{recipe.model.model_name_or_path}'s chat template has no {{% generation %}} markers, which "
            "assistant_only_loss needs; set chat_template: (smollm2, chatml, zephyr) in the recipe"
        )


SPEC = StageSpec(
    name="sft",
    config="trl:SFTConfig",
    trainer="alignkit.train.scoring:CompletionScoringSFTTrainer",  # TRL's, scoring only labelled positions
    data_kind=CONVERSATION,
    check=check,
    defaults={"assistant_only_loss": True},
    check_tokenizer=check_tokenizer,
)
train, main = SPEC.train, SPEC.main
