"""`alignkit plan`: parameter arithmetic checked against real models, memory parts, and the CLI verdicts."""

from __future__ import annotations

import os

import pytest

from alignkit import architecture
from alignkit.launch import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parameter_and_lora_counts_match_the_real_models(tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    a = architecture.architecture(tiny_model)
    assert architecture.parameter_counts(a)["total"] == sum(p.numel() for p in model.parameters())
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert architecture.lora_parameters(a, 4, "all-linear") == trainable
    # published sizes of the headline models
    known = architecture.KNOWN
    assert architecture.parameter_counts(known["mistralai/Mistral-7B-v0.1"])["total"] == 7_241_732_096
    assert architecture.parameter_counts(known["HuggingFaceTB/SmolLM2-135M-Instruct"])["total"] == 134_515_008


def test_zero_stages_shard_what_they_should(monkeypatch):
    monkeypatch.chdir(ROOT)
    from alignkit.train import dpo

    recipe = dpo.SPEC.parse(["--config", "recipes/zephyr-7b-beta/dpo.yaml"], for_check=True)
    a = architecture.KNOWN["mistralai/Mistral-7B-v0.1"]
    parts = {z: plan.estimate(recipe, "dpo", a, world=8, device="cuda", zero=z)["parts_gib"] for z in (0, 1, 2, 3)}
    n = architecture.parameter_counts(a)["total"]
    # DDP: fp32 weights (the masters, bf16 autocast), fp32 gradients, Adam's two fp32 states, the gradient buckets
    assert [parts[0][k] * architecture.GiB / n for k in ("weights", "gradients", "optimizer", "ddp_buckets")] == \
        pytest.approx([4, 4, 8, 4], rel=1e-3)
    assert parts[1]["weights"] * architecture.GiB / n == pytest.approx(2, rel=1e-3)  # DeepSpeed: bf16 weights
    assert parts[1]["optimizer"] == pytest.approx(parts[0]["optimizer"] * 12 / 8 / 8, rel=1e-3)  # fp32 master+Adam
    assert parts[1]["ddp_buckets"] == 0
    assert parts[2]["gradients"] == pytest.approx(parts[1]["gradients"] / 8, rel=1e-3)
    assert parts[3]["weights"] == pytest.approx(parts[2]["weights"] / 8, rel=1e-3)
    assert parts[0]["reference"] == 0  # reference log-probs precomputed (the DPO default): no frozen copy
    online = dpo.SPEC.parse(["--config", "recipes/zephyr-7b-beta/dpo.yaml", "--precompute_ref_log_probs", "false",
                             "--ref_logps", ""], for_check=True)
    online_parts = plan.estimate(online, "dpo", a, world=8, device="cuda", zero=3)["parts_gib"]
    assert online_parts["reference"] == pytest.approx(parts[3]["weights"], rel=1e-3)  # a frozen copy, sharded alike


def test_cli_verdicts(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert plan.main(["recipes/anima-33b/dpo.yaml", "--gpus", "1xH100-80GB"]) == 0
    out = capsys.readouterr().out
    assert "32.53 B parameters (1950.4 M trained)" in out and "fits" in out and "s per optimiser step" in out
    assert plan.main(["recipes/zephyr-7b-beta/dpo.yaml", "--gpus", "8xA100-40GB"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert plan.main(["recipes/zephyr-7b-beta/dpo.yaml", "--gpus", "8xA100-40GB", "--accelerate_config",
                      "recipes/accelerate/zero3.yaml"]) == 0
    assert plan.main(["recipes/zephyr-7b-beta/dpo.yaml", "--gpus", "8xV100"]) == 2
    assert "expected NxTYPE" in capsys.readouterr().err
