"""Writes the smol pipeline's local lm-eval tasks (stdlib only, deterministic): `python eval/lm_eval/smol/build.py`.

Both tasks use the smol pipeline's 36 held-out questions (data/smol/heldout.jsonl), which no training stage sees:
- `smol_mc.jsonl`: multiple choice — the reference answer among three distractors of the same category
  (other answers of that category), scored by log-likelihood (acc, acc_norm);
- `smol_qa.jsonl`: free generation — greedy answer, leading/trailing whitespace stripped, compared with the
  reference by exact match ignoring case and punctuation.
"""

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(ROOT, "data", "smol"))
import build as smol_data  # noqa: E402  (data/smol/build.py: the facts and the held-out split)


def main() -> None:
    heldout = [json.loads(x) for x in open(os.path.join(ROOT, "data", "smol", "heldout.jsonl")) if x.strip()]
    answers_by_category: dict[str, list[str]] = {}
    for category, _, ref in smol_data.questions():
        pool = answers_by_category.setdefault(category, [])
        if smol_data.answer(ref) not in pool:
            pool.append(smol_data.answer(ref))
    rng = random.Random(7)
    mc, qa = [], []
    for i, row in enumerate(heldout):
        gold = row["completion"]
        distractors = rng.sample(sorted(a for a in answers_by_category[row["category"]] if a != gold), 3)
        choices = distractors + [gold]
        rng.shuffle(choices)
        mc.append({"id": i, "category": row["category"], "question": row["prompt"], "choices": choices,
                   "gold": choices.index(gold)})
        qa.append({"id": i, "category": row["category"], "question": row["prompt"], "answer": gold.rstrip(".")})
    for name, rows in (("smol_mc.jsonl", mc), ("smol_qa.jsonl", qa)):
        with open(os.path.join(HERE, name), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"smol_mc {len(mc)}, smol_qa {len(qa)}")


if __name__ == "__main__":
    main()
