"""Distributed training on CPU: 2 processes (DDP via torchrun, DeepSpeed ZeRO-3 via accelerate launch) give the
same losses as 1 process with the same global batch — the recipe's `global_batch_size` makes 1 process
accumulate 4 micro-batches of 2 and each of 2 processes accumulate 2. Tolerance: 1e-3 relative on every logged
loss (measured: identical at step 1, ~3e-5 after; reduction order differs across processes).

The world size is asserted from the stage's own metrics: accelerate's MULTI_CPU mode has been seen to run one
process silently.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], tmp_path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(out_dir) -> list[float]:
    with open(os.path.join(out_dir, "train_log.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_model, tiny_data):
    tmp = tmp_path_factory.mktemp("dist")
    recipe = tiny_recipe(tmp, tiny_model, tiny_data, "sft", global_batch_size=8, per_device_train_batch_size=2,
                         max_steps=3, seed=3)
    run([sys.executable, "-m", "alignkit", "sft", "--config", recipe, "--output_dir", str(tmp / "one")], tmp)
    metrics = json.load(open(tmp / "one" / "metrics.json"))
    assert (metrics["world_size"], metrics["gradient_accumulation_steps"]) == (1, 4)
    return recipe, tmp


def check_two_processes(out_dir, one_dir) -> None:
    metrics = json.load(open(os.path.join(out_dir, "metrics.json")))
    assert (metrics["world_size"], metrics["gradient_accumulation_steps"]) == (2, 2)
    assert losses(out_dir) == pytest.approx(losses(one_dir), rel=1e-3)
    assert len(losses(out_dir)) == 3
    ours, theirs = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (out_dir, one_dir))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    # one process wrote the output, atomically: nothing else beside it
    parent = os.path.dirname(out_dir)
    assert not [p for p in os.listdir(parent) if ".tmp-" in p]


def torchrun(stage: str, args: list[str], tmp) -> None:
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "alignkit", stage, *args], tmp)


def deepspeed_cpu_config(tmp, zero_stage: int = 3) -> str:
    """An accelerate config for DeepSpeed on 2 CPU processes. The DeepSpeed config sets the ZeRO-3 persistence
    threshold to 0: by default parameters under 1e5 elements — every one of the tiny model's — stay whole on every
    rank, and ZeRO-3's partitioning (what makes a main-process-only merge or save write (0,) tensors) never shows."""
    ds = tmp / f"ds_zero{zero_stage}.json"
    ds.write_text(json.dumps({
        "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": False}, "fp16": {"enabled": False}}))
    config = tmp / f"zero{zero_stage}_cpu.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config: {{deepspeed_config_file: {ds}, zero3_init_flag: false}}\n"
        f"num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nmain_process_port: {free_port()}\n"
        "rdzv_backend: static\nsame_network: true\nuse_cpu: true\n")
    return str(config)


def accelerate(config: str, stage: str, args: list[str], tmp) -> subprocess.CompletedProcess:
    return run([os.path.join(BIN, "accelerate"), "launch", "--config_file", config, "-m", "alignkit", stage, *args],
               tmp)


def test_ddp_two_processes_match_one(single_process):
    recipe, tmp = single_process
    torchrun("sft", ["--config", recipe, "--output_dir", str(tmp / "ddp")], tmp)
    check_two_processes(str(tmp / "ddp"), str(tmp / "one"))


def test_deepspeed_zero3_two_processes_match_one(single_process):
    recipe, tmp = single_process
    accelerate(deepspeed_cpu_config(tmp), "sft", ["--config", recipe, "--output_dir", str(tmp / "zero3")],
               tmp)
    check_two_processes(str(tmp / "zero3"), str(tmp / "one"))


