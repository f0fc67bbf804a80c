"""The DVC pipelines hang together: every stage's recipe exists and validates, every shipped input exists,
and the smol data builders reproduce the committed files byte for byte."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = ["dvc.yaml", *sorted(glob.glob("pipelines/*/dvc.yaml", root_dir=ROOT))]


def resolved_stages(dvc_file: str) -> dict:
    """Stages with `${...}` filled in from the params.yaml beside the dvc.yaml (as DVC does)."""
    text = open(os.path.join(ROOT, dvc_file)).read()
    params_path = os.path.join(ROOT, os.path.dirname(dvc_file), "params.yaml")
    params = yaml.safe_load(open(params_path)) if os.path.exists(params_path) else {}

    def lookup(match):
        value = params
        for part in match.group(1).split("."):
            value = value[part]
        return str(value)

    return yaml.safe_load(re.sub(r"\$\{([^}]+)\}", lookup, text))["stages"]


@pytest.mark.parametrize("dvc_file", PIPELINES)
def test_stage_recipes_exist_and_validate(dvc_file):
    from alignkit.cli import check

    recipes = []
    for stage in resolved_stages(dvc_file).values():
        recipes += re.findall(r"--config (\S+)", stage["cmd"])
        for dep in stage.get("deps", []):
            if dep.startswith("data/") or dep.startswith("src/"):
                assert os.path.exists(os.path.join(ROOT, dep)), f"{dvc_file}: missing input {dep}"
    assert recipes
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        assert check(recipes) == 0
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("builder", ["data/smol/build.py", "data/gpt2-nl/build.py"])
def test_data_builders_reproduce_committed_files(builder, tmp_path):
    import shutil

    src_dir = os.path.join(ROOT, os.path.dirname(builder))
    shutil.copytree(src_dir, tmp_path / "d")
    for f in glob.glob(str(tmp_path / "d" / "*.jsonl")):
        os.remove(f)
    subprocess.run([sys.executable, str(tmp_path / "d" / "build.py")], check=True, capture_output=True)
    for f in sorted(glob.glob(os.path.join(src_dir, "*.jsonl"))):
        assert open(f, "rb").read() == open(tmp_path / "d" / os.path.basename(f), "rb").read(), f


def test_dvc_accepts_the_committed_metrics_and_plots(tmp_path):
    """`dvc metrics show` reads every pipeline's metrics and `dvc plots show` renders the plots."""
    dvc = os.path.join(os.path.dirname(sys.executable), "dvc")
    shown = subprocess.run([dvc, "metrics", "show", "--json"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    for path in ("metrics/evaluate.json", "metrics/mtbench.json", "metrics/dpo.json", "metrics/lmeval.json",
                 "metrics/alpacaeval.json",
                 "metrics/smol-rs/evaluate.json", "metrics/gpt2-nl-twin/cpt.json"):
        assert path in text, path
    assert "reference_f1_score" in text and "eval_perplexity" in text
    plots = subprocess.run([dvc, "plots", "show", "--json", "-o", str(tmp_path / "plots")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert plots.returncode == 0, plots.stderr
    for path in ("metrics/sft_log.csv", "metrics/dpo_log.csv", "metrics/mtbench_categories.csv"):
        assert path in plots.stdout, path


def test_anima_questions_from_belle_format(tmp_path):
    belle = tmp_path / "eval_set.json"
    belle.write_text(json.dumps([
        {"question": "1+1=?", "std_answer": "2", "class": "math"},
        {"question": "写一首诗", "std_answer": "", "class": "generation"},  # no reference: no pair possible
        {"question": "Capital of France?", "std_answer": "Paris.", "class": "open qa"}], ensure_ascii=False))
    out = tmp_path / "q.jsonl"
    script = os.path.join(ROOT, "data", "anima", "questions.py")
    done = subprocess.run([sys.executable, script, "--in", str(belle), "--out", str(out)], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "2 questions with references, 1 without" in done.stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0] == {"prompt": "1+1=?", "completion": "2", "category": "math"} and len(rows) == 2
    belle.write_text(json.dumps([{"question": "ok", "std_answer": "ok"}, {"std_answer": "no question"}]))
    done = subprocess.run([sys.executable, script, "--in", str(belle), "--out", str(out)], capture_output=True,
                          text=True)
    assert done.returncode != 0 and "eval_set.json: row 2: field 'question': missing or empty" in done.stderr
