"""The report's figures: PNGs made with matplotlib (headless Agg), committed with the report and embedded in it, so
a code-hosting web page shows them. Byte-identical on rerun: no timestamp or software version in the files, the
fonts matplotlib ships, a fixed size and resolution — DVC sees nothing change when nothing did.

- training.png   per training stage, its loss over steps (train; eval where evaluated), and for preference
                 stages the implicit-reward margin and accuracy (train and held-out)
- evaluation.png the evaluate stage's metrics, base / SFT / DPO side by side
- mtbench.png    MT-Bench-style scores per category and model
- beta.png       for a β sweep: each held-out metric against β
"""

from __future__ import annotations

import csv
import json
import os
import sys

DPI = 100
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]  # one per model, in report order


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display, the same pixels everywhere
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 9, "svg.hashsalt": "alignkit",
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def save(fig, path: str) -> str:
    """Write `fig` as a PNG without metadata that changes between runs or machines (matplotlib's version)."""
    plt = _pyplot()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
    return path


def read_curve(path: str, y: str) -> tuple[list[float], list[float]]:
    """(steps, values) of column `y` from a training log CSV or a DVCLive .tsv; ([], []) where it is absent."""
    if not os.path.isfile(path):
        return [], []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    points = [(float(r["step"]), float(r[y])) for r in rows if r.get(y) not in (None, "")]
    return [s for s, _ in points], [v for _, v in points]


def stage_curves(metrics_path: str) -> dict:
    """The curves of one training stage, from the files beside its metrics (metrics/<stage>.json):
    <stage>_log.csv (every logged step) and DVCLive's eval curves (dvclive/<stage>/plots/metrics/eval/); without
    those, the final held-out value from the metrics file at the last step."""
    folder, name = os.path.split(os.path.splitext(metrics_path)[0])
    final = json.load(open(metrics_path)) if os.path.isfile(metrics_path) else {}
    log = os.path.join(folder, f"{name}_log.csv")
    evals = os.path.join(folder, "dvclive", name, "plots", "metrics", "eval")
    curves = {}
    for key, column, tsv, metric in (
            ("loss", "loss", "loss.tsv", "eval_loss"),
            ("reward margin", "rewards/margins", "rewards/margins.tsv", "eval_reward_margin"),
            ("reward accuracy", "rewards/accuracies", "rewards/accuracies.tsv", "eval_reward_accuracy")):
        train = read_curve(log, column)
        held_out = read_curve(os.path.join(evals, tsv), tsv[:-4].split("/")[-1])
        if not held_out[0] and final.get(metric) is not None and final.get("train_steps"):
            held_out = ([float(final["train_steps"])], [float(final[metric])])
        if train[0] or held_out[0]:
            curves[key] = {"train": train, "eval": held_out}
    return curves


def training_figure(stages: dict[str, str], path: str) -> str | None:
    """One row per training stage (name → its metrics file), one column per curve it has."""
    curves = {name: stage_curves(p) for name, p in stages.items()}
    curves = {name: c for name, c in curves.items() if c}
    if not curves:
        return None
    plt = _pyplot()
    cols = max(len(c) for c in curves.values())
    fig, axes = plt.subplots(len(curves), cols, figsize=(3.6 * cols, 2.6 * len(curves)), squeeze=False)
    for row, (name, stage) in enumerate(curves.items()):
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(stage):
                ax.axis("off")
                continue
            key = list(stage)[col]
            (xs, ys), (ex, ey) = stage[key]["train"], stage[key]["eval"]
            if xs:
                ax.plot(xs, ys, color=COLORS[0], linewidth=1.2, label="train")
            if ex:
                ax.plot(ex, ey, color=COLORS[1], marker="o", markersize=4, linewidth=1, label="held-out")
            ax.set_title(f"{name}: {key}")
            ax.set_xlabel("step")
            ax.legend(frameon=False)
    fig.tight_layout()
    return save(fig, path)


