"""What researchers expect around a run: DVCLive curves read back through `dvc exp show` / `dvc plots diff`, the
other trackers refused clearly when absent, report figures byte-identical on rerun, a quiet CLI (--verbose: all)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from conftest import tiny_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def alignkit(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "alignkit", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=900)


def test_dvclive_curves_of_two_experiments_read_back_through_dvc(tmp_path, tiny_model, tiny_data):
    """A tiny DVC project with one dpo stage tracked by DVCLive, as the pipelines declare it; two `dvc exp run -S`
    experiments; `dvc exp show` lists each one's DVCLive metrics, `dvc plots diff` draws both curves."""
    dvc = os.path.join(os.path.dirname(sys.executable), "dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    recipe = tiny_recipe(repo, tiny_model, tiny_data, "dpo", max_steps=2, report_to="dvclive", metrics_dir="metrics",
                         output_dir="build/dpo")
    (repo / "params.yaml").write_text("beta: 0.1\n")
    stage = {"cmd": f"{sys.executable} -m alignkit dpo --config {recipe} --beta ${{beta}}", "params": ["beta"],
             "outs": ["build/dpo", {"metrics/dvclive/dpo": {"cache": False}}]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({
        "stages": {"dpo": stage}, "metrics": ["metrics/dvclive/dpo/metrics.json"],
        "plots": [{"metrics/dvclive/dpo/plots/metrics": {"x": "step"}}]}))
    run = lambda *a: subprocess.run(a, cwd=repo, capture_output=True, text=True, timeout=900)  # noqa: E731
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        assert run(*cmd).returncode == 0
    for beta in ("0.1", "0.5"):
        done = run(dvc, "exp", "run", "-n", f"beta-{beta}", "-S", f"beta={beta}")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    shown = json.loads(run(dvc, "exp", "show", "--json").stdout)
    exps = {e["name"]: e for row in shown for e in (row.get("experiments") or []) for e in [e["revs"][0]]}
    assert set(exps) == {"beta-0.1", "beta-0.5"}
    summaries = {n: e["data"]["metrics"]["metrics/dvclive/dpo/metrics.json"]["data"] for n, e in exps.items()}
    assert all(s["step"] >= 2 and "margins" in s["train"]["rewards"] for s in summaries.values())
    assert summaries["beta-0.1"]["train"]["rewards"] != summaries["beta-0.5"]["train"]["rewards"]
    diff = run(dvc, "plots", "diff", "beta-0.1", "beta-0.5", "--json")
    plot = json.loads(diff.stdout)["data"]["metrics/dvclive/dpo/plots/metrics/train/loss.tsv"][0]
    points = plot["content"]["data"]["values"]
    assert {p["rev"] for p in points} == {"beta-0.1", "beta-0.5"} and {p["step"] for p in points} == {"1", "2"}


def test_unknown_and_missing_trackers_are_one_line_errors(tmp_path, tiny_model, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", report_to="dvclve")
    r = alignkit("sft", "--config", recipe)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].endswith("report_to: unknown tracker 'dvclve'; nearest valid: dvclive "
                                                      "(any of none, dvclive, tensorboard, wandb, mlflow)")
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", report_to="wandb")
    r = alignkit("sft", "--config", recipe)
    assert r.returncode == 2 and "report_to: wandb needs the wandb package, which is not installed" in r.stderr


def test_tensorboard_writes_event_files_under_runs(tmp_path, tiny_model, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", max_steps=2, report_to="tensorboard")
    r = alignkit("sft", "--config", recipe, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    events = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "runs" / "sft") for f in fs]
    # one file with the training curve and the final evaluation: transformers' callback opened a second file for
    # the evaluation, which replaced the first when both were opened within the same second
    assert len(events) == 1
    written = open(events[0], "rb").read()
    assert written.count(b"train/loss") == 2 and b"eval/loss" in written


