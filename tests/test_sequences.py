"""What the trainers actually see: label masks on assistant tokens only, EOS exactly once per turn."""

from __future__ import annotations

import pytest

from alignkit.train import stage_module
from conftest import tiny_recipe

CONV = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?"},
    {"role": "assistant", "content": "Tokyo."},
]}


def make_trainer(stage, tmp_path, tiny_model, tiny_data, rows):
    import datasets

    from alignkit.models import load_model, load_tokenizer, lora_config
    module = stage_module(stage)
    recipe = module.SPEC.parse(["--config", tiny_recipe(tmp_path, tiny_model, tiny_data, stage, max_length=None)])
    tok = load_tokenizer(recipe)
    model = load_model(recipe, tok)
    from trl import DPOTrainer, SFTTrainer

    cls = SFTTrainer if stage == "sft" else DPOTrainer
    ds = datasets.Dataset.from_list(rows)
    return cls(model=model, args=recipe.train, train_dataset=ds, processing_class=tok,
               peft_config=lora_config(recipe.model)), tok


def test_sft_label_mask_is_exactly_the_assistant_turns(tmp_path, tiny_model, tiny_data):
    trainer, tok = make_trainer("sft", tmp_path, tiny_model, tiny_data, [CONV])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert len(ids) > 64  # long enough that a truncation bug would show
    eos = tok.eos_token_id
    # expected: each assistant turn's content tokens followed by its end-of-turn token, nothing else
    expected = []
    for content in ("Paris.", "Tokyo."):
        expected += tok(content, add_special_tokens=False)["input_ids"] + [eos]
    trained = [t for t, lab in zip(ids, labels) if lab != -100]
    assert trained == expected
    # and the mask sits where those tokens are, in order (labels equal inputs where trained)
    assert all(lab == t for t, lab in zip(ids, labels) if lab != -100)
    assert ids == tok(tok.apply_chat_template(CONV["messages"], tokenize=False), add_special_tokens=False)["input_ids"]


def test_sft_sequence_eos_once_per_turn(tmp_path, tiny_model, tiny_data):
    trainer, tok = make_trainer("sft", tmp_path, tiny_model, tiny_data, [CONV])
    ids = trainer.train_dataset[0]["input_ids"]
    eos = tok.eos_token_id
    assert ids.count(eos) == len(CONV["messages"])  # one <|im_end|> per message: none missing, none doubled
    assert all(not (a == eos and b == eos) for a, b in zip(ids, ids[1:]))


@pytest.mark.parametrize("row", [
    {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
])
def test_dpo_completions_end_with_exactly_one_eos(tmp_path, tiny_model, tiny_data, row):
    trainer, tok = make_trainer("dpo", tmp_path, tiny_model, tiny_data, [row])
    ex = trainer.train_dataset[0]
    eos = tok.eos_token_id
    for side, content in (("chosen", "Hello."), ("rejected", "Go away.")):
        ids = ex[f"{side}_ids"]
        assert ids.count(eos) == 1, (side, tok.decode(ids))
        body = tok(content, add_special_tokens=False)["input_ids"]
        assert ids[: len(body) + 1] == body + [eos]
    assert ex["prompt_ids"].count(eos) == 1  # the user turn's own end-of-turn only
