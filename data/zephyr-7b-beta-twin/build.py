"""Writes the Zephyr-7b-β twin's data (stdlib only, deterministic): `python data/zephyr-7b-beta-twin/build.py`.

Two local dataset repositories in the exact schema and split names of the hub sets the real recipes name, so the
twin recipes load them through the same `datasets.load_dataset(path, split=...)` call a hub name takes (the split
names come from each repository's README, as on the hub):
  ultrachat_200k/           HuggingFaceH4/ultrachat_200k: prompt, prompt_id, messages; train_sft, test_sft
  ultrafeedback_binarized/  HuggingFaceH4/ultrafeedback_binarized: prompt, prompt_id, chosen, rejected, messages,
                            score_chosen, score_rejected; train_prefs, test_prefs
The rows are the smol pipeline's short factual questions (data/smol/build.py): SFT teaches the terse reference
answer; each preference pair prefers it to the full-sentence answer SmolLM2 gives by itself.
"""

import hashlib
import importlib.util
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("smol_build", os.path.join(HERE, "..", "smol", "build.py"))
smol = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smol)

# the full-sentence answers SmolLM2-135M-Instruct tends to give: the rejected side of each pair
VERBOSE = {
    "capital": "The capital city of that country is {a}, which is also its largest and best-known city.",
    "opposite": "The opposite of that word would be '{a}', as they have contrasting meanings.",
    "plural": "The plural form of that word is '{a}', which is used when there is more than one.",
    "color": "It is usually {a} in colour, although the exact shade can vary.",
    "young": "A baby of that animal is called a {a}, and it stays close to its mother.",
    "arithmetic": "If you add those two numbers together, the result you get is {a}.",
}

README = """---
configs:
- config_name: default
  data_files:
{files}
---
# {name} (alignkit twin)

Written by data/zephyr-7b-beta-twin/build.py in the schema and split names of HuggingFaceH4/{name}.
"""


def prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def write_repo(name: str, splits: dict[str, list[dict]]) -> None:
    root = os.path.join(HERE, name)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    files = ""
    for split, rows in splits.items():
        path = f"data/{split}.jsonl"
        with open(os.path.join(root, path), "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        files += f"  - split: {split}\n    path: {path}\n"
    with open(os.path.join(root, "README.md"), "w") as f:
        f.write(README.format(files=files.rstrip("\n"), name=name))


def conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def main() -> None:
    rows = smol.questions()
    random.Random(1234).shuffle(rows)
    seen, unique = set(), []
    for row in rows:
        if row[1] not in seen:
            seen.add(row[1])
            unique.append(row)
    test, sft, prefs = unique[:8], unique[8:24], unique[24:40]  # 2 optimiser steps of global batch 8 per epoch
    ultrachat = {
        split: [{"prompt": q, "prompt_id": prompt_id(q), "messages": conversation(q, smol.answer(a))}
                for _, q, a in items]
        for split, items in (("train_sft", sft), ("test_sft", test))}
    rng = random.Random(7)

    def pair(category, q, a):
        chosen, rejected = conversation(q, smol.answer(a)), conversation(q, VERBOSE[category].format(a=a))
        return {"prompt": q, "prompt_id": prompt_id(q), "chosen": chosen, "rejected": rejected, "messages": chosen,
                "score_chosen": float(rng.randint(7, 10)), "score_rejected": float(rng.randint(2, 6))}

    ultrafeedback = {"train_prefs": [pair(*r) for r in prefs], "test_prefs": [pair(*r) for r in test]}
    write_repo("ultrachat_200k", ultrachat)
    write_repo("ultrafeedback_binarized", ultrafeedback)
    print(f"ultrachat_200k: train_sft {len(sft)}, test_sft {len(test)}; "
          f"ultrafeedback_binarized: train_prefs {len(prefs)}, test_prefs {len(test)}")


if __name__ == "__main__":
    main()