def stored_logps(directory) -> dict:
    out = {}
    for split in ("train", "test"):
        with open(os.path.join(directory, f"{split}.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                out[(split, row["row"], row["key"])] = (row["ref_chosen_logps"], row["ref_rejected_logps"])
    return out


@pytest.fixture(scope="module")
def reference_one_process(tmp_path_factory, tiny_model, tiny_data):
    tmp = tmp_path_factory.mktemp("ref")
    recipe = tiny_recipe(tmp, tiny_model, tiny_data, "dpo", global_batch_size=8, per_device_train_batch_size=2,
                         per_device_eval_batch_size=2, max_steps=3, seed=3)
    run([sys.executable, "-m", "alignkit", "ref_logps", "--config", recipe, "--ref_logps", str(tmp / "ref-one")], tmp)
    run([sys.executable, "-m", "alignkit", "dpo", "--config", recipe, "--output_dir", str(tmp / "dpo-one")], tmp)
    return recipe, tmp


@pytest.mark.parametrize("launcher", ["ddp", "zero3"])
def test_reference_logps_two_processes_equal_one(reference_one_process, launcher):
    """TRL's reference pass on 2 ranks: in-memory datasets used to get a per-process cache file that rank 1 could
    not open ('Failed to open local file /tmp/hf_datasets-…'). Both the ref_logps stage and DPO's own precompute."""
    recipe, tmp = reference_one_process
    ref_dir, dpo_dir = tmp / f"ref-{launcher}", tmp / f"dpo-{launcher}"
    ref_args = ["--config", recipe, "--ref_logps", str(ref_dir)]
    dpo_args = ["--config", recipe, "--output_dir", str(dpo_dir)]
    if launcher == "ddp":
        torchrun("ref_logps", ref_args, tmp)
        torchrun("dpo", dpo_args, tmp)
    else:
        config = deepspeed_cpu_config(tmp)
        accelerate(config, "ref_logps", ref_args, tmp)
        accelerate(config, "dpo", dpo_args, tmp)
    ours, theirs = stored_logps(ref_dir), stored_logps(tmp / "ref-one")
    assert ours.keys() == theirs.keys() and len(ours) == 20
    for key, values in theirs.items():
        assert ours[key] == pytest.approx(values, rel=1e-5, abs=1e-6), key
    assert json.load(open(ref_dir / "manifest.json"))["world_size"] == 2
    assert not os.path.exists(tmp / f".ref-{launcher}.checkpoints")  # the shared reference-pass files are gone
    check_two_processes(str(dpo_dir), str(tmp / "dpo-one"))


def test_full_parameter_bf16_under_ddp_updates_fp32_master_weights(tmp_path, tiny_model, tiny_data):
    """bf16 with full-parameter training and no DeepSpeed: weights load in fp32 and run under bf16 autocast. In bf16
    an update of lr 5e-7 rounds away for almost every weight (a weight of 0.02 has a bf16 step of ~1e-4)."""
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", use_peft=False, dtype="auto", bf16=True,
                         use_cpu=True, learning_rate=5e-7, global_batch_size=4, per_device_train_batch_size=2,
                         max_steps=1, save_strategy="no")
    torchrun("dpo", ["--config", recipe], tmp_path)
    out = tmp_path / "out-dpo"
    assert json.load(open(out / "metrics.json"))["world_size"] == 2
    before, after = load_file(os.path.join(tiny_model, "model.safetensors")), load_file(str(out / "model.safetensors"))
    trained = [k for k in before if "embed" not in k and "norm" not in k]  # unused vocabulary rows get no gradient
    assert {after[k].dtype for k in before} == {before[k].dtype for k in before}  # fp32 as loaded
    changed = sum(int((after[k] != before[k]).sum()) for k in trained)
    assert changed == sum(before[k].numel() for k in trained)


def saved_shapes(directory) -> dict:
    from safetensors import safe_open

    shapes = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


@pytest.fixture(scope="module")
def saved_one_process(tmp_path_factory, tiny_model, tiny_data):
    tmp = tmp_path_factory.mktemp("save")
    common = dict(global_batch_size=4, per_device_train_batch_size=2, max_steps=2, seed=3)
    lora = tiny_recipe(tmp, tiny_model, tiny_data, "sft", merge_adapter=True, **common)
    (tmp / "full").mkdir()
    full = tiny_recipe(tmp / "full", tiny_model, tiny_data, "sft", use_peft=False, **common)
    for recipe, out in ((lora, "lora-one"), (full, "full-one")):
        run([sys.executable, "-m", "alignkit", "sft", "--config", recipe, "--output_dir", str(tmp / out)], tmp)
    return {"lora": lora, "full": full}, tmp


@pytest.mark.parametrize("launcher", ["ddp", "zero2", "zero3"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_nothing_saved_empty_or_partial_under_sharding(saved_one_process, launcher, kind):
    """Every tensor written on 2 processes — the adapter, the merged model (merge_adapter) and a full model — has
    the shape of the 1-process save, and the merge is the run's own adapter merged into the base: merging in memory
    under ZeRO-3 wrote (0,) tensors."""
    recipes, tmp = saved_one_process
    out = tmp / f"{kind}-{launcher}"
    args = ["--config", recipes[kind], "--output_dir", str(out)]
    if launcher == "ddp":
        torchrun("sft", args, tmp)
    else:
        accelerate(deepspeed_cpu_config(tmp, int(launcher[-1])), "sft", args, tmp)
    assert json.load(open(out / "metrics.json"))["world_size"] == 2
    one = tmp / f"{kind}-one"
    for sub in (["", "merged"] if kind == "lora" else [""]):
        ours, theirs = saved_shapes(out / sub), saved_shapes(one / sub)
        # ZeRO-3's gathered state dict also writes the tied head (the embedding's shape); one process leaves it out
        if "lm_head.weight" in ours and "lm_head.weight" not in theirs:
            assert ours.pop("lm_head.weight") == theirs["model.embed_tokens.weight"]
        assert ours and ours == theirs and all(0 not in s for s in ours.values()), sub
    if kind == "lora":  # merged = base + (alpha / r) · B A of this run's own adapter, on every LoRA layer
        base = load_file(os.path.join(json.load(open(out / "adapter_config.json"))["base_model_name_or_path"],
                                      "model.safetensors"))
        merged = load_file(str(out / "merged" / "model.safetensors"))
        adapter = load_file(str(out / "adapter_model.safetensors"))
        scale = 8 / 4  # tiny_recipe: lora_alpha 8, r 4
        lora_layers = [k.removesuffix(".lora_A.weight") for k in adapter if k.endswith(".lora_A.weight")]
        assert len(lora_layers) == 14  # 7 projections x 2 layers
        for layer in lora_layers:
            key = layer.removeprefix("base_model.model.") + ".weight"
            delta = scale * adapter[layer + ".lora_B.weight"] @ adapter[layer + ".lora_A.weight"]
            assert merged[key].allclose(base[key] + delta, atol=1e-6), key
            assert delta.abs().max() > 0


def test_full_parameter_zero3_scores_through_the_head_module_and_matches_one_process(saved_one_process):
    """Full-parameter SFT under ZeRO-3 on 2 CPU processes trains the tied LM head, which ZeRO-3 partitions: the scorer
    runs it through its own module (scoring.head_log_probs) instead of falling back to TRL's forward (whose CPU
    kernel calls MKL's vendor-dependent exp/log), and the run equals the one-process run: losses to 1e-3, every
    saved weight to 1e-4."""
    recipes, tmp = saved_one_process
    out = tmp / "full-zero3-head"
    done = accelerate(deepspeed_cpu_config(tmp), "sft", ["--config", recipes["full"], "--output_dir", str(out)], tmp)
    log = done.stdout + done.stderr
    assert "TRL's own forward" not in log, [line for line in log.splitlines() if "TRL's own forward" in line]
    assert json.load(open(out / "metrics.json"))["world_size"] == 2
    assert losses(out) == pytest.approx(losses(tmp / "full-one"), rel=1e-3)
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(tmp / "full-one" / "model.safetensors"))
    ours.pop("lm_head.weight", None)  # ZeRO-3 also writes the tied head; one process leaves it out
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-4, msg=k)


def test_preemption_through_alignkit_launch_and_accelerate_resumes_to_the_uninterrupted_result(
        tmp_path, tiny_model, tiny_data):
    """`alignkit launch` → `accelerate launch` (DeepSpeed ZeRO-3, 2 CPU processes) → SIGUSR1 to alignkit launch, as
    slurm/launch.sh sends it: both workers checkpoint and exit 75, the launcher waits for them and exits 75; the rerun
    resumes and ends with the uninterrupted run's adapter and losses. (USR1 sent on to accelerate's elastic agent used
    to kill it and orphan the workers.)"""
    import signal
    import subprocess

    from alignkit.errors import REQUEUE_EXIT
    from alignkit.train.checkpoints import checkpoint_root, last_complete_checkpoint

    config = deepspeed_cpu_config(tmp_path)
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", global_batch_size=4, per_device_train_batch_size=2,
                         max_steps=16, save_steps=4, learning_rate=5e-3, seed=5)

    def launch(out):
        return [sys.executable, "-m", "alignkit", "launch", "sft", "--config", recipe, "--accelerate_config", config,
                "--output_dir", str(out)]

    run(launch(tmp_path / "uninterrupted"), tmp_path)
    out = tmp_path / "preempted"
    proc = subprocess.Popen(launch(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    for line in proc.stdout:
        if "'loss'" in line:  # training is under way on both ranks
            proc.send_signal(signal.SIGUSR1)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == REQUEUE_EXIT, rest[-3000:]
    assert "SIGUSR1 → 2 training process(es)" in rest and rest.count("stopped by SIGUSR1 at step") == 2, rest[-3000:]
    assert not out.exists()
    runs = os.listdir(checkpoint_root(str(out)))
    stopped_at = last_complete_checkpoint(os.path.join(checkpoint_root(str(out)), runs[0]))
    assert stopped_at and int(stopped_at.rsplit("-", 1)[1]) < 16
    done = subprocess.run(launch(out), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0 and "resuming from" in done.stdout + done.stderr, done.stderr[-3000:]
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 16
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (out, tmp_path / "uninterrupted"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert losses(out) == losses(tmp_path / "uninterrupted") and len(losses(out)) == 16
