"""MT-Bench-style judging: prompts against golden strings, rating/verdict parsing, reference routing,
position-swap arithmetic, and the OpenAI-compatible client against a stand-in server on 127.0.0.1."""

from __future__ import annotations

import json

import pytest

from alignkit.evaluation.judges import (
    JudgeError,
    JudgmentCache,
    OpenAIJudge,
    ReferenceScorer,
    load_judge_prompts,
    parse_rating,
    parse_verdict,
    render_pair,
    render_single,
    swap_outcome,
    win_rate,
)
from standin import OpenAIStandIn as _Server

Q_WRITING = {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now in French."]}
Q_MATH = {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]}


@pytest.fixture(scope="module")
def prompts():
    return load_judge_prompts()


def test_single_prompt_renders_golden_string(prompts):
    name, system, user = render_single(prompts, Q_WRITING, ["Leaves fall."], 1, None)
    assert name == "single-v1" and system == "You are a helpful assistant."
    assert user.startswith("[Instruction]\nPlease act as an impartial judge")
    assert user.endswith("[Question]\nWrite a haiku.\n\n[The Start of Assistant's Answer]\nLeaves fall.\n"
                         "[The End of Assistant's Answer]")


def test_reference_guided_routing_by_category(prompts):
    name, _, user = render_single(prompts, Q_MATH, ["4", "6"], 1, ["4", "6"])
    assert name == "single-math-v1" and "[The Start of Reference Answer]\n4\n[The End of Reference Answer]" in user
    name, _, user = render_single(prompts, Q_MATH, ["4", "6"], 2, ["4", "6"])
    assert name == "single-math-v1-multi-turn" and "And 3+3?" in user and "6" in user
    with pytest.raises(ValueError, match="needs a reference answer"):
        render_single(prompts, Q_MATH, ["4"], 1, None)
    assert render_single(prompts, Q_WRITING, ["a", "b"], 2, None)[0] == "single-v1-multi-turn"
    name, _, user = render_pair(prompts, Q_WRITING, ["x"], ["y"], 1, None)
    assert name == "pair-v2" and "[The Start of Assistant A's Answer]\nx\n" in user
    assert render_pair(prompts, Q_MATH, ["4", "6"], ["5", "7"], 2, ["4", "6"])[0] == "pair-math-v1-multi-turn"


@pytest.mark.parametrize("text,rating", [
    ("Good. Rating: [[8]]", 8.0), ("[[ 7 ]]", 7.0), ("Rating: [[8.5]]", 8.5), ("first [[3]] then [[9]]", 9.0),
    ("Rating: [6]", 6.0), ("Rating: [[11]]", None), ("Rating: [[0]]", None), ("I like it, 8/10", None),
    ("", None), ("[[ten]]", None),
])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


@pytest.mark.parametrize("text,verdict", [
    ("... [[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"), ("[[A]] or [[B]]", None), ("A is better", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_position_swap_win_rate_arithmetic():
    # X is A first, then B: consistent wins/losses count, position-dependent verdicts are ties
    assert swap_outcome("A", "B") == "win" and swap_outcome("B", "A") == "loss"
    assert swap_outcome("A", "A") == "tie" and swap_outcome("tie", "tie") == "tie" and swap_outcome("A", "tie") == "tie"
    assert swap_outcome(None, "A") is None
    r = win_rate(["win", "win", "loss", "tie", None])
    assert r == {"wins": 2, "losses": 1, "ties": 1, "unparseable": 1, "win_rate": 0.625}


def test_reference_scorer_is_deterministic_and_bounded():
    assert ReferenceScorer.score("Paris.", "Paris") == 10.0
    assert ReferenceScorer.score("The capital is Paris.", "Paris.") == pytest.approx(1 + 9 * 0.4)
    assert ReferenceScorer.score("London", "Paris") == 1.0 and ReferenceScorer.score("", "Paris") == 1.0


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()


def test_openai_compatible_judge_end_to_end_over_http(server, prompts, monkeypatch, tmp_path):
    monkeypatch.setenv("JUDGE_KEY", "sk-test-secret-123")
    judge = OpenAIJudge(server.url, "gpt-4", api_key_env="JUDGE_KEY", retries=0)
    _, system, user = render_single(prompts, Q_WRITING, ["Leaves fall."], 1, None)
    cache = JudgmentCache(str(tmp_path / "judgments.jsonl"))
    assert parse_rating(cache.get_or_call(judge, system, user)) == 7.0
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test-secret-123"
    assert req["body"]["messages"][1]["content"] == user and req["body"]["temperature"] == 0
    # cached: a rerun (new cache object on the same file) sends nothing
    assert parse_rating(JudgmentCache(str(tmp_path / "judgments.jsonl")).get_or_call(judge, system, user)) == 7.0
    assert len(server.requests) == 1
    assert "sk-test-secret-123" not in (tmp_path / "judgments.jsonl").read_text()
    assert "sk-test-secret-123" not in json.dumps(judge.identity)


def test_garbage_answers_are_unparseable_not_zero(server):
    server.mode = "garbage"
    out = OpenAIJudge(server.url, "m", api_key_env=None, retries=0).complete("s", "u")
    assert parse_rating(out) is None


@pytest.mark.parametrize("mode,expected", [("error", "HTTP 500"), ("slow", "timed out"),
                                           ("notjson", "not an OpenAI chat-completions JSON body")])
def test_failing_endpoint_retries_with_backoff_then_errors(server, mode, expected, caplog, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-never-logged")
    server.mode = mode
    judge = OpenAIJudge(server.url, "m", api_key_env="JUDGE_KEY", timeout=0.3, retries=2, backoff=0.01)
    with pytest.raises(JudgeError, match=f"failed after 3 attempt\\(s\\): .*{expected}"):
        judge.complete("s", "u")
    assert len(server.requests) == 3
    assert "sk-never-logged" not in caplog.text


def test_refused_connection_is_a_clear_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on this port now
    judge = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, retries=1, backoff=0.01)
    with pytest.raises(JudgeError, match=r"127\.0\.0\.1:\d+/v1/chat/completions .*failed after 2 attempt.*refused"):
        judge.complete("s", "u")