def grouped_bars(ax, groups: list[str], series: dict[str, list], ylabel: str | None = None) -> None:
    """Bars for each group, one per series (model), in the series' order."""
    width = 0.8 / max(1, len(series))
    for i, (model, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [0 if v is None else v for v in values], width, label=model, color=COLORS[i % len(COLORS)])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30 if max(map(len, groups)) > 8 else 0, ha="right"
                       if max(map(len, groups)) > 8 else "center")
    if ylabel:
        ax.set_ylabel(ylabel)


def evaluation_figure(evaluation: dict, rows: list[tuple[str, str]], path: str) -> str | None:
    """The evaluate stage's metrics (one panel each, their scales differ), the models side by side."""
    models = list(evaluation)
    present = [(key, label) for key, label in rows if any(evaluation[m].get(key) is not None for m in models)]
    if not models or not present:
        return None
    plt = _pyplot()
    cols = min(3, len(present))
    n_rows = -(-len(present) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.6 * cols, 2.6 * n_rows), squeeze=False)
    for i, ax in enumerate(a for r in axes for a in r):
        if i >= len(present):
            ax.axis("off")
            continue
        key, label = present[i]
        values = [evaluation[m].get(key) for m in models]
        ax.bar(range(len(models)), [0 if v is None else v for v in values],
               color=[COLORS[j % len(COLORS)] for j in range(len(models))])
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models)
        ax.set_title(label if len(label) <= 40 else key, fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def mtbench_figure(mt: dict, path: str) -> str | None:
    models = list(mt["models"])
    cats = sorted({c for m in mt["models"].values() for c in m["categories"]})
    if not cats:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(cats) * max(1, len(models)) / 2), 3.2))
    grouped_bars(ax, cats, {m: [mt["models"][m]["categories"].get(c) for c in cats] for m in models},
                 ylabel=mt["score"])
    ax.set_title("MT-Bench-style score per category")
    ax.legend(frameon=False, ncol=len(models))
    fig.tight_layout()
    return save(fig, path)


def sweep_figure(points: list[dict], param: str, metrics: list[str], path: str) -> str | None:
    """Each metric against `param` (points: one dict per experiment, sorted by the parameter)."""
    points = sorted((p for p in points if p.get(param) is not None), key=lambda p: float(p[param]))
    metrics = [m for m in metrics if any(p.get(m) is not None for p in points)]
    if not points or not metrics:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        xs = [float(p[param]) for p in points if p.get(metric) is not None]
        ys = [float(p[metric]) for p in points if p.get(metric) is not None]
        ax.plot(xs, ys, marker="o", color=COLORS[0])
        ax.set_xlabel(param)
        ax.set_title(metric)
    fig.tight_layout()
    return save(fig, path)


def sweep_points(exp_show: list, param: str, params_file: str, metrics_file: str) -> list[dict]:
    """One point per experiment of `dvc exp show --json`: {param: value, metric: value, ...}."""
    points = []
    for row in exp_show:
        for exp in row.get("experiments") or []:
            data = exp["revs"][0].get("data") or {}
            value = data.get("params", {}).get(params_file, {}).get("data", {})
            for part in param.split("."):
                value = value.get(part, {}) if isinstance(value, dict) else None
            metrics = data.get("metrics", {}).get(metrics_file, {}).get("data", {})
            if value not in (None, {}):
                points.append({param: value, **metrics})
    return points


def main(argv=None) -> int:
    """python -m alignkit.evaluation.figures sweep EXP_SHOW.json PARAM OUT.png METRIC... (pipelines/beta_sweep.sh)"""
    _, source, param, out, *metrics = argv if argv is not None else sys.argv[1:]
    with open(source) as f:
        points = sweep_points(json.load(f), param, "params.yaml", "metrics/dpo.json")
    made = sweep_figure(points, param, metrics, out)
    print(f"figure: {made}" if made else "figure: no experiment had the parameter")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
