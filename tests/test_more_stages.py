"""CPT, reward model, ORPO, KTO and CPO/SimPO on the tiny model: closed-form step-1 losses and real learning."""

from __future__ import annotations

import csv
import math
import os

import pytest

from alignkit.train import stage_module
from conftest import QA, tiny_recipe, write_jsonl


def run(stage: str, recipe: str, *extra: str) -> dict:
    module = stage_module(stage)
    return module.train(["--config", recipe, *extra])


def first_loss(out_dir) -> float:
    with open(os.path.join(out_dir, "train_log.csv")) as f:
        return float(next(csv.DictReader(f))["loss"])


@pytest.fixture(scope="module")
def uniform_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model with a zero, untied output layer: every next-token distribution is uniform over the vocab,
    so chosen and rejected have equal mean log-probs — a point where ORPO and SimPO losses have closed forms."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    torch.nn.init.zeros_(model.lm_head.weight)
    path = str(tmp_path_factory.mktemp("uniform") / "model")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return path


def test_kto_step1_loss_is_one_half(tmp_path, tiny_model, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "kto", max_steps=1, per_device_train_batch_size=8)
    metrics = run("kto", recipe)
    assert first_loss(tmp_path / "out-kto") == pytest.approx(0.5, abs=1e-6)
    assert metrics["train_rows"] == 32  # 16 pairs → 16 desirable + 16 undesirable rows


def test_kto_accepts_unpaired_rows_with_labels(tmp_path, tiny_model, tiny_data):
    rows = [{"prompt": q, "completion": a, "label": True} for q, a, _ in QA]
    rows += [{"prompt": q, "completion": r, "label": False} for q, _, r in QA]
    path = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    recipe = tiny_recipe(tmp_path, tiny_model, {**tiny_data, "pref_train": path}, "kto", max_steps=1)
    assert run("kto", recipe)["train_rows"] == 16


def test_orpo_step1_loss_at_uniform_point(tmp_path, uniform_model, tiny_data):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(uniform_model).vocab_size
    recipe = tiny_recipe(tmp_path, uniform_model, tiny_data, "orpo", max_steps=1, beta=0.1)
    run("orpo", recipe)
    # NLL of chosen under a uniform model = ln V; equal odds → -log sigmoid(0) = ln 2, weighted by beta
    assert first_loss(tmp_path / "out-orpo") == pytest.approx(math.log(vocab) + 0.1 * math.log(2), abs=1e-5)


def test_simpo_step1_loss_at_uniform_point(tmp_path, uniform_model, tiny_data):
    recipe = tiny_recipe(tmp_path, uniform_model, tiny_data, "cpo", max_steps=1, loss_type="simpo",
                         cpo_alpha=0.0, simpo_gamma=0.5, beta=2.0)
    run("cpo", recipe)
    # equal mean log-probs → -log sigmoid(beta*0 - gamma) = softplus(gamma)
    assert first_loss(tmp_path / "out-cpo") == pytest.approx(math.log1p(math.exp(0.5)), abs=1e-5)


def test_reward_model_separates_a_separable_set(tmp_path, tiny_model):
    good = ["Good answer.", "Yes, good.", "Good, right.", "A good one.", "Good!", "Right and good."]
    bad = ["Bad answer.", "No, bad.", "Bad, wrong.", "A bad one.", "Bad!", "Wrong and bad."]
    prompts = [q for q, _, _ in QA]
    rows = [{"prompt": p, "chosen": g, "rejected": b} for p in prompts for g, b in zip(good, bad)]
    train = write_jsonl(tmp_path / "train.jsonl", rows[::2])
    test = write_jsonl(tmp_path / "test.jsonl", rows[1::2])
    recipe = tiny_recipe(tmp_path, tiny_model, {"pref_train": train, "pref_test": test}, "reward",
                         max_steps=40, learning_rate=5e-3, use_peft=False, per_device_train_batch_size=8)
    metrics = run("reward", recipe)
    assert metrics["eval_pairwise_accuracy"] == 1.0 and metrics["eval_mean_margin"] > 0
    files = os.listdir(tmp_path / "out-reward")
    from transformers import AutoConfig

    assert "model.safetensors" in files and AutoConfig.from_pretrained(tmp_path / "out-reward").num_labels == 1


def test_reward_stage_refuses_sft_rows(tmp_path, tiny_model, tiny_data):
    from alignkit.errors import DataError

    recipe = tiny_recipe(tmp_path, tiny_model, {**tiny_data, "pref_train": tiny_data["sft_train"]}, "reward")
    with pytest.raises(DataError, match=r"sft_train.jsonl: row 1: field 'messages': a conversation row where a "
                                        r"preference dataset"):
        run("reward", recipe)


def test_pack_documents_keeps_every_token_but_the_remainder():
    from alignkit.train.cpt import pack_documents

    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    blocks, stats = pack_documents(docs, eos_id=0, block_size=4)
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]  # EOS after every document
    assert stats == {"documents": 4, "tokens": 14, "tokens_dropped": 2, "blocks": 3}  # only [10, 0] dropped


def test_cpt_lowers_held_out_perplexity_and_caches_packing(tmp_path, tiny_model):
    text = ["The capital of France is Paris. The capital of Japan is Tokyo. " * 3,
            "The quick brown fox jumps over the lazy dog. " * 4, "The sky is blue and the grass is green. " * 4]
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in text * 4])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": t} for t in text])
    data = {"text_train": train, "text_test": test}
    recipe = tiny_recipe(tmp_path, tiny_model, data, "cpt", max_steps=30, learning_rate=3e-3, use_peft=False,
                         max_length=32, cache_dir=str(tmp_path / "cache"))
    m = run("cpt", recipe)
    assert m["eval_perplexity"] < 0.8 * m["eval_perplexity_before"]
    assert m["train_tokens_dropped"] < 32 and m["train_blocks"] == m["train_tokens"] // 32
    cached = sorted(os.listdir(tmp_path / "cache" / "cpt"))
    assert len(cached) == 2
    m2 = run("cpt", recipe)  # same inputs: the packed blocks come from the cache, results are identical
    assert sorted(os.listdir(tmp_path / "cache" / "cpt")) == cached
    assert m2["eval_perplexity"] == m["eval_perplexity"]
