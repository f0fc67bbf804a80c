"""Shared fixtures: a tiny Llama with a small BPE tokenizer trained here, and tiny datasets on disk.

A 49k vocabulary makes even a 2-layer model ~50x slower; a ~300-token byte-level BPE keeps every trainer
step in the tens of milliseconds, so the suite can afford real training runs.
"""

from __future__ import annotations

import json
import os

import pytest

from alignkit.templates import CHATML

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (make test: 2 workers) each worker's multi-process runs rendezvous on ports of their own:
# `alignkit launch` defaults to MASTER_PORT (else 29500), which two workers' launches would otherwise share.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    os.environ["MASTER_PORT"] = str(29500 + 100 * (1 + int(os.environ["PYTEST_XDIST_WORKER"][2:])))

# The longest files first, so the two workers finish together (longest-processing-time-first scheduling; with
# --dist loadfile --no-loadscope-reorder a file is one unit of work, handed out in collection order).
LONGEST_FIRST = ("test_twins.py", "test_distributed.py", "test_slurm_two_nodes.py", "test_reliability.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the rest, the order pytest collected

CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "What is two plus two? Four. What is the opposite of hot? Cold.",
    "Answer in one word. The sky is blue and the grass is green.",
    "You are a helpful assistant. Hello! How can I help you today?",
    "The quick brown fox jumps over the lazy dog. Cats and dogs are animals.",
    "system user assistant question answer good bad right wrong yes no",
]

QA = [
    ("What is the capital of France?", "Paris.", "London."),
    ("What is the capital of Japan?", "Tokyo.", "Paris."),
    ("What is two plus two?", "Four.", "Five."),
    ("What is the opposite of hot?", "Cold.", "Warm."),
    ("What color is the sky?", "Blue.", "Green."),
    ("What color is the grass?", "Green.", "Blue."),
    ("Say hello.", "Hello!", "Bye."),
    ("Is a cat an animal?", "Yes.", "No."),
]

TINY_TEMPLATE = CHATML  # with {% generation %} markers, like every named template


def build_tiny_model(path: str, seed: int = 0, hidden_size: int = 32) -> str:
    """hidden 32 keeps the suite fast; QLoRA tests use 64: on CPUs with AVX-512 BF16, bitsandbytes repacks 4-bit
    weights for inference and needs out-features divisible by 32 and in-features by the 4-bit block size (64)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        CORPUS + [q + " " + a + " " + r for q, a, r in QA],
        trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = TINY_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_qlora_model(tmp_path_factory) -> str:
    """The tiny Llama with layer sizes bitsandbytes' AVX-512 4-bit CPU kernel can pack (see build_tiny_model)."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-qlora") / "model"), hidden_size=64)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("data")
    sft = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a, _ in QA]
    pref = [{"prompt": q, "chosen": a, "rejected": r} for q, a, r in QA]
    return {
        "sft_train": write_jsonl(d / "sft_train.jsonl", sft * 2),
        "sft_test": write_jsonl(d / "sft_test.jsonl", sft[:4]),
        "pref_train": write_jsonl(d / "pref_train.jsonl", pref * 2),
        "pref_test": write_jsonl(d / "pref_test.jsonl", pref[:4]),
    }


def tiny_recipe(tmp_path, model: str, data: dict, stage: str, **overrides) -> str:
    """Write a recipe YAML for the tiny model and return its path."""
    import yaml

    kind = {"sft": "sft", "cpt": "text"}.get(stage, "pref")
    recipe = {
        "model_name_or_path": model,
        "datasets": [{"path": data[f"{kind}_train"]}],
        "test_datasets": [{"path": data[f"{kind}_test"]}],
        "output_dir": str(tmp_path / f"out-{stage}"),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "seed": 7,
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "dataset_num_proc": None,
    }
    recipe.update(max_length=64)
    if stage == "dpo":
        recipe.update(beta=0.1)
    recipe.update(overrides)
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)
