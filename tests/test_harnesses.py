"""lm-eval and AlpacaEval stages: local lm-eval tasks on the tiny model, the task plans, and AlpacaEval's own
annotator code talking to the OpenAI-compatible stand-in server over HTTP."""

from __future__ import annotations

import json
import os

import pytest

from alignkit.evaluation import alpacaeval, lmeval
from standin import OpenAIStandIn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL_TASKS = os.path.join(ROOT, "eval", "lm_eval", "smol")


def test_leaderboard_v1_plan_is_the_open_llm_leaderboard_set():
    assert lmeval.task_plan("leaderboard-v1") == [
        ("arc_challenge", 25, "acc_norm,none"), ("hellaswag", 10, "acc_norm,none"), ("mmlu", 5, "acc,none"),
        ("truthfulqa_mc2", 0, "acc,none"), ("winogrande", 5, "acc,none"), ("gsm8k", 5, "exact_match,strict-match")]
    assert lmeval.task_plan("arc_easy:0, gsm8k:5,hellaswag") == [
        ("arc_easy", 0, None), ("gsm8k", 5, None), ("hellaswag", None, None)]


def test_headline_metric_and_its_stderr_only_for_planned_suites():
    results = {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.01,
                         "exact_match,flexible-extract": 0.3, "sample_len": 1319}}
    assert lmeval.select_metrics(results, [("gsm8k", 5, "exact_match,strict-match")]) == {
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.01}}
    assert set(lmeval.select_metrics(results, [("gsm8k", 5, None)])["gsm8k"]) == {
        "exact_match,strict-match", "exact_match_stderr,strict-match", "exact_match,flexible-extract"}


def test_local_task_data_resolves_relative_to_the_yaml_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = lmeval.local_task_configs(SMOL_TASKS)
    assert [c["task"] for c in configs] == ["smol_mc", "smol_qa"]
    for c in configs:
        assert os.path.isfile(c["dataset_kwargs"]["data_files"]["test"])
    bad = tmp_path / "tasks"
    bad.mkdir()
    (bad / "t.yaml").write_text("task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: nope.jsonl}}\n")
    with pytest.raises(FileNotFoundError, match=r"t\.yaml: data_files\.test: .*nope\.jsonl does not exist"):
        lmeval.local_task_configs(str(bad))
    with pytest.raises(FileNotFoundError, match="task directory not found"):
        lmeval.task_plan("eval/lm_eval/missing")


class _AnswerKeyLM:
    """An lm-eval LM that knows the smol answers: `style` picks how it phrases them."""

    def __new__(cls, style):
        from lm_eval.api.model import LM

        answers = {r["question"]: r["answer"] for r in map(json.loads, open(os.path.join(SMOL_TASKS, "smol_qa.jsonl")))}

        class AnswerKey(LM):
            def loglikelihood(self, requests):  # the reference choice is the likeliest
                out = []
                for r in requests:
                    context, continuation = r.args
                    q = context.split("Question: ", 1)[1].split("\nAnswer:")[0]
                    out.append((0.0 if continuation.strip().rstrip(".") == answers[q] else -5.0, False))
                return out

            def generate_until(self, requests):
                said = {"padded": " {}.", "verbose": " The answer is {}.", "wrong": " Nothing."}[style]
                return [said.format(answers[r.args[0]]) for r in requests]

            def loglikelihood_rolling(self, requests):
                raise NotImplementedError

        return AnswerKey()


@pytest.mark.parametrize("style,expected", [("padded", 1.0), ("verbose", 0.0), ("wrong", 0.0)])
def test_smol_tasks_strip_whitespace_then_exact_match(style, expected):
    import lm_eval

    out = lm_eval.simple_evaluate(model=_AnswerKeyLM(style), tasks=lmeval.local_task_configs(SMOL_TASKS),
                                  bootstrap_iters=0, log_samples=False)
    # " Paris." (leading space, full stop) is an exact match once stripped; a sentence is not.
    assert out["results"]["smol_qa"]["exact_match,strip"] == expected
    assert out["results"]["smol_mc"]["acc,none"] == 1.0
    assert out["n-samples"]["smol_qa"]["effective"] == 36


