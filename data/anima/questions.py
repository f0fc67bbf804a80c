"""Questions with reference answers → prompt/completion jsonl for `alignkit pairs` (Anima's DPO data recipe).

    python data/anima/questions.py --in external/belle_eval_set.json --out build/anima-33b/data/questions.jsonl

Accepts Belle's evaluation set (a JSON list, or jsonl, of {question, std_answer, class}) and rows that already
have prompt/completion. Rows without a reference answer cannot make a pair and are skipped (counted); a row
that is not an object, or whose question is missing, fails with its row number.
"""

import argparse
import json
import os
import sys


def read_rows(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"{path}: row {i}: not valid JSON ({e.msg})")
    return rows


def convert(rows: list, path: str) -> tuple[list[dict], int]:
    out, skipped = [], 0
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            sys.exit(f"{path}: row {i}: expected an object with 'question' and 'std_answer'")
        question = row.get("question", row.get("prompt"))
        answer = row.get("std_answer", row.get("completion"))
        if not isinstance(question, str) or not question.strip():
            sys.exit(f"{path}: row {i}: field 'question': missing or empty")
        if not isinstance(answer, str) or not answer.strip():
            skipped += 1
            continue
        out.append({"prompt": question.strip(), "completion": answer.strip(), "category": row.get("class", "")})
    return out, skipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--in", dest="source", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not os.path.isfile(args.source):
        sys.exit(f"{args.source}: not found (Belle's eval_set.json: github.com/LianjiaTech/BELLE, eval/)")
    rows, skipped = convert(read_rows(args.source), args.source)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(args.out + ".tmp", args.out)
    print(f"{len(rows)} questions with references, {skipped} without (skipped) → {args.out}")


if __name__ == "__main__":
    main()
