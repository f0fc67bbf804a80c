"""Atomic outputs, pair building, evaluation scoring and the report, on the tiny model where one is needed."""

from __future__ import annotations

import json
import os

import pytest

from alignkit.artifacts import atomic_output
from alignkit.evaluation.evaluate import completion_logps, task_scores
from alignkit.evaluation.report import render
from alignkit.prepare.pairs import build_pairs


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_output(str(final)) as tmp:
            open(os.path.join(tmp, "half.safetensors"), "w").write("x")
            raise RuntimeError("killed mid-save")
    assert os.listdir(tmp_path) == []


def test_atomic_output_replaces_previous_result(tmp_path):
    final = tmp_path / "model"
    for content in ("old", "new"):
        with atomic_output(str(final)) as tmp:
            open(os.path.join(tmp, "weights"), "w").write(content)
    assert (final / "weights").read_text() == "new" and os.listdir(tmp_path) == ["model"]


def test_a_rerun_removes_what_a_killed_stage_left_and_keeps_a_live_writers(tmp_path, tiny_model):
    """kill -9 mid-save leaves the stage's temporary sibling (no `except` runs); the stage's rerun removes it. A
    temporary of a process still running, or of another host, is not touched."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "base"
    crash = ("import os, signal, sys\nfrom alignkit.artifacts import atomic_output\n"
             "with atomic_output(sys.argv[1]) as tmp:\n"
             "    open(os.path.join(tmp, 'model.safetensors'), 'wb').write(b'half')\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", crash, str(out)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    left = [e for e in os.listdir(tmp_path) if e.startswith(".base.tmp-")]
    assert len(left) == 1  # what the issue saw: the kill's leftovers
    live = tmp_path / f".base.tmp-{__import__('socket').gethostname()}-{os.getpid()}-abcdefgh"
    elsewhere = tmp_path / ".base.tmp-othernode-12345-abcdefgh"
    live.mkdir(), elsewhere.mkdir()
    rerun = subprocess.run([sys.executable, "-m", "alignkit", "base_model", "--source", tiny_model, "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == sorted(["base", live.name, elsewhere.name]), os.listdir(tmp_path)


def test_build_pairs_drops_answers_that_agree_with_the_reference():
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in (("Capital of France?", "Paris."), ("2+2?", "4."), ("Hot?", "Cold."))]
    pairs, dropped = build_pairs(convs, ["The capital is Paris.", " 4 ", ""])
    assert dropped == 2 and len(pairs) == 1
    assert pairs[0] == {"prompt": [{"role": "user", "content": "Capital of France?"}],
                        "chosen": [{"role": "assistant", "content": "Paris."}],
                        "rejected": [{"role": "assistant", "content": "The capital is Paris."}]}


def test_pairs_from_several_question_files_equal_a_run_per_file(tmp_path, tiny_model, monkeypatch):
    """One start-up and model load for the train and held-out questions: each file's pairs, stats and manifest are
    byte for byte what a run on that file alone writes; an --out short of the questions files is refused first."""
    import shutil

    from alignkit.prepare import pairs

    files = []
    for name, questions in (("a", ["Capital of France?", "Two plus two?", "Say hi."]), ("b", ["Colour of grass?"])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": q, "completion": "Reference."}) + "\n" for q in questions))
        files.append(str(path))
    monkeypatch.chdir(tmp_path)  # both runs name their outputs alike: a manifest records its --out
    common = ["--model", tiny_model, "--chat_template", "chatml", "--max_new_tokens", "4"]
    outputs = [f"p{i}{suffix}" for i in range(2) for suffix in (".jsonl", ".stats.json", ".manifest.json")]
    for i, f in enumerate(files):
        assert pairs.main([*common, "--questions", f, "--out", f"p{i}.jsonl"]) == 0
    os.makedirs("alone")
    for name in outputs:
        shutil.move(name, os.path.join("alone", name))
    assert pairs.main([*common, "--questions", *files, "--out", "p0.jsonl"]) == 2 and not os.path.exists("p0.jsonl")
    assert pairs.main([*common, "--questions", *files, "--out", "p0.jsonl", "p1.jsonl"]) == 0
    for name in outputs:
        assert open(name).read() == open(os.path.join("alone", name)).read(), name
    assert [json.load(open(f"p{i}.stats.json"))["questions"] for i in range(2)] == [3, 1]


def test_task_scores():
    s = task_scores(["Paris.", "The capital is Tokyo.", "rome"], ["Paris.", "Tokyo.", "Madrid."])
    assert s["task_agreement"] == pytest.approx(1 / 3) and s["task_contains"] == pytest.approx(2 / 3)
    assert s["answer_words"] == pytest.approx(6 / 3)


def test_completion_logps_match_a_manual_computation(tiny_model):
    import torch

    from alignkit.models import load_for_inference

    model, tok = load_for_inference(tiny_model)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    completions = [[{"role": "assistant", "content": "Paris."}], [{"role": "assistant", "content": "No idea at all."}]]
    got = completion_logps(model, tok, [prompt, prompt], completions, batch_size=2)  # padded batch
    for value, completion in zip(got, completions):
        p_ids = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
        f_ids = tok(tok.apply_chat_template(prompt + completion, tokenize=False),
                    add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([f_ids])).logits[0]
        logp = torch.log_softmax(logits, -1)
        manual = sum(float(logp[i - 1, f_ids[i]]) for i in range(len(p_ids), len(f_ids)))
        assert value == pytest.approx(manual, abs=1e-4)


def test_completion_logps_score_only_completions_with_the_bits_of_every_position_scored(tiny_model):
    """The LM head runs only where a completion token is predicted (logits_to_keep); a model without that option
    gets every position's logits. Both give the same bits, in padded batches of different widths."""
    import torch

    from alignkit.models import load_for_inference

    class WithoutTheOption(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.device = inner, inner.device

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    model, tok = load_for_inference(tiny_model)
    prompts = [[{"role": "user", "content": "What is the capital of France?" + " Say it." * k}] for k in range(5)]
    completions = [[{"role": "assistant", "content": a}] for a in ("Paris.", "No idea at all.", "P", "Lyon, no: Paris",
                                                                   "It is Paris, on the Seine.")]
    scored_only = completion_logps(model, tok, prompts, completions, batch_size=2)
    every_position = completion_logps(WithoutTheOption(model), tok, prompts, completions, batch_size=2)
    assert scored_only == every_position and len(set(scored_only)) == 5


def test_report_renders_tables_and_differing_generations():
    evaluation = {"base": {"task_agreement": 0.0, "pair_accuracy": 0.5},
                  "dpo": {"task_agreement": 0.5, "pair_accuracy": 1.0, "reward_accuracy": 1.0}}
    gens = [{"prompt": "Same?", "reference": "Yes.", "base": "Yes.", "dpo": "Yes."},
            {"prompt": "Capital | of France?", "reference": "Paris.", "base": "The capital\nis Paris.",
             "dpo": "Paris."}]
    text = render(evaluation, {"dpo": {"train_loss": 0.3, "eval_reward_accuracy": 1.0}}, gens, 5)
    assert "| task agreement (greedy answer == reference) | 0.000 | 0.500 |" in text
    assert "| held-out implicit-reward accuracy vs. base | – | 1.000 |" in text
    assert "Capital \\| of France?" in text and "The capital is Paris." in text and "Same?" not in text
    json.dumps(text)


def test_report_mtbench_table_names_the_judge():
    mt = {"judge": {"backend": "reference-f1", "model": None}, "score": "reference_f1_score",
          "models": {"base": {"overall": 2.0, "turn_1": 2.5, "turn_2": 1.5,
                              "categories": {"math": 3.0, "writing": 1.0}},
                     "dpo": {"overall": 4.0, "turn_1": 4.5, "turn_2": 3.5,
                             "categories": {"math": 5.0, "writing": 3.0}}},
          "pairwise": {"dpo_vs_sft": {"win_rate": 0.75, "wins": 2, "losses": 0, "ties": 1, "unparseable": 0}}}
    text = render({"base": {}}, {}, [], 0, mtbench=mt)
    assert "## MT-Bench-style (reference_f1_score, judge: reference-f1)" in text
    assert "| math | 3.000 | 5.000 |" in text and "| **overall** | 2.000 | 4.000 |" in text
    assert "Pairwise dpo vs sft: win rate 0.750 (2 wins, 0 losses, 1 ties, 0 unparseable)." in text


def test_report_lmeval_and_alpacaeval_tables():
    lm = {"harness": {"tasks": "eval/lm_eval/smol", "lm_eval": "0.4.13", "apply_chat_template": True,
                      "tasks_run": {"smol_qa": {"n_shot": 0}}},
          "models": {"base": {"smol_qa": {"exact_match,strip": 0.0, "exact_match_stderr,strip": 0.0}},
                     "dpo": {"smol_qa": {"exact_match,strip": 0.444444, "exact_match_stderr,strip": 0.083992}}}}
    skipped = {"n_instructions": 16, "reference": "sft", "skipped": "no annotator configured (--annotator)"}
    text = render({"base": {}}, {}, [], 0, lmeval=lm, alpacaeval=skipped)
    assert "## lm-eval (eval/lm_eval/smol, lm-eval 0.4.13, chat template)" in text
    assert "| smol_qa | exact_match | 0 | 0.000 ± 0.000 | 0.444 ± 0.084 |" in text
    assert "Judging skipped: no annotator configured (--annotator)." in text
    judged = {"n_instructions": 4, "reference": "sft", "annotator": {"config": "chatgpt", "model": None},
              "models": {"dpo": {"win_rate": 75.0, "length_controlled_winrate": None, "n_wins": 3.0, "n_draws": 0.0,
                                 "n_total": 4.0}}}
    text = render({"base": {}}, {}, [], 0, alpacaeval=judged)
    assert "| dpo | 75.000 | – | 3.000 | 0.000 | 4.000 |" in text and "Annotator: chatgpt" in text


def test_report_of_a_pipeline_without_the_evaluate_stage(tmp_path):
    """Zephyr's pipeline has MT-Bench and lm-eval but no evaluate stage: the report takes its models from them."""
    import json

    from alignkit.evaluation import report

    mt = {"judge": {"backend": "reference-f1", "model": None}, "score": "reference_f1_score",
          "models": {m: {"overall": v, "turn_1": v, "turn_2": v, "categories": {"math": v}}
                     for m, v in (("base", 1.0), ("sft", 2.0), ("dpo", 3.0))}}
    (tmp_path / "mt.json").write_text(json.dumps(mt))
    (tmp_path / "sft.json").write_text(json.dumps({"train_loss": 2.5, "eval_loss": 1.9, "train_steps": 9}))
    out = tmp_path / "r.md"
    assert report.main(["--stages", str(tmp_path / "sft.json"), "--mtbench", str(tmp_path / "mt.json"),
                        "--out", str(out)]) == 0
    text = out.read_text()
    assert "## Evaluation" not in text and "## Generations" not in text
    assert "| **overall** | 1.000 | 2.000 | 3.000 |" in text and "| sft | 2.500 | 1.900 | 9 |" in text
    assert report.main(["--stages", str(tmp_path / "sft.json"), "--out", str(out)]) == 2  # nothing to report


def test_content_digests_follow_the_files_even_when_remembered(tmp_path):
    import hashlib

    from alignkit.artifacts import sha256_path

    weights = tmp_path / "model" / "weights.bin"
    weights.parent.mkdir()
    weights.write_bytes(b"a" * 64)
    first = sha256_path(str(weights.parent))
    entry = f"weights.bin\0{hashlib.sha256(b'a' * 64).hexdigest()}\n"
    assert first == hashlib.sha256(entry.encode()).hexdigest() == sha256_path(str(weights.parent))
    stat = os.stat(weights)
    weights.write_bytes(b"b" * 64)  # same size; a new mtime, as any rewrite gets
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert sha256_path(str(weights.parent)) not in (first, None)


def test_a_save_of_empty_missing_or_mis_shaped_tensors_fails(tmp_path):
    import torch
    from safetensors.torch import save_file

    from alignkit.errors import SaveError
    from alignkit.train.saving import verify_saved

    expected = {"model.layers.0.mlp.up_proj.weight": (64, 32), "model.norm.weight": (32,)}
    with pytest.raises(SaveError, match="no weights were written"):
        verify_saved(str(tmp_path), expected)
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(0), "model.norm.weight": torch.zeros(32)},
              str(tmp_path / "model.safetensors"))  # what a main-process save of ZeRO-3 partitions writes
    with pytest.raises(SaveError, match=r"1 empty tensors, e.g. model.layers.0.mlp.up_proj.weight"):
        verify_saved(str(tmp_path), expected)
    save_file({"model.norm.weight": torch.zeros(16)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(SaveError, match=r"1 mis-shaped, e.g. model.norm.weight \(16,\) \(model \(32,\)\); 1 missing"):
        verify_saved(str(tmp_path), expected)
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 32), "model.norm.weight": torch.zeros(32)},
              str(tmp_path / "model.safetensors"))
    verify_saved(str(tmp_path), expected)
