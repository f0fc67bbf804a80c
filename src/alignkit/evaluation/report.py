"""`report` stage: one markdown page with the base/SFT/DPO metrics tables, figures and before/after generations.

    alignkit report --evaluate metrics/evaluate.json --stages metrics/sft.json metrics/dpo.json \
        --generations build/eval/generations.jsonl --out reports/smol.md

The figures (evaluation/figures.py) go beside the page, in a folder of its name (reports/smol/*.png), and the page
embeds them by relative path, so they show wherever the repository is browsed.
"""

from __future__ import annotations

import argparse
import json
import os

from alignkit.artifacts import write_text
from alignkit.command import run_cli
from alignkit.data import read_jsonl
from alignkit.errors import UsageError
from alignkit.evaluation import figures

ROWS = [
    ("task_agreement", "task agreement (greedy answer == reference)"),
    ("task_contains", "reference contained in the answer"),
    ("answer_words", "mean answer length (words)"),
    ("pair_accuracy", "held-out pairs: log p(chosen) > log p(rejected)"),
    ("reward_accuracy", "held-out implicit-reward accuracy vs. base"),
    ("reward_margin", "held-out implicit-reward margin vs. base"),
]


def _cell(value) -> str:
    return "–" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def _one_line(text: str, limit: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


DEFAULT_INTRO = ("SmolLM2-135M-Instruct → SFT (LoRA) → DPO (LoRA), evaluated on held-out questions the model never "
                 "trained on. Produced by `dvc repro`; numbers are deterministic on CPU.")


def mtbench_lines(mt: dict) -> list[str]:
    """Per-category table of an mtbench metrics file; says which judge scored it."""
    models = list(mt["models"])
    judge = mt["judge"]
    who = judge["backend"] + (f" ({judge['model']})" if judge.get("model") else "")
    lines = ["", f"## MT-Bench-style ({mt['score']}, judge: {who})", "",
             "| category | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    cats = sorted({c for m in mt["models"].values() for c in m["categories"]})
    for key in ("overall", "turn_1", "turn_2"):
        lines.append(f"| **{key}** | " + " | ".join(_cell(mt["models"][m][key]) for m in models) + " |")
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(_cell(mt["models"][m]["categories"].get(c)) for m in models) + " |")
    for name, r in mt.get("pairwise", {}).items():
        lines += ["", f"Pairwise {name.replace('_vs_', ' vs ')}: win rate {_cell(r['win_rate'])} "
                      f"({r['wins']} wins, {r['losses']} losses, {r['ties']} ties, {r['unparseable']} unparseable)."]
    return lines


def lmeval_lines(lm: dict, order: list[str] | None = None) -> list[str]:
    """One row per (task, metric), one column per model (in the report's model order); stderr beside the score."""
    models = [m for m in (order or []) if m in lm["models"]] + [m for m in lm["models"] if m not in (order or [])]
    h = lm["harness"]
    lines = ["", f"## lm-eval ({h['tasks']}, lm-eval {h['lm_eval']}"
                 + (", chat template" if h.get("apply_chat_template") else "") + ")", "",
             "| task | metric | shots | " + " | ".join(models) + " |", "|---|---|---|" + "---|" * len(models)]
    tasks = sorted({t for m in lm["models"].values() for t in m})
    for task in tasks:
        metrics = sorted({k for m in lm["models"].values() for k in m.get(task, {}) if "_stderr" not in k})
        for metric in metrics:
            stderr = metric.replace(",", "_stderr,", 1)
            cells = []
            for m in models:
                row = lm["models"][m].get(task, {})
                cells.append(_cell(row.get(metric)) + (f" ± {row[stderr]:.3f}" if row.get(stderr) is not None else ""))
            shots = h.get("tasks_run", {}).get(task, {}).get("n_shot")
            lines.append(f"| {task} | {metric.split(',')[0]} | {_cell(shots)} | " + " | ".join(cells) + " |")
    return lines


def alpacaeval_lines(ae: dict) -> list[str]:
    lines = ["", f"## AlpacaEval ({ae['n_instructions']} instructions, reference: {ae['reference']})", ""]
    if ae.get("skipped"):
        return lines + [f"Judging skipped: {ae['skipped']}. Answers are in the stage's outputs, ready to annotate."]
    lines += ["| model | win rate | length-controlled win rate | wins | draws | total |", "|---|---|---|---|---|---|"]
    for name, r in ae["models"].items():
        lines.append(f"| {name} | {_cell(r.get('win_rate'))} | {_cell(r.get('length_controlled_winrate'))} | "
                     f"{_cell(r.get('n_wins'))} | {_cell(r.get('n_draws'))} | {_cell(r.get('n_total'))} |")
    judge = ae["annotator"]
    return lines + ["", f"Annotator: {judge['config']} ({judge.get('model') or 'its default model'})."]


def figure(figs: dict, key: str, caption: str) -> list[str]:
    return ["", f"![{caption}]({figs[key]})"] if key in figs else []


def render(evaluation: dict, stages: dict, generations: list[dict], n_examples: int,
           title: str = "smol pipeline report", intro: str = DEFAULT_INTRO, mtbench: dict | None = None,
           lmeval: dict | None = None, alpacaeval: dict | None = None, figs: dict | None = None) -> str:
    """The page; `figs`: figure name (evaluation, training, mtbench) → its path relative to the page."""
    figs = figs or {}
    # a pipeline without the evaluate stage (Zephyr: MT-Bench and lm-eval only) takes its models from those
    models = list(evaluation) or list((mtbench or {}).get("models", {})) or list((lmeval or {}).get("models", {}))
    lines = [f"# {title}", "", intro]
    if evaluation:
        lines += ["", "## Evaluation", "", "| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for key, label in ROWS:
            lines.append(f"| {label} | " + " | ".join(_cell(evaluation[m].get(key)) for m in models) + " |")
        lines += figure(figs, "evaluation", "evaluation metrics per model")
    if stages:
        lines += ["", "## Training", "", "| stage | train loss | eval loss | steps | held-out reward accuracy | "
                  "held-out reward margin |", "|---|---|---|---|---|---|"]
        for name, m in stages.items():
            accuracy = m.get("eval_reward_accuracy", m.get("eval_pairwise_accuracy"))  # reward model: pairwise
            margin = m.get("eval_reward_margin", m.get("eval_mean_margin"))
            lines.append(f"| {name} | {_cell(m.get('train_loss'))} | {_cell(m.get('eval_loss'))} | "
                         f"{_cell(m.get('train_steps'))} | {_cell(accuracy)} | {_cell(margin)} |")
        for name, m in stages.items():
            if "eval_perplexity" in m:
                lines += ["", f"{name}: held-out perplexity {_cell(m['eval_perplexity_before'])} before → "
                              f"{_cell(m['eval_perplexity'])} after training."]
        lines += figure(figs, "training", "training curves per stage")
    if mtbench:
        lines += mtbench_lines(mtbench) + figure(figs, "mtbench", "MT-Bench-style score per category")
    if lmeval:
        lines += lmeval_lines(lmeval, models)
    if alpacaeval:
        lines += alpacaeval_lines(alpacaeval)
    if not generations:
        return "\n".join(lines) + "\n"
    # The most instructive examples: where the models disagree with each other.
    changed = [g for g in generations if len({g[m] for m in models}) > 1] or generations
    lines += ["", f"## Generations (first {min(n_examples, len(changed))} held-out prompts where the models differ)",
              "", "| prompt | reference | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for g in changed[:n_examples]:
        lines.append(f"| {_one_line(g['prompt'])} | {_one_line(g['reference'])} | "
                     + " | ".join(_one_line(g[m]) for m in models) + " |")
    return "\n".join(lines) + "\n"


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit report", description=__doc__.split("\n\n")[0])
    p.add_argument("--evaluate", default=None, help="metrics of the evaluate stage (held-out agreement, pairs)")
    p.add_argument("--stages", nargs="*", default=[], help="stage metrics files (metrics/<stage>.json)")
    p.add_argument("--generations", default=None, help="the evaluate stage's generations.jsonl")
    p.add_argument("--examples", type=int, default=6)
    p.add_argument("--title", default="smol pipeline report")
    p.add_argument("--mtbench", default=None, help="metrics of the mtbench stage")
    p.add_argument("--lmeval", default=None, help="metrics of the lmeval stage")
    p.add_argument("--alpacaeval", default=None, help="metrics of the alpacaeval stage")
    p.add_argument("--intro", default=DEFAULT_INTRO)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    optional = [x for x in (args.evaluate, args.generations, args.mtbench, args.lmeval, args.alpacaeval) if x]
    if not any((args.evaluate, args.mtbench, args.lmeval)):
        raise UsageError("nothing to report: give --evaluate, --mtbench or --lmeval")
    for path in [*args.stages, *optional]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"report input not found: {path}")
    evaluation = json.load(open(args.evaluate)) if args.evaluate else {}
    stages = {}
    for path in args.stages:
        with open(path) as f:
            stages[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
    generations = read_jsonl(args.generations) if args.generations else []
    extra = {key: json.load(open(getattr(args, key))) if getattr(args, key) else None
             for key in ("mtbench", "lmeval", "alpacaeval")}
    figs = make_figures(args.out, evaluation, dict(zip(stages, args.stages)), extra["mtbench"])
    text = render(evaluation, stages, generations, args.examples, args.title, args.intro, figs=figs, **extra)
    write_text(args.out, text)
    print(f"report: {args.out}")
    return 0


def make_figures(out: str, evaluation: dict, stage_files: dict[str, str], mtbench: dict | None) -> dict:
    """The report's PNGs in <out without .md>/ (stale ones removed); name → path relative to the page."""
    folder = os.path.splitext(out)[0]
    made = {
        "evaluation": figures.evaluation_figure(evaluation, ROWS, os.path.join(folder, "evaluation.png"))
        if evaluation else None,
        "training": figures.training_figure(stage_files, os.path.join(folder, "training.png")),
        "mtbench": figures.mtbench_figure(mtbench, os.path.join(folder, "mtbench.png")) if mtbench else None,
    }
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".png") and name[:-4] not in {k for k, v in made.items() if v}:
            os.remove(os.path.join(folder, name))
    return {k: os.path.relpath(v, os.path.dirname(out) or ".") for k, v in made.items() if v}


def main(argv=None) -> int:
    return run_cli("report", run, argv)
