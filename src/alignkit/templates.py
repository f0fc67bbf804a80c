"""Named chat templates a recipe can select with `chat_template: <name>`.

Every template here carries `{% generation %}` markers around the assistant content *and* its end-of-turn token,
so that transformers can return an assistant mask (SFT `assistant_only_loss`) and the model is trained to stop.
Rendered without the markers' effect they are byte-identical to the upstream templates they are named after
(tests/test_templates.py checks this against SmolLM2's own template).
"""

from __future__ import annotations

# One ChatML turn; the assistant's content and its <|im_end|> are inside the generation markers.
_CHATML_TURN = (
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
)
_CHATML_GENERATION_PROMPT = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

# Plain ChatML (no default system prompt), for base models trained with `<|im_start|>`/`<|im_end|>` tokens.
CHATML = "{% for message in messages %}" + _CHATML_TURN + "{% endfor %}" + _CHATML_GENERATION_PROMPT

# ChatML as used by SmolLM2-Instruct: a default system prompt is inserted when the conversation has none.
SMOLLM2 = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}" + _CHATML_TURN + "{% endfor %}" + _CHATML_GENERATION_PROMPT
)

# Zephyr-7b-beta's template (HuggingFaceH4/zephyr-7b-beta tokenizer_config.json); eos is the model's own `</s>`.
ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Anthropic HH-RLHF's text format, as Anima's QLoRA-DPO trained on it (rlhf/qlora_dpo.py): BOS, then
# "\n\nHuman: …\n\nAssistant: …" turns, EOS after the answer. For base checkpoints without a chat template of their
# own (lyogavin/Anima33B-merged); a system message, which that format has no turn for, is written as plain text.
# The prompt ends at "Assistant:" and the answer begins with its space, as TRL's hh-rlhf splits do: a prompt ending
# in a space tokenizes differently from the same text followed by the answer (" Paris" is one token).
HH_RLHF = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '\n\nAssistant:' }}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{% elif message['role'] == 'user' %}"
    "{{ '\n\nHuman: ' + message['content'] }}"
    "{% else %}"
    "{{ message['content'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)

NAMED_TEMPLATES = {"smollm2": SMOLLM2, "chatml": CHATML, "zephyr": ZEPHYR, "hh-rlhf": HH_RLHF}


def resolve_chat_template(name_or_template: str | None) -> str | None:
    """A name from NAMED_TEMPLATES, a literal Jinja template (contains '{%'), or None (keep the model's own)."""
    if name_or_template is None:
        return None
    if name_or_template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name_or_template]
    if "{%" in name_or_template or "{{" in name_or_template:
        return name_or_template
    raise ValueError(
        f"chat_template: unknown template name {name_or_template!r}; "
        f"known names: {', '.join(sorted(NAMED_TEMPLATES))} (or give a Jinja template string)"
    )
