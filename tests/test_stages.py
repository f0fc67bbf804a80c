"""SFT and DPO stages on the tiny model: golden numbers, LoRA isolation, determinism, outputs."""

from __future__ import annotations

import json
import math
import os

import pytest
from safetensors.torch import load_file

from conftest import tiny_recipe

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def run_stage(stage: str, recipe: str, *extra: str) -> dict:
    from alignkit.train import dpo, sft

    return {"sft": sft, "dpo": dpo}[stage].train(["--config", recipe, *extra])


def first_logged(out_dir: str, key: str = "loss") -> float:
    import csv

    with open(os.path.join(out_dir, "train_log.csv")) as f:
        return float(next(csv.DictReader(f))[key])


@pytest.mark.parametrize("loss_type,expected", [("sigmoid", math.log(2)), ("hinge", 1.0)])
def test_dpo_step1_loss_closed_form(tmp_path, tiny_model, tiny_data, loss_type, expected):
    # At step 1 the LoRA adapter is zero-initialised, so policy == reference and every log-ratio is 0.
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", max_steps=1, loss_type=[loss_type])
    run_stage("dpo", recipe)
    assert first_logged(str(tmp_path / "out-dpo")) == pytest.approx(expected, abs=1e-6)


def test_dpo_outputs_and_metrics(tmp_path, tiny_model, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", metrics_dir=str(tmp_path / "metrics"))
    metrics = run_stage("dpo", recipe)
    out = tmp_path / "out-dpo"
    files = set(os.listdir(out))
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.json", "train_log.csv",
            "config.yaml", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    for key in ("eval_reward_accuracy", "eval_reward_margin", "eval_loss", "train_loss"):
        assert key in metrics
    assert json.load(open(out / "metrics.json")) == metrics
    assert json.load(open(tmp_path / "metrics" / "dpo.json")) == metrics
    assert (tmp_path / "metrics" / "dpo_log.csv").read_text().startswith("step,")
    # the model card names what it is, how it was made, and carries every metric
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\nbase_model: " + tiny_model)
    assert "| stage | `dpo` |" in card and "| beta | 0.1 |" in card and "LoRA r 4 α 8" in card
    assert f"| eval_reward_accuracy | {metrics['eval_reward_accuracy']} |" in card
    assert "AutoPeftModelForCausalLM" in card
    # nothing but the final directory is left next to it
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out-dpo")] == []


def test_lora_changes_only_adapter_weights(tmp_path, tiny_model, tiny_data):
    before = load_file(os.path.join(tiny_model, "model.safetensors"))
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", merge_adapter=True)
    run_stage("sft", recipe)
    out = tmp_path / "out-sft"
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    # the base weights on disk are untouched, and the merged model differs from the base exactly where LoRA sits
    after = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert all((before[k] == after[k]).all() for k in before)
    merged = load_file(str(out / "merged" / "model.safetensors"))
    changed = {k for k in before if not (before[k] == merged[k]).all()}
    assert changed and all(k.endswith("proj.weight") for k in changed)
    assert "model.embed_tokens.weight" not in changed


def test_two_runs_same_seed_bit_identical(tmp_path, tiny_model, tiny_data):
    a = tiny_recipe(tmp_path / "a", tiny_model, tiny_data, "dpo") if (tmp_path / "a").mkdir() is None else None
    b = tiny_recipe(tmp_path / "b", tiny_model, tiny_data, "dpo") if (tmp_path / "b").mkdir() is None else None
    ma, mb = run_stage("dpo", a), run_stage("dpo", b)
    wa = load_file(str(tmp_path / "a" / "out-dpo" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "out-dpo" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert {k: v for k, v in ma.items() if "seconds" not in k} == {k: v for k, v in mb.items() if "seconds" not in k}


def test_precomputed_reference_gives_identical_losses(tmp_path, tiny_model, tiny_data):
    (tmp_path / "on").mkdir(), (tmp_path / "pre").mkdir()
    online = tiny_recipe(tmp_path / "on", tiny_model, tiny_data, "dpo", precompute_ref_log_probs=False)
    pre = tiny_recipe(tmp_path / "pre", tiny_model, tiny_data, "dpo", precompute_ref_log_probs=True)
    run_stage("dpo", online), run_stage("dpo", pre)
    import csv

    def losses(d):
        with open(d / "out-dpo" / "train_log.csv") as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]

    lo, lp = losses(tmp_path / "on"), losses(tmp_path / "pre")
    assert len(lo) == 3 and lo == pytest.approx(lp, abs=1e-6)


def test_dpo_from_sft_adapter(tmp_path, tiny_model, tiny_data):
    sft_recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft")
    run_stage("sft", sft_recipe)
    dpo_recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", use_peft=False,
                             adapter_path=str(tmp_path / "out-sft"), max_steps=1)
    run_stage("dpo", dpo_recipe)
    # the reference is a frozen copy of the SFT adapter, so step 1 is again the closed form
    assert first_logged(str(tmp_path / "out-dpo")) == pytest.approx(math.log(2), abs=1e-6)
    adapter = load_file(str(tmp_path / "out-dpo" / "adapter_model.safetensors"))
    assert adapter and not any(".ref." in k for k in adapter)


def test_saved_configs_do_not_depend_on_the_process(tmp_path, tiny_model, tiny_data):
    """Reruns in new processes (new string-hash seeds, online or offline) write byte-identical directories."""
    import subprocess
    import sys

    outs = []
    for i, (seed, offline) in enumerate((("1", "1"), ("2", "0"))):
        (tmp_path / str(i)).mkdir()
        recipe = tiny_recipe(tmp_path / str(i), tiny_model, tiny_data, "sft", max_steps=1)
        env = dict(os.environ, PYTHONHASHSEED=seed, HF_HUB_OFFLINE=offline)
        subprocess.run([sys.executable, "-m", "alignkit", "sft", "--config", recipe], check=True, env=env,
                       capture_output=True)
        outs.append(tmp_path / str(i) / "out-sft")
    for name in ("adapter_config.json", "tokenizer_config.json", "adapter_model.safetensors", "metrics.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


FAULTS_PER_STEP = """
import resource, sys, torch
from alignkit.train.stage import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():  # a DPO step's LM-head pattern on CPU: a 128 MiB logit tile and temporaries of the same size
    tile = torch.ones(1024, 32768)
    return (torch.exp(tile - 1) * tile).sum(-1)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def test_cpu_training_reuses_freed_memory_instead_of_faulting_it_in_again():
    # glibc's default maps fresh zeroed pages for every large tensor and unmaps them on free: each step faults in
    # its 3 x 128 MiB again (~98k faults of 4 KiB pages). Kept, steps settle on memory already faulted in.
    import subprocess
    import sys

    def faults(mode):
        run = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": SRC})
        return [int(n) for n in run.stdout.split()]

    default, kept = faults("default"), faults("keep")
    assert min(default[5:]) > 90_000
    assert sum(kept[5:]) < 0.1 * sum(default[5:]), (default, kept)


@pytest.mark.parametrize("keep", [True, False])
def test_the_recipe_decides_whether_cpu_training_keeps_freed_memory(tmp_path, tiny_model, tiny_data, monkeypatch,
                                                                    keep):
    from alignkit.train import sft, stage

    calls = []
    monkeypatch.setattr(stage, "keep_freed_memory", lambda: calls.append(1) or True)
    recipe = sft.SPEC.parse(["--config", tiny_recipe(tmp_path, tiny_model, tiny_data, "sft"),
                             "--cpu_keep_freed_memory", str(keep).lower()])
    train_ds, eval_ds, _, tok, model = stage.load_inputs(recipe, sft.SPEC.data_kind)
    stage.make_trainer(stage.import_object(sft.SPEC.trainer), recipe, model, tok, train_ds, eval_ds)
    assert calls == ([1] if keep else [])


def test_rows_cut_or_dropped_by_truncation_are_counted_and_none_left_is_one_clear_error(tmp_path, tiny_model,
                                                                                           tiny_data):
    """TRL drops a preference row whose prompt alone fills max_length (silently) and dies in torch.cat() when none is
    left: the stage counts dropped and cut rows per split, and refuses before any weights load when none would
    remain."""
    from alignkit.errors import RecipeError
    from alignkit.models import load_tokenizer
    from alignkit.train import dpo

    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", max_steps=1)
    parsed = dpo.SPEC.parse(["--config", recipe])
    tokenizer = load_tokenizer(parsed)
    from alignkit.data import load_splits

    train, test, _ = load_splits(parsed.data, "preference", seed=parsed.train.seed)
    prompts = sorted(dpo.prompt_length(tokenizer, r) for r in train)
    cut = prompts[len(prompts) // 2] + 1  # most prompts are shorter: kept, their replies cut; the rest are dropped
    metrics = run_stage("dpo", recipe, "--max_length", str(cut))
    dropped = sum(p >= cut for p in prompts)
    assert 0 < dropped < len(prompts)
    assert metrics["train_rows_dropped_by_truncation"] == dropped and metrics["train_rows"] == len(prompts) - dropped
    assert 0 < metrics["train_rows_truncated"] <= len(prompts) - dropped  # rows kept, their replies cut
    assert metrics["eval_rows_dropped_by_truncation"] == sum(dpo.prompt_length(tokenizer, r) >= cut for r in test)
    with pytest.raises(RecipeError, match=rf"max_length {prompts[0]} leaves no train row: .*longest has "
                                          rf"{prompts[-1]} tokens"):
        dpo.SPEC.train(["--config", recipe, "--max_length", str(prompts[0]), "--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    full = run_stage("dpo", recipe, "--output_dir", str(tmp_path / "full"))
    assert full["train_rows_dropped_by_truncation"] == full["train_rows_truncated"] == 0
