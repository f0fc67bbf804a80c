"""Writes the Anima twin's questions (stdlib only, deterministic): `python data/anima-33b-twin/build.py`.

eval_set.json is in the format of Belle's 1k evaluation set (github.com/LianjiaTech/BELLE, eval/eval_set.json), which
Anima's DPO pairs were made from: a JSON list of {question, std_answer, class}, in Chinese. 24 short factual questions (sized for a CPU twin that runs in minutes)
with a terse reference answer (the chosen side); the base model's own answer becomes the rejected side.
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

CAPITALS = [("法国", "巴黎"), ("日本", "东京"), ("意大利", "罗马"), ("西班牙", "马德里"), ("德国", "柏林"),
            ("英国", "伦敦"), ("俄罗斯", "莫斯科"), ("埃及", "开罗")]
OPPOSITES = [("大", "小"), ("高", "矮"), ("快", "慢"), ("冷", "热"), ("长", "短"), ("多", "少")]
COLOURS = [("晴天的天空", "蓝色"), ("草", "绿色"), ("雪", "白色"), ("煤", "黑色")]


def questions() -> list[dict]:
    rows = [{"question": f"{c}的首都是哪里？", "std_answer": f"{city}。", "class": "open qa"} for c, city in CAPITALS]
    rows += [{"question": f"“{a}”的反义词是什么？", "std_answer": f"{b}。", "class": "open qa"} for a, b in OPPOSITES]
    rows += [{"question": f"{thing}是什么颜色的？", "std_answer": f"{colour}。", "class": "open qa"}
             for thing, colour in COLOURS]
    rng = random.Random(0)
    for _ in range(5):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        rows.append({"question": f"{a}加{b}等于多少？", "std_answer": f"{a + b}。", "class": "math"})
    rows.append({"question": "写一首关于秋天的短诗。", "std_answer": "", "class": "generation"})  # no reference
    return rows


def main() -> None:
    rows = questions()
    with open(os.path.join(HERE, "eval_set.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(rows)} questions ({sum(1 for r in rows if r['std_answer'])} with a reference answer)")


if __name__ == "__main__":
    main()
