"""Rejection sampling: argmax kept as best-of-N and chosen, argmin as rejected; shards resume after a crash."""

from __future__ import annotations

import json
import os

import pytest

from alignkit.prepare.rejection_sampling import collect, prompt_turns, run_shards, select
from conftest import QA, tiny_recipe, write_jsonl

PROMPTS = [[{"role": "user", "content": f"question {i}?"}] for i in range(7)]


def fake_sample(calls):
    """Deterministic stand-in for the policy: completions depend only on the prompt, sample index and shard."""
    def sample(expanded, shard_index):
        calls.append(shard_index)
        out = [f"{p[-1]['content']} answer {'!' * (j % 3)} s{shard_index}" for j, p in enumerate(expanded)]
        return out, {"generated_tokens": len(out), "generation_seconds": 0.01}
    return sample


def score_by_exclamations(prompts, completions):
    return [float(c.count("!")) + 0.001 * len(p[-1]["content"]) for p, c in zip(prompts, completions)]


def test_select_keeps_argmax_as_best_and_chosen_argmin_as_rejected():
    prompt = [{"role": "user", "content": "q?"}]
    sft_row, pair = select(prompt, ["a", "best", "worst", "b"], [0.1, 0.9, -0.5, 0.3])
    assert sft_row["messages"][-1]["content"] == "best" and sft_row["score"] == 0.9
    assert pair["chosen"][0]["content"] == "best" and pair["rejected"][0]["content"] == "worst"
    assert (pair["chosen_score"], pair["rejected_score"]) == (0.9, -0.5)
    _, none = select(prompt, ["same", "same"], [0.2, 0.2])
    assert none is None


def test_shards_write_best_of_n_and_pairs(tmp_path):
    calls = []
    stats = run_shards(PROMPTS, n=3, shard_size=3, out_dir=str(tmp_path), sample=fake_sample(calls),
                       score=score_by_exclamations)
    assert stats["shards"] == 3 and calls == [0, 1, 2]
    summary = collect(str(tmp_path), 3)
    assert summary["prompts"] == 7 and summary["dpo_pairs"] == 7
    for line in open(tmp_path / "dpo.jsonl"):
        pair = json.loads(line)
        assert pair["chosen"][0]["content"].count("!") == 2 and "!" not in pair["rejected"][0]["content"]
    samples = [json.loads(x) for x in open(tmp_path / "samples.jsonl")]
    assert all(len(s["completions"]) == len(s["scores"]) == 3 for s in samples)  # every score kept


def test_resume_after_crash_skips_finished_shards_and_matches_uninterrupted(tmp_path):
    full_calls = []
    run_shards(PROMPTS, n=3, shard_size=2, out_dir=str(tmp_path / "full"), sample=fake_sample(full_calls),
               score=score_by_exclamations)
    collect(str(tmp_path / "full"), 4)

    calls = []
    crashing = fake_sample(calls)

    def crash_on_shard_2(expanded, k):
        if k == 2:
            raise KeyboardInterrupt("simulated crash")
        return crashing(expanded, k)

    with pytest.raises(KeyboardInterrupt):
        run_shards(PROMPTS, n=3, shard_size=2, out_dir=str(tmp_path / "run"), sample=crash_on_shard_2,
                   score=score_by_exclamations)
    assert sorted(os.listdir(tmp_path / "run" / "shards")) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    calls.clear()
    stats = run_shards(PROMPTS, n=3, shard_size=2, out_dir=str(tmp_path / "run"), sample=crashing,
                       score=score_by_exclamations)
    assert calls == [2, 3] and stats["shards_resumed"] == 2
    collect(str(tmp_path / "run"), 4)
    for name in ("samples.jsonl", "sft.jsonl", "dpo.jsonl"):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "full" / name).read_text()


def test_prompt_turns_from_each_kind_of_file():
    conv = [{"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}]}]
    pref = [{"prompt": "a?", "chosen": "b", "rejected": "c"}]
    only = [{"prompt": "a?"}]
    expected = [[{"role": "user", "content": "a?"}]]
    assert prompt_turns("x", conv) == prompt_turns("x", pref) == prompt_turns("x", only) == expected


def test_end_to_end_with_a_trained_reward_model(tmp_path, tiny_model):
    from alignkit.prepare import rejection_sampling
    from alignkit.prepare.rejection_sampling import RewardModelScorer
    from alignkit.train import reward

    rows = [{"prompt": q, "chosen": a, "rejected": r} for q, a, r in QA]
    data = {"pref_train": write_jsonl(tmp_path / "p.jsonl", rows * 2),
            "pref_test": write_jsonl(tmp_path / "t.jsonl", rows)}
    reward.train(["--config", tiny_recipe(tmp_path, tiny_model, data, "reward", max_steps=5)])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q, _, _ in QA[:5]])
    out = tmp_path / "rs"
    assert rejection_sampling.run(["--policy", tiny_model, "--reward_model", str(tmp_path / "out-reward"),
                                   "--prompts", prompts, "--out", str(out), "--n", "3", "--max_new_tokens", "6",
                                   "--shard_size", "2", "--seed", "1", "--metrics", str(tmp_path / "rs.json")]) == 0
    stats = json.load(open(out / "stats.json"))
    assert stats["prompts"] == 5 and stats["shards"] == 3 and "tokens_per_second" not in stats
    metrics = json.load(open(tmp_path / "rs.json"))  # reproducible by a rerun: no speed, no resume history
    assert metrics == stats  # reproducible by a rerun: no speed, no resume history
    scorer = RewardModelScorer(str(tmp_path / "out-reward"))
    for line in open(out / "samples.jsonl"):  # stored scores are the reward model's, and argmax became best-of-N
        s = json.loads(line)
        assert scorer([s["prompt"]] * 3, s["completions"]) == pytest.approx(s["scores"], abs=1e-5)
    sft_rows = [json.loads(x) for x in open(out / "sft.jsonl")]
    samples = [json.loads(x) for x in open(out / "samples.jsonl")]
    for row, s in zip(sft_rows, samples):
        assert row["score"] == max(s["scores"])
    # how the work is cut does not change what is sampled: one shard, other batches
    assert rejection_sampling.run(["--policy", tiny_model, "--reward_model", str(tmp_path / "out-reward"),
                                   "--prompts", prompts, "--out", str(tmp_path / "rs-one-shard"), "--n", "3",
                                   "--max_new_tokens", "6", "--shard_size", "5", "--batch_size", "4",
                                   "--seed", "1"]) == 0
    one_shard = [json.loads(x) for x in open(tmp_path / "rs-one-shard" / "samples.jsonl")]
    assert [s["completions"] for s in one_shard] == [s["completions"] for s in samples]
    assert len({c for s in samples for c in s["completions"]}) > len(samples)  # the completions do differ
