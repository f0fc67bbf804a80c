"""Greedy generation gives the same answers whatever the batch: the CPU default of 64 rows per call (DEFAULT_BATCH,
for speed) cannot change what the evaluation stages write."""

from __future__ import annotations

from conftest import QA


def test_greedy_answers_do_not_depend_on_the_batch(tiny_model):
    import torch

    from alignkit.generation import DEFAULT_BATCH, default_batch_size, generate
    from alignkit.models import load_for_inference

    model, tokenizer = load_for_inference(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():  # an untrained tiny model answers one token forever: give it something to say
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    # prompts of different lengths, so rows are left-padded differently in each batch
    prompts = [[{"role": "user", "content": q + " Answer in one word." * k}] for k in range(3) for q, _, _ in QA]
    answers = {b: generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=b)[0] for b in (1, 5, 64)}
    assert answers[1] == answers[5] == answers[64]
    assert len(set(answers[1])) > len(prompts) // 3  # distinct answers, not one repeated string
    assert default_batch_size(model) == DEFAULT_BATCH["cpu"] == 64
    assert generate(model, tokenizer, prompts[:3], max_new_tokens=12)[0] == answers[1][:3]  # the default batch
