"""The mtbench stage on the tiny model: two turns, per-category temperatures, resumable answers, both judges."""

from __future__ import annotations

import json
import os

import pytest

from alignkit.evaluation import mtbench
from standin import OpenAIStandIn as _Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL_QUESTIONS = os.path.join(ROOT, "data", "mtbench-smol", "question.jsonl")


def run(tmp_path, tiny_model, *extra):
    args = ["--questions", SMOL_QUESTIONS, "--base", tiny_model, "--max_new_tokens", "6", "--batch_size", "4",
            "--out_dir", str(tmp_path / "mt"), "--metrics", str(tmp_path / "m.json"),
            "--plot", str(tmp_path / "plot.csv"), *extra]
    assert mtbench.run(args) == 0
    return json.load(open(tmp_path / "m.json"))


def test_question_sets_load():
    real = mtbench.load_questions("mt_bench")
    assert len(real) == 80 and {q["category"] for q in real} == set(mtbench.TEMPERATURE)
    assert all(len(q["turns"]) == 2 for q in real)
    assert all(q["reference"] for q in real if q["category"] in ("math", "reasoning", "coding"))
    smol = mtbench.load_questions(SMOL_QUESTIONS)
    assert len(smol) == 16 and all(len(q["reference"]) == 2 for q in smol)


def test_offline_judge_metrics_are_stable_and_named_as_such(tmp_path, tiny_model):
    m = run(tmp_path, tiny_model)
    assert m["judge"]["backend"] == "reference-f1" and m["score"] == "reference_f1_score"
    base = m["models"]["base"]
    assert base["judgments"] == 32 and base["unparseable"] == 0 and 1 <= base["overall"] <= 10
    assert set(base["categories"]) == set(mtbench.TEMPERATURE)
    answers = [json.loads(x) for x in open(tmp_path / "mt" / "answers" / "base.jsonl")]
    assert len(answers) == 16 and all(len(a["turns"]) == 2 for a in answers)
    first = (tmp_path / "mt" / "judgments.jsonl").read_bytes()
    (tmp_path / "m.json").unlink()
    assert run(tmp_path, tiny_model) == m and (tmp_path / "mt" / "judgments.jsonl").read_bytes() == first
    assert (tmp_path / "plot.csv").read_text().startswith("model,category,score\nbase,coding,")


def test_answer_file_is_continued_not_restarted(tmp_path, tiny_model):
    full = tmp_path / "full"
    run(full, tiny_model)
    part = tmp_path / "part"
    run(part, tiny_model)
    path = part / "mt" / "answers" / "base.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4]))  # a crash after the first chunk
    run(part, tiny_model)
    uninterrupted = (full / "mt" / "answers" / "base.jsonl").read_text()
    assert sorted(path.read_text().splitlines()) == sorted(uninterrupted.splitlines())


def test_openai_judge_through_the_stand_in_server_with_pairwise(tmp_path, tiny_model, monkeypatch):
    from alignkit.train import sft
    from conftest import tiny_recipe

    server = _Server()
    try:
        monkeypatch.setenv("STANDIN_KEY", "sk-standin-secret")
        data = {"sft_train": os.path.join(ROOT, "data", "smol", "sft.jsonl"),
                "sft_test": os.path.join(ROOT, "data", "smol", "heldout.jsonl")}
        sft.train(["--config", tiny_recipe(tmp_path, tiny_model, data, "sft", max_steps=2)])
        m = run(tmp_path, tiny_model, "--models", f"sft={tmp_path / 'out-sft'}", "--judge", "openai",
                "--judge_url", server.url, "--judge_model", "stand-in", "--judge_key_env", "STANDIN_KEY",
                "--pairwise", "sft:base")
        assert m["judge"] == {"backend": "openai-compatible", "model": "stand-in", "base_url": server.url,
                              "prompt_version": m["judge"]["prompt_version"]}
        assert m["models"]["sft"]["overall"] == 7.0 and m["score"] == "mt_bench_score"
        # the stand-in never says [[A]]/[[B]]: every pairwise verdict is unparseable, counted, not a zero
        assert m["pairwise"]["sft_vs_base"]["unparseable"] == 32 and m["pairwise"]["sft_vs_base"]["win_rate"] is None
        n = len(server.requests)
        run(tmp_path, tiny_model, "--models", f"sft={tmp_path / 'out-sft'}", "--judge", "openai",
            "--judge_url", server.url, "--judge_model", "stand-in", "--judge_key_env", "STANDIN_KEY",
            "--pairwise", "sft:base")
        assert len(server.requests) == n  # every judgment came from the cache
        manifest = json.loads((tmp_path / "mt" / "manifest.json").read_text())
        assert manifest["judge"] == m["judge"] and manifest["config"]["judge_key_env"] == "<redacted>"
        for f in (tmp_path / "mt").rglob("*"):
            if f.is_file():
                assert "sk-standin-secret" not in f.read_text()
        server.mode = "garbage"
        (tmp_path / "mt" / "judgment_cache.jsonl").unlink()
        with pytest.raises(ValueError, match="had no parseable rating"):
            mtbench.run(["--questions", SMOL_QUESTIONS, "--base", tiny_model, "--judge", "openai",
                         "--judge_url", server.url, "--judge_key_env", "STANDIN_KEY", "--max_new_tokens", "6",
                         "--out_dir", str(tmp_path / "mt"), "--metrics", str(tmp_path / "m.json"),
                         "--plot", str(tmp_path / "plot.csv")])
    finally:
        server.httpd.shutdown()


def test_a_scaled_down_run_answers_the_first_questions_of_chosen_categories():
    """The Zephyr twin's selection from the real 80: the first 2 of each reference-guided category, all with
    MT-Bench's GPT-4 references (what the offline reference-f1 judge needs)."""
    import pytest

    from alignkit.errors import UsageError
    from alignkit.evaluation.mtbench import load_questions, select_questions

    questions = load_questions("mt_bench")
    chosen = select_questions(questions, ["math", "reasoning", "coding"], 2)
    from collections import Counter

    assert Counter(q["category"] for q in chosen) == {"math": 2, "reasoning": 2, "coding": 2}
    assert all(q["reference"] for q in chosen)
    assert [q["question_id"] for q in chosen] == sorted(q["question_id"] for q in chosen)
    assert select_questions(questions, None, None) == questions and len(questions) == 80
    with pytest.raises(UsageError, match="no questions in poetry; categories here: coding, extraction"):
        select_questions(questions, ["poetry"], None)


def test_answers_do_not_depend_on_the_batch_size(tmp_path, tiny_model):
    """Sampled categories too (writing and roleplay at 0.7): each question's turn draws from its own stream."""
    answers = {}
    for b in ("1", "5"):
        run(tmp_path / b, tiny_model, "--batch_size", b, "--max_new_tokens", "8")
        answers[b] = sorted((tmp_path / b / "mt" / "answers" / "base.jsonl").read_text().splitlines())
    assert answers["1"] == answers["5"]
