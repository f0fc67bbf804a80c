"""`make verify` / `alignkit verify`: after a rerun, says whether this machine reproduced the committed locks,
metrics and reports, and lists every difference with its size."""

from __future__ import annotations

import json
import subprocess
import sys


def git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def verify(cwd):
    return subprocess.run([sys.executable, "-m", "alignkit", "verify"], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_verify_says_reproduced_or_lists_each_difference_with_its_size(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "reports").mkdir()
    metrics = {"eval_loss": 0.690657, "train_steps": 2, "world_size": 2}
    (tmp_path / "metrics" / "dpo.json").write_text(json.dumps(metrics, indent=2))
    (tmp_path / "metrics" / "dpo_log.csv").write_text("step,loss\n1,0.693147\n2,0.691\n")
    (tmp_path / "reports" / "smol.md").write_text("# report\n| dpo | 0.691 |\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  dpo:\n    cmd: python -m alignkit dpo\n"
                                       "    outs:\n    - path: build/models/dpo\n      md5: aaa.dir\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "results")
    same = verify(tmp_path)
    assert same.returncode == 0 and "reproduced: all 4 committed result files" in same.stdout, same

    (tmp_path / "metrics" / "dpo.json").write_text(json.dumps({**metrics, "eval_loss": 0.690658}, indent=2))
    (tmp_path / "metrics" / "dpo_log.csv").write_text("step,loss\n1,0.693147\n2,0.69100001\n")
    (tmp_path / "dvc.lock").write_text((tmp_path / "dvc.lock").read_text().replace("aaa.dir", "bbb.dir"))
    differs = verify(tmp_path)
    assert differs.returncode == 1, differs
    out = differs.stdout
    assert "DIFFERS metrics/dpo.json" in out and "eval_loss: 0.690657 → 0.690658 (Δ +1e-06, 1.4e-06 relative)" in out
    assert "column loss: 1 of 2 rows differ (first: row 2, 0.691 → 0.69100001" in out
    assert "stage dpo: outs build/models/dpo differ" in out
    assert "reports/smol.md" not in out and "3 of 4 committed result files differ from HEAD" in out
