"""Generation gives the same answers whatever the batch: the CPU default of 64 rows per call (DEFAULT_BATCH, for
speed) cannot change what the evaluation stages write — greedy, and sampled, where each row draws from a stream of
its own (RowSampler) and samples exactly from softmax(logits / T), top-p applied."""

from __future__ import annotations

import pytest

from conftest import QA

# prompts of different lengths, so rows are left-padded differently in each batch
PROMPTS = [[{"role": "user", "content": q + " Answer in one word." * k}] for k in range(3) for q, _, _ in QA]


@pytest.fixture(scope="module")
def talking_model(tiny_model):
    import torch

    from alignkit.models import load_for_inference

    model, tokenizer = load_for_inference(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():  # an untrained tiny model answers one token forever: give it something to say
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model, tokenizer


def test_greedy_answers_do_not_depend_on_the_batch(talking_model):
    from alignkit.generation import DEFAULT_BATCH, default_batch_size, generate

    model, tokenizer = talking_model
    prompts = PROMPTS
    answers = {b: generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=b)[0] for b in (1, 5, 64)}
    assert answers[1] == answers[5] == answers[64]
    assert len(set(answers[1])) > len(prompts) // 3  # distinct answers, not one repeated string
    assert default_batch_size(model) == DEFAULT_BATCH["cpu"] == 64
    assert generate(model, tokenizer, prompts[:3], max_new_tokens=12)[0] == answers[1][:3]  # the default batch


def test_sampled_answers_do_not_depend_on_the_batch_the_neighbours_or_earlier_calls(talking_model):
    import torch

    from alignkit.generation import generate, row_seed

    model, tokenizer = talking_model
    sample = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    answers = {b: generate(model, tokenizer, PROMPTS, batch_size=b, **sample)[0] for b in (1, 4, 64)}
    assert answers[1] == answers[4] == answers[64]
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=12)[0]
    assert sum(a != g for a, g in zip(answers[1], greedy)) > len(PROMPTS) // 3  # it samples
    # a row is its own: alone, after other random draws, beside other prompts or in another order it says the same
    torch.rand(100)
    rows = [4, 1, 7]
    alone = generate(model, tokenizer, [PROMPTS[i] for i in rows], max_new_tokens=12, temperature=1.0, top_p=0.9,
                     seed=[row_seed(7, i) for i in rows])[0]
    assert alone == [answers[1][i] for i in rows]
    assert generate(model, tokenizer, PROMPTS, **{**sample, "seed": 8})[0] != answers[1]
    # per-row temperatures: a temperature-0 row is the greedy answer whatever is sampled beside it
    mixed = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=[0.0, 1.0] * (len(PROMPTS) // 2),
                     top_p=0.9, seed=7)[0]
    assert mixed[0::2] == greedy[0::2] and mixed[1::2] == answers[1][1::2]


def test_row_sampler_draws_exactly_from_the_tempered_and_nucleus_distribution():
    import torch

    from alignkit.generation import RowSampler

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = 8000
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (1.3, 0.8)):
        sampler = RowSampler([temperature] * draws, list(range(draws)), top_p)
        scores = sampler(torch.zeros(draws, 1, dtype=torch.long), logits.expand(draws, -1).clone())
        counts = torch.bincount(scores.argmax(-1), minlength=len(logits)).double()
        p = torch.softmax(logits.double() / temperature, -1)
        if top_p < 1:  # the smallest set of most likely tokens holding top_p of the mass, renormalised
            keep = torch.cumsum(p, -1) - p < top_p
            p = torch.where(keep, p, 0) / p[keep].sum()
            assert counts[~keep].sum() == 0
        sigma = (draws * p * (1 - p)).sqrt().clamp_min(1)
        assert ((counts - draws * p).abs() < 5 * sigma).all(), (temperature, top_p, counts / draws, p)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_row_sampler_gives_each_row_the_bits_it_gets_alone(top_p):
    """Rows sharing a temperature are nucleus-filtered together (one sort for the group, for speed); every row's
    scores must still be bit for bit those of the row alone, whatever the vocabulary size."""
    import torch

    from alignkit.generation import RowSampler

    torch.manual_seed(3)
    for vocab in (49152, 50257, 97):
        temperatures = [[0.7, 0.0, 1.0, 0.7, 0.3][i % 5] for i in range(11)]
        seeds = [10 + 3 * i for i in range(11)]
        ids = torch.zeros(11, 4, dtype=torch.long)
        batch, alone = RowSampler(temperatures, seeds, top_p), [RowSampler([t], [s], top_p)
                                                                for t, s in zip(temperatures, seeds)]
        for _ in range(2):  # the streams advance alike
            scores = torch.randn(11, vocab) * 3
            together = batch(ids, scores)
            for row, sampler in enumerate(alone):
                assert torch.equal(together[row], sampler(ids[row:row + 1], scores[row:row + 1])[0])