def test_lmeval_stage_on_the_tiny_model_is_reproducible(tiny_model, tmp_path, monkeypatch):
    from lm_eval.tasks._index import TaskIndex

    scanned, build = [], TaskIndex.build

    def recording_build(paths, **kwargs):
        scanned.extend(paths)
        return build(paths, **kwargs)

    monkeypatch.setattr(TaskIndex, "build", staticmethod(recording_build))

    def run(tag):
        out, samples = tmp_path / f"{tag}.json", tmp_path / f"samples-{tag}"
        assert lmeval.main(["--base", tiny_model, "--models", f"merged={tiny_model}", "--tasks", SMOL_TASKS,
                            "--apply_chat_template", "--limit", "6", "--batch_size", "4",
                            "--out", str(out), "--samples", str(samples)]) == 0
        return out, samples

    out, samples = run("a")
    # the project's task configs: lm-eval's thousands of bundled task YAMLs are not indexed (once per model, they
    # were a third of the smol stage)
    assert scanned == []
    metrics = json.loads(out.read_text())
    assert set(metrics["models"]) == {"base", "merged"}
    assert metrics["models"]["base"] == metrics["models"]["merged"]  # the same weights, two loading paths
    scores = metrics["models"]["base"]
    assert 0.0 <= scores["smol_mc"]["acc,none"] <= 1.0 and 0.0 <= scores["smol_qa"]["exact_match,strip"] <= 1.0
    assert metrics["harness"]["tasks_run"]["smol_qa"] == {"n_shot": 0, "samples": 6, "version": 1.0}
    rows = [json.loads(x) for x in (samples / "base" / "smol_qa.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == list(range(6))
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # written atomically
    manifest = json.loads((samples / "manifest.json").read_text())
    assert manifest["stage"] == "lmeval" and manifest["judge"]["harness"]["lm_eval"] == "0.4.13"
    assert manifest["inputs"]["tasks"]["sha256"] and manifest["inputs"]["base"]["sha256"]
    out2, samples2 = run("b")
    assert out2.read_bytes() == out.read_bytes()
    assert (samples2 / "base" / "smol_mc.jsonl").read_bytes() == (samples / "base" / "smol_mc.jsonl").read_bytes()


def test_alpacaeval_without_annotator_writes_answers_and_skips(tiny_model, tmp_path, capsys):
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text("".join(json.dumps({"instruction": q}) + "\n" for q in ["Say hello.", "Name a color."]))
    metrics = tmp_path / "alpacaeval.json"
    rc = alpacaeval.main(["--base", tiny_model, "--models", f"merged={tiny_model}", "--instructions",
                          str(instructions), "--reference", "base", "--max_new_tokens", "4", "--backend", "hf",
                          "--out_dir", str(tmp_path / "out"), "--metrics", str(metrics)])
    assert rc == 0
    assert "judging skipped: no annotator configured" in capsys.readouterr().err
    m = json.loads(metrics.read_text())
    assert m["skipped"].startswith("no annotator configured") and "models" not in m
    outputs = json.loads((tmp_path / "out" / "outputs" / "merged.json").read_text())
    assert [o["instruction"] for o in outputs] == ["Say hello.", "Name a color."]
    assert {o["generator"] for o in outputs} == {"merged"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stage"] == "alpacaeval" and manifest["inputs"]["instructions"]["path"] == str(instructions)


def test_alpacaeval_bad_inputs_are_one_line_errors(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "ok"}) + "\n" + json.dumps({"prompt": "no instruction"}) + "\n")
    base = ["--base", tiny_model, "--out_dir", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json")]
    assert alpacaeval.main(base + ["--instructions", str(bad), "--reference", "base"]) == 2
    assert "bad.jsonl: row 2: field 'instruction'" in capsys.readouterr().err
    assert alpacaeval.main(base + ["--instructions", str(bad)]) == 2
    assert "needs --reference" in capsys.readouterr().err
    assert alpacaeval.main(base + ["--instructions", str(bad), "--reference", "dpo"]) == 2
    assert "not an evaluated model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="nearest: chatgpt"):
        alpacaeval.annotator_config("chatgtp", None, "x", str(tmp_path))


def test_alpacaeval_annotates_through_the_stand_in_server(tmp_path, monkeypatch, caplog):
    server = OpenAIStandIn()

    def prefer_longer(body):  # a judge that always prefers the model's (longer) answer, wherever AlpacaEval put it
        prompt = json.dumps(body["messages"])
        output_a = prompt.split("## Output (a):")[-1].split("## Output (b):")[0]
        return "Output (a)" if "longer" in output_a else "Output (b)"

    server.mode, server.reply = "reply", prefer_longer
    monkeypatch.setenv("STANDIN_KEY", "sk-alpaca-secret-42")
    reference = [{"instruction": f"Question {i}?", "output": f"Short {i}.", "generator": "sft", "dataset": "t"}
                 for i in range(4)]
    model = [dict(r, output=f"A longer answer number {i}.", generator="dpo") for i, r in enumerate(reference)]
    try:
        result = alpacaeval.annotate(model, reference, name="dpo", annotator="chatgpt", annotator_model="judge-x",
                                     url=server.url, key_env="STANDIN_KEY", cache_dir=str(tmp_path / "ann"))
    finally:
        server.close()
    assert result["win_rate"] == 100.0 and result["n_wins"] == 4 and result["n_total"] == 4
    assert len(server.requests) == 4
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-alpaca-secret-42"
    assert req["body"]["model"] == "judge-x" and "Question" in json.dumps(req["body"]["messages"])
    written = "".join(p.read_text() for p in (tmp_path / "ann").rglob("*") if p.is_file())
    assert "Output (" in written and "sk-alpaca-secret-42" not in written
    # a rerun is served from the annotation cache: no second request
    again = alpacaeval.annotate(model, reference, name="dpo", annotator="chatgpt", annotator_model="judge-x",
                                url="http://127.0.0.1:9/v1", key_env="STANDIN_KEY", cache_dir=str(tmp_path / "ann"))
    assert again == result
    assert "sk-alpaca-secret-42" not in caplog.text


def test_answer_backend_choice_and_model_kinds(tiny_model, tmp_path):
    import importlib.util

    from alignkit.errors import UsageError
    from alignkit.generation import pick_backend
    from alignkit.models import split_models

    if importlib.util.find_spec("vllm") is None:  # this machine and CI: transformers answers
        assert pick_backend("auto") == "hf"
        with pytest.raises(UsageError, match="vLLM is not installed"):
            pick_backend("vllm")
    with pytest.raises(UsageError, match="unknown generation backend 'tgi'"):
        pick_backend("tgi")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert split_models({"dpo": str(adapter), "merged": tiny_model}) == ({"dpo": str(adapter)}, {"merged": tiny_model})
    with pytest.raises(UsageError, match="model 'x': .*empty holds neither a PEFT adapter"):
        split_models({"x": str(tmp_path / "empty")})


def test_both_answer_backends_get_the_same_prompt_ids_with_one_bos(tiny_model):
    """A tokenizer that adds BOS (Llama, Mistral) and a template that writes it: text handed to vLLM came out with
    two. Both backends now get `prompt_ids` — what transformers' generate sees, unpadded, is what vLLM is given."""
    from tokenizers.processors import TemplateProcessing

    from alignkit.generation import generate, prompt_ids, vllm_prompts
    from alignkit.models import load_for_inference

    model, tokenizer = load_for_inference(tiny_model)
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)])
    prompts = [[{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a colour."}]]
    text = tokenizer.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True)
    assert tokenizer(text)["input_ids"][:2] == [bos, bos]  # the hazard: special tokens on top of the template's
    ids = prompt_ids(tokenizer, prompts)
    assert all(row[0] == bos and row[1] != bos for row in ids)
    assert vllm_prompts(tokenizer, prompts) == [{"prompt_token_ids": row} for row in ids]

    seen = []
    real_generate = model.generate

    def spy(**kw):
        seen.extend(r[m.bool()].tolist() for r, m in zip(kw["input_ids"], kw["attention_mask"]))
        return real_generate(**kw)

    model.generate = spy  # this instance only: records what the transformers backend feeds the model
    generate(model, tokenizer, prompts, max_new_tokens=2)
    assert sorted(seen) == sorted(ids)


def test_one_answer_engine_at_a_time(tiny_model, tmp_path):
    """The base (with its adapters) and each merged model are separate engines; the loaded one is released before
    the next loads. vLLM is not installed here: its engine is replaced by a stand-in that counts live engines (the
    code that decides when to open and release is the real one); transformers is checked with real models."""
    import gc
    import weakref

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.generation import Generator

    adapter = str(tmp_path / "adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(adapter)
    models = {"dpo": adapter, "merged": tiny_model}

    class StandInEngine:
        live = 0

        def __init__(self, path):
            assert StandInEngine.live == 0, "an engine started while another was loaded"
            StandInEngine.live += 1
            self.path = path

        def shutdown(self):
            StandInEngine.live -= 1

    opened = []

    class StandInVLLM(Generator):
        @staticmethod
        def new_vllm_engine(path, adapters):
            opened.append((path, sorted(adapters)))
            return StandInEngine(path)

    vllm = StandInVLLM(tiny_model, models, backend="hf")
    vllm.backend = "vllm"  # pick_backend refuses vllm where it is not installed
    for name in ["base", "dpo", "merged", "merged", "base"]:
        engine, _ = vllm.engine(name)
        assert StandInEngine.live == 1 and engine.path == (tiny_model if name != "merged" else models["merged"])
    assert opened == [(tiny_model, ["dpo"]), (tiny_model, []), (tiny_model, ["dpo"])]
    vllm.release()
    assert StandInEngine.live == 0

    hf = Generator(tiny_model, models, backend="hf")
    first, _ = hf("base", [[{"role": "user", "content": "Hi"}]], max_new_tokens=3)
    base_engine = weakref.ref(hf.engine("dpo")[0])  # the same engine: base and adapters share it
    hf("merged", [[{"role": "user", "content": "Hi"}]], max_new_tokens=3)
    gc.collect()
    assert base_engine() is None, "the base model stayed loaded beside the merged one"
    again, _ = hf("base", [[{"role": "user", "content": "Hi"}]], max_new_tokens=3)
    assert again == first


def test_every_leaderboard_v1_task_resolves_in_lm_evals_own_registry_offline():
    """The GPU pipelines' `--tasks leaderboard-v1` names real lm-eval tasks: each is in lm-eval's task index (its
    installed YAMLs — nothing downloaded), the headline metric is one the task computes, and a filtered metric
    ("exact_match,strict-match") names a filter the task defines."""
    from lm_eval.tasks import TaskManager

    index = TaskManager().task_index
    for name, shots, metric in lmeval.task_plan("leaderboard-v1"):
        entry = index.get(name)
        assert entry is not None, f"{name}: not an lm-eval task or group"
        if entry.kind.name == "GROUP":  # mmlu: a group of 57 subject tasks, each computing acc
            assert name == "mmlu" and metric == "acc,none" and entry.yaml_path.exists()
            continue
        cfg = entry.cfg
        measured, _, filtered = metric.partition(",")
        assert measured in [m["metric"] for m in cfg["metric_list"]] or (
            measured == "acc_norm" and cfg["output_type"] == "multiple_choice"), name
        assert filtered == "none" or filtered in [f["name"] for f in cfg.get("filter_list", [])], name
        assert cfg.get("dataset_path") and shots >= 0


def test_the_stock_lm_eval_cli_runs_a_project_task_from_the_repository_root_with_an_adapter(tiny_model, tmp_path):
    """`lm_eval --include_path eval/lm_eval/smol --tasks smol_mc --model_args pretrained=…,peft=…` from the repository
    root (it failed: the task's data path was relative to the YAML) gives alignkit lmeval's number."""
    import subprocess
    import sys

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # a LoRA with non-zero B: the adapter changes the scores
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    out = tmp_path / "alignkit.json"
    assert lmeval.main(["--base", tiny_model, "--models", f"lora={adapter}", "--tasks", SMOL_TASKS, "--limit", "12",
                        "--batch_size", "4", "--out", str(out), "--samples", str(tmp_path / "samples")]) == 0
    ours = json.loads(out.read_text())["models"]["lora"]["smol_mc"]
    stock = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf", "--model_args",
                            f"pretrained={tiny_model},peft={adapter},dtype=float32", "--include_path",
                            "eval/lm_eval/smol", "--tasks", "smol_mc", "--limit", "12", "--batch_size", "4",
                            "--output_path", str(tmp_path / "stock")], cwd=ROOT, capture_output=True, text=True)
    assert stock.returncode == 0, stock.stderr[-3000:]
    results = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "stock") for f in fs if f.startswith("results")]
    theirs = json.load(open(results[0]))["results"]["smol_mc"]
    assert {k: round(theirs[k], 6) for k in ("acc,none", "acc_norm,none")} == \
        {k: ours[k] for k in ("acc,none", "acc_norm,none")}