def test_quiet_by_default_everything_with_verbose(tmp_path, tiny_model, tiny_data):
    """Third-party noise (NOISE, NOISY_WARNINGS in command.py) is gone by default; alignkit's own log stays;
    --verbose shows the libraries' INFO logs and warnings again."""
    from alignkit.command import NOISE

    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", max_steps=1)
    quiet = alignkit("dpo", "--config", recipe)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    text = quiet.stdout + quiet.stderr
    assert not any(start in text for _, start in NOISE) and "FutureWarning" not in text
    assert "INFO alignkit: dpo done" in text and "examples/s" not in text  # no dataset progress bars
    # --verbose in an environment a quiet alignkit left behind (a launch's child, or a process that had called a
    # command's main() in-process, as another test in the same pytest worker may have) still shows everything
    inherited = subprocess.run([sys.executable, "-c", "import json, os; from alignkit.command import configure_output; "
                                "configure_output([]); print(json.dumps(dict(os.environ)))"],
                               capture_output=True, text=True, check=True)
    inherited = json.loads(inherited.stdout)
    assert inherited.get("HF_DATASETS_DISABLE_PROGRESS_BARS") == "1"
    loud = alignkit("dpo", "--config", recipe, "--verbose", env=inherited)
    assert loud.returncode == 0, loud.stderr[-2000:]
    text = loud.stdout + loud.stderr
    assert "FutureWarning" in text and "examples/s" in text and "INFO alignkit: dpo done" in text


def test_report_figures_are_embedded_and_byte_identical_on_rerun(tmp_path):
    metrics = os.path.join(ROOT, "metrics")
    args = ["report", "--evaluate", f"{metrics}/evaluate.json", "--stages", f"{metrics}/sft.json",
            f"{metrics}/dpo.json", "--mtbench", f"{metrics}/mtbench.json", "--out", str(tmp_path / "r.md")]
    first = alignkit(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    pngs = sorted(os.listdir(tmp_path / "r"))
    assert pngs == ["evaluation.png", "mtbench.png", "training.png"]
    page = (tmp_path / "r.md").read_text()
    assert all(f"](r/{p})" in page for p in pngs)
    before = {p: (tmp_path / "r" / p).read_bytes() for p in pngs}
    assert all(b[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in b for b in before.values())
    assert alignkit(*args).returncode == 0
    assert {p: (tmp_path / "r" / p).read_bytes() for p in pngs} == before


def test_sweep_figure_from_dvc_exp_show(tmp_path):
    """beta_sweep.sh's figure: the points come from `dvc exp show --json` (its shape, as DVC 3.67 prints it)."""
    from alignkit.evaluation.figures import main, sweep_points

    def exp(name, beta, margin):
        return {"revs": [{"name": name, "data": {"params": {"params.yaml": {"data": {"dpo": {"beta": beta}}}},
                                                 "metrics": {"metrics/dpo.json": {"data": {"eval_reward_margin":
                                                                                           margin}}}}}]}

    shown = [{"rev": "workspace", "experiments": None},
             {"rev": "abc", "experiments": [exp("beta-0.5", 0.5, 3.0), exp("beta-0.05", 0.05, 1.0)]}]
    assert sweep_points(shown, "dpo.beta", "params.yaml", "metrics/dpo.json") == [
        {"dpo.beta": 0.5, "eval_reward_margin": 3.0}, {"dpo.beta": 0.05, "eval_reward_margin": 1.0}]
    (tmp_path / "exp.json").write_text(json.dumps(shown))
    args = [str(tmp_path / "exp.json"), "dpo.beta", str(tmp_path / "beta.png"), "eval_reward_margin"]
    assert main(["sweep", *args]) == 0
    first = (tmp_path / "beta.png").read_bytes()
    assert first[:4] == b"\x89PNG" and main(["sweep", *args]) == 0 and (tmp_path / "beta.png").read_bytes() == first


def test_dvclive_records_no_wall_times(tmp_path, tiny_model, tiny_data, monkeypatch):
    """Whatever the Trainer reports in seconds (runtimes, rates, the evaluation's model preparation time, which
    appears when an evaluation prepares the model before training does) stays out of the files DVC hashes."""
    from trl import SFTConfig

    from alignkit.config import load_recipe
    from alignkit.train.tracking import stage_dvclive

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", metrics_dir="metrics"), [], SFTConfig)
    callback = stage_dvclive(recipe, "sft", main=True)
    callback.setup(None, type("State", (), {"is_world_process_zero": True, "log_history": []})(), None)
    callback.log_step(0, {"eval_loss": 2.5, "eval_model_preparation_time": 0.0206, "eval_runtime": 1.2,
                          "eval_samples_per_second": 40.0, "eval_steps_per_second": 10.0})
    callback.log_step(1, {"loss": 2.4, "num_tokens": 240.0, "grad_norm": 1.0})
    callback.live.end()
    written = json.load(open(tmp_path / "metrics" / "dvclive" / "sft" / "metrics.json"))
    assert written["eval"] == {"loss": 2.5} and written["train"] == {"grad_norm": 1.0, "loss": 2.4}
