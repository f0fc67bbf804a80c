"""What every training stage shares, once: the story recipe → data → model → trainer → train → save.

A stage module (sft.py, dpo.py, orpo.py, ...) declares a `StageSpec` — its TRL config and trainer, the kind of
data it takes, its own recipe checks and metrics — and `StageSpec.train` runs the story below:

  1. recipe      YAML + CLI overrides → TRL dataclasses, unknown keys and contradictions refused
  2. data        every source normalised and validated (file, row, field), mixed, held-out split
  3. model       tokenizer + chat template, then full / LoRA / QLoRA weights (or a starting adapter)
  4. trainer     the TRL trainer with the recipe's arguments
  5. train       then evaluate on the held-out split
  6. save        atomically: weights (safetensors), metrics.json, train_log.csv, config.yaml
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import yaml

from .config import Recipe, RecipeError, load_recipe, split_config_arg

logger = logging.getLogger("alignkit")



class UsageError(ValueError):
    """Bad input to a tool stage (arguments, question or instruction files): the message says what and where."""


# Errors a user can fix from the message alone: printed as one line, exit status 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError, UsageError, FileNotFoundError, IsADirectoryError)


def user_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .judges import JudgeError
    from .reliability import TrainingDiverged

    return USER_ERRORS + (DataError, JudgeError, TrainingDiverged)


def run_cli(stage: str, body, argv) -> int:
    """Run `body(argv)`; a user error becomes `alignkit <stage>: error: <message>` and exit status 2; a
    preempted run (checkpoint saved after SIGTERM/SIGUSR1) exits with REQUEUE_EXIT."""
    from .reliability import REQUEUE_EXIT, Preempted

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    status = 1
    try:
        status = body(list(sys.argv[1:] if argv is None else argv)) or 0
        return status
    except user_errors() as e:
        print(f"alignkit {stage}: error: {e}", file=sys.stderr)
        status = 2
        return status
    except Preempted as e:
        print(f"alignkit {stage}: {e}", file=sys.stderr)
        status = REQUEUE_EXIT
        return status
    finally:
        leave_process_group(all_ranks_here=status in (0, REQUEUE_EXIT))


def leave_process_group(all_ranks_here: bool) -> None:
    """Destroy the distributed process group before the interpreter exits. A rank that exits with it open can
    abort in the communication library's threads at shutdown ("terminate called without an active exception",
    seen on a 2-rank DeepSpeed CPU run), and the elastic agent then SIGTERMs the other ranks, possibly while rank 0
    still writes. After a finished or preempted run every rank gets here: wait for all first. After an error the
    others may never arrive, so leave without waiting."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if all_ranks_here:
        with contextlib.suppress(Exception):
            dist.barrier()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def import_object(path: str):
    """'package.module:Name' → the object (TRL's experimental trainers are imported only when used)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class StageSpec:
    name: str
    config: str  # "module:ConfigClass"
    trainer: str  # "module:TrainerClass"
    data_kind: str  # alignkit.data.CONVERSATION / PREFERENCE / UNPAIRED / TEXT
    check: Callable | None = None  # check(recipe, fail): the stage's cross-field rules
    fp16_refused: str | None = None  # why this stage refuses fp16 (preference losses on log-prob differences)
    defaults: dict = field(default_factory=dict)  # the stage's defaults for keys a recipe leaves unset
    check_tokenizer: Callable | None = None  # check_tokenizer(recipe, tokenizer), before weights load
    auto_class: str | None = None  # "transformers:AutoModelFor..."; default causal LM
    model_kwargs: dict = field(default_factory=dict)  # extra from_pretrained arguments (num_labels=1 ...)
    lora_task_type: str = "CAUSAL_LM"
    metrics: Callable[[dict], dict] | None = None  # extra metrics from the held-out evaluation
    # prepare_data(recipe, tokenizer, train, eval) -> (train, eval): the stage's own columns, before weights load
    prepare_data: Callable | None = None

    def config_class(self):
        return import_object(self.config)

    def parse(self, argv: list[str], *, for_check: bool = False) -> Recipe:
        config_path, rest = split_config_arg(argv)
        recipe = load_recipe(config_path, rest, self.config_class(), stage_check=self.stage_check,
                             stage_defaults=self.defaults, for_check=for_check)
        if not for_check:
            from transformers import set_seed

            set_seed(recipe.train.seed)
        return recipe

    def stage_check(self, recipe: Recipe, fail) -> None:
        """The fp16 refusal and the stage's own check; what `alignkit check` and every run apply."""
        if self.fp16_refused and recipe.asks("fp16"):
            fail(f"fp16 is refused for {self.name.upper()}: {self.fp16_refused}; use bf16 (GPU) or fp32")
        if recipe.extras.ref_logps and self.prepare_data is None:
            fail(f"ref_logps: stored reference log-probs are read by the dpo stage only, not by {self.name}")
        if self.check is not None:
            self.check(recipe, fail)

    def train(self, argv: list[str]) -> dict:
        recipe = self.parse(argv)  # 1
        auto_class = import_object(self.auto_class) if self.auto_class else None
        train_ds, eval_ds, data_report, tokenizer, model = load_inputs(  # 2, 3
            recipe, self.data_kind, auto_class=auto_class, check_tokenizer=self.check_tokenizer,
            model_kwargs=self.model_kwargs, prepare_data=self.prepare_data,
        )
        if model is None:
            return prepared(self.name, data_report)
        trainer = make_trainer(import_object(self.trainer), recipe, model, tokenizer, train_ds, eval_ds,  # 4
                               lora_task_type=self.lora_task_type)
        truncation = truncation_metrics(trainer, {"train": len(train_ds), "eval": len(eval_ds)})
        resume = checkpoints(trainer, recipe)  # an interrupted identical run's last checkpoint, if any
        metrics, evaluation = train_and_evaluate(trainer, data_report, resume_from=resume)  # 5
        metrics.update(truncation)
        if self.metrics is not None:
            metrics.update(self.metrics(evaluation))
        return finish(self.name, recipe, trainer, tokenizer, metrics)  # 6

    def main(self, argv=None) -> int:
        return run_cli(self.name, lambda a: (self.train(a), 0)[1], argv)


def log_rows(log_history: list[dict]) -> list[dict]:
    """Per-step training log entries (not eval entries, not the final summary)."""
    return [e for e in log_history if "loss" in e and "train_runtime" not in e]


def write_log_csv(log_history: list[dict], path: str) -> None:
    rows = log_rows(log_history)
    columns = ["step"] + sorted({k for r in rows for k in r} - {"step"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def load_inputs(recipe: Recipe, kind: str, *, auto_class=None, check_tokenizer=None, model_kwargs=None,
                prepare_data=None):
    """(train, eval, data report, tokenizer, model) for a stage — cheapest first, so that a bad row, a missing
    chat template or stale stored reference log-probs fail before any weights are loaded."""
    from .data import load_splits
    from .models import load_model, load_tokenizer

    train_ds, eval_ds, report = load_splits(recipe.data, kind, seed=recipe.train.seed)
    tokenizer = load_tokenizer(recipe)
    if check_tokenizer is not None:
        check_tokenizer(recipe, tokenizer)
    if recipe.extras.prepare_only:
        return train_ds, eval_ds, report, tokenizer, None
    if prepare_data is not None:
        train_ds, eval_ds = prepare_data(recipe, tokenizer, train_ds, eval_ds)
    model = load_model(recipe, tokenizer, auto_class=auto_class, **(model_kwargs or {}))
    return train_ds, eval_ds, report, tokenizer, model


def make_trainer(trainer_cls, recipe: Recipe, model, tokenizer, train_ds, eval_ds, *, lora_task_type="CAUSAL_LM",
                 run_dir: str | None = None):
    """A TRL trainer the way every stage builds one: the recipe's args, a new LoRA adapter if `use_peft`."""
    from .models import lora_config
    from .reliability import make_callbacks

    # The Trainer writes (and creates) its output_dir: point it at this run's checkpoint directory, so that a
    # killed run never leaves anything at the stage's output path.
    recipe.train.output_dir = run_dir or checkpoint_run_dir(recipe)
    reentrant_checkpointing_for_zero3_lora(recipe)
    trainer = trainer_cls(
        model=model,
        args=recipe.train,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.model, lora_task_type),
        callbacks=make_callbacks(),
    )
    if trainer.args.device.type == "cpu" and recipe.extras.cpu_keep_freed_memory and keep_freed_memory():
        logger.info("CPU training: freed memory is kept for reuse (glibc mallopt: no mmap, no trim)")
    if trainer.args.train_sampling_strategy == "group_by_length":
        trainer.train_dataset, trainer.eval_dataset = (with_length_column(trainer.train_dataset),
                                                       with_length_column(trainer.eval_dataset))
    return trainer


def reentrant_checkpointing_for_zero3_lora(recipe: Recipe) -> None:
    """LoRA under ZeRO-3 with activation checkpointing needs reentrant checkpointing (DeepSpeed's partitioned
    parameters). TRL 1.16's DPOTrainer forces it through the old `gradient_checkpointing_kwargs`, which transformers 5
    no longer reads once the args exist, so the setting would be lost; set it under the current name, where both the
    Trainer and TRL see it (after `__post_init__` the old name refers to the same dict)."""
    t = recipe.train
    lora = recipe.model.use_peft or recipe.extras.adapter_path
    plugin = getattr(t, "deepspeed_plugin", None)
    if lora and t.activation_checkpointing and plugin is not None and plugin.zero_stage == 3:
        kwargs = dict(t.activation_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant") is False:
            logger.warning("activation_checkpointing_kwargs use_reentrant: false does not train correctly with LoRA "
                           "under ZeRO-3; using use_reentrant: true")
        kwargs["use_reentrant"] = True
        t.activation_checkpointing_kwargs = t.gradient_checkpointing_kwargs = kwargs


def keep_freed_memory() -> bool:
    """glibc hands every allocation over 32 MiB a fresh mmap and unmaps it on free, so a CPU training step faults in
    (and the kernel zeroes) the same logit tiles and activations again each time. Serve all of them from the heap and
    never trim it: freed memory is reused. Process-wide and irreversible; False (nothing changed) without glibc."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>; a trim threshold of -1 turns trimming off
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


def with_length_column(dataset):
    """`length` per row for the Trainer's length-grouped sampler, from the trainer's tokenised columns where there is
    no `input_ids` to measure (DPO: prompt + the longer of chosen and rejected — both are padded to the longest)."""
    if dataset is None or "input_ids" in dataset.column_names or "length" in dataset.column_names:
        return dataset
    prompt = [c for c in dataset.column_names if c.startswith("prompt") and c.endswith("_ids")]
    replies = [c for c in dataset.column_names if c.endswith("_ids") and c not in prompt]
    if not replies:
        return dataset

    def length(row):
        return {"length": sum(len(row[c]) for c in prompt) + max(len(row[c]) for c in replies)}

    return dataset.map(length, desc="Measuring lengths for length-grouped batches")


def truncation_metrics(trainer, given: dict[str, int]) -> dict:
    """Per split: rows the trainer dropped (TRL drops a preference row whose prompt alone fills max_length, silently)
    and, where its columns show it, rows cut to max_length (prompt + the longer reply over it)."""
    max_length = getattr(trainer.args, "max_length", None)
    metrics = {}
    for split, ds in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        if ds is None:
            continue
        dropped = given[split] - len(ds)
        metrics[f"{split}_rows_dropped_by_truncation"] = dropped
        if dropped:
            logger.warning("%s: %d of %d %s rows dropped: their prompt alone fills max_length %s", trainer.args.run_name
                           or "stage", dropped, given[split], split, max_length)
        replies = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in ds.column_names]
        if max_length and "prompt_ids" in ds.column_names and replies:
            prompt = [len(p) for p in ds["prompt_ids"]]
            longest = [max(len(r) for r in rs) for rs in zip(*(ds[c] for c in replies))]
            metrics[f"{split}_rows_truncated"] = sum(p + r > max_length for p, r in zip(prompt, longest))
    return metrics


def padding_fraction(trainer, max_batches: int = 1000) -> float:
    """Share of padding positions in the training batches as the trainer's sampler and collator make them (one
    pass, up to `max_batches`, with the torch RNG forked so training is not disturbed): what length grouping
    (`train_sampling_strategy: group_by_length`) cuts."""
    import torch

    real = total = 0
    with torch.random.fork_rng():
        torch.manual_seed(trainer.args.seed)
        for i, batch in enumerate(trainer.get_train_dataloader()):
            # attention_mask, or chosen_/rejected_attention_mask (ORPO, CPO); none when padding-free / packed
            masks = [v for k, v in batch.items() if k.endswith("attention_mask")] or \
                [torch.ones_like(v) for k, v in batch.items() if k.endswith("input_ids")]
            real, total = real + sum(int(m.sum()) for m in masks), total + sum(m.numel() for m in masks)
            if i + 1 >= max_batches:
                break
    return 1 - real / total if total else 0.0


def recipe_inputs(recipe: Recipe) -> dict[str, str]:
    """Local files and directories a run reads (hub names are recorded as such): for fingerprints and manifests."""
    inputs = {"model": recipe.model.model_name_or_path, "adapter": recipe.extras.adapter_path,
              "ref_logps": recipe.extras.ref_logps}
    for kind, specs in (("train", recipe.data.datasets), ("test", recipe.data.test_datasets)):
        for i, spec in enumerate(specs):
            inputs[f"{kind}_data_{i}"] = spec.get("path")
    return {k: v for k, v in inputs.items() if v}


def checkpoint_run_dir(recipe: Recipe) -> str:
    """`.<output>.checkpoints/<fingerprint of recipe and inputs>` beside the stage's output."""
    from .reliability import checkpoint_root, fingerprint

    resolved = recipe.resolved()
    resolved["output_dir"] = recipe.output_dir
    return os.path.join(checkpoint_root(recipe.output_dir),
                        fingerprint(resolved, list(recipe_inputs(recipe).values())))


def checkpoints(trainer, recipe: Recipe) -> str | None:
    """Check the disk can hold a checkpoint; drop checkpoints of other recipes/inputs. Returns the last complete
    checkpoint of an interrupted identical run (to resume from), or None."""
    from .reliability import check_disk, checkpoint_bytes, prepare_checkpoints

    run_dir = trainer.args.output_dir
    _, resume = prepare_checkpoints(recipe.output_dir, os.path.basename(run_dir), main=trainer.args.should_save)
    if trainer.args.save_strategy != "no":
        check_disk(run_dir, checkpoint_bytes(trainer.model, trainer.args.save_only_model), "a checkpoint")
    if resume:
        logger.info("resuming from %s", resume)
    return resume


def prepared(stage: str, data_report, **extra) -> dict:
    """What a `prepare_only` run reports: the data checked and cached, no weights loaded."""
    metrics = {"prepared": True, **data_report.as_metrics("data"), **extra}
    logger.info("%s prepare_only: data and tokenizer checked and cached, nothing trained: %s", stage,
                json.dumps(metrics))
    return metrics


def train_and_evaluate(trainer, data_report, resume_from: str | None = None) -> tuple[dict, dict]:
    """Train (resuming from a checkpoint when given), then evaluate on the held-out split.
    Returns (the metrics every stage reports, raw eval metrics)."""
    from .reliability import Preempted

    from transformers import set_seed

    # Training randomness (dropout, a length-grouped order) must follow from the seed alone, not from how much of the
    # global RNG building the trainer consumed (TRL's reference pass does; reading stored log-probs does not).
    set_seed(trainer.args.seed)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.time() - start
    stopped = [cb for cb in trainer.callback_handler.callbacks if getattr(cb, "stopped_at", None) is not None]
    if stopped:
        raise Preempted(f"stopped by {stopped[0].stopped_by} at step {stopped[0].stopped_at}; checkpoint saved in "
                        f"{trainer.args.output_dir}; rerun the stage (or let Slurm requeue it) to resume")
    evaluation = trainer.evaluate()
    # Wall time goes to the log, not the metrics: metrics (and the output directory holding them) must be
    # identical on a rerun, or DVC would see a changed output and retrain everything downstream.
    logger.info("training took %.1f s (%d steps)", seconds, result.global_step)
    metrics = {
        "train_loss": result.training_loss,
        "eval_loss": evaluation["eval_loss"],
        "train_steps": result.global_step,
        "world_size": trainer.args.world_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "train_rows": len(trainer.train_dataset),
        "train_padding_fraction": padding_fraction(trainer),
        "eval_rows": len(trainer.eval_dataset),
        **data_report.as_metrics("data"),
    }
    return metrics, evaluation


def reward_metrics(evaluation: dict) -> dict:
    """Held-out implicit-reward metrics of the preference trainers (DPO, ORPO, CPO/SimPO, KTO), where logged."""
    names = {"accuracy": "accuracies", "margin": "margins", "chosen": "chosen", "rejected": "rejected"}
    return {f"eval_reward_{ours}": evaluation[f"eval_rewards/{theirs}"]
            for ours, theirs in names.items() if f"eval_rewards/{theirs}" in evaluation}


def round_floats(d: dict, digits: int = 6) -> dict:
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in d.items()}


def finish(stage: str, recipe: Recipe, trainer, tokenizer, metrics: dict) -> dict:
    """Save model/adapter, metrics.json, train_log.csv and config.yaml into the output dir, atomically."""
    from .models import atomic_output, merge_saved_adapter, save_trained

    from .reliability import manifest, remove_checkpoints, write_manifest

    out_dir = recipe.output_dir
    metrics = round_floats(dict(sorted(metrics.items())))
    main = trainer.args.should_save
    barrier = trainer.accelerator.wait_for_everyone if trainer.args.world_size > 1 else None
    with atomic_output(out_dir, main=main, barrier=barrier) as tmp:
        merge = (lambda d: merge_saved_adapter(recipe, tokenizer, d)) if recipe.extras.merge_adapter else None
        save_trained(trainer, tokenizer, tmp, merge_into=merge)
        if not main:
            return metrics
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        write_log_csv(trainer.state.log_history, os.path.join(tmp, "train_log.csv"))
        resolved = recipe.resolved()
        resolved["output_dir"] = out_dir  # not the temporary directory
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(_plain(resolved), f, sort_keys=True)
        for name in ("README.md", "training_args.bin"):  # trainer boilerplate: not reproducible, not needed
            if os.path.exists(os.path.join(tmp, name)):
                os.remove(os.path.join(tmp, name))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(stage, recipe, metrics, os.path.exists(os.path.join(tmp, "adapter_config.json"))))
        write_manifest(tmp, manifest(stage, inputs=recipe_inputs(recipe), config=resolved, seed=recipe.train.seed,
                                     world_size=trainer.args.world_size, tokenizer=tokenizer))
    remove_checkpoints(out_dir)  # the output is complete: nothing to resume any more
    if recipe.extras.metrics_dir:
        os.makedirs(recipe.extras.metrics_dir, exist_ok=True)
        with open(os.path.join(recipe.extras.metrics_dir, f"{stage}.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        write_log_csv(trainer.state.log_history, os.path.join(recipe.extras.metrics_dir, f"{stage}_log.csv"))
    logger.info("%s done: %s → %s", stage, json.dumps(metrics), out_dir)
    return metrics


def model_card(stage: str, recipe: Recipe, metrics: dict, is_adapter: bool) -> str:
    """README.md for a trained model directory: what it is, how it was made, its metrics (deterministic text)."""
    m, t, x = recipe.model, recipe.train, recipe.extras
    base = m.model_name_or_path + (f" ({x.gguf_file})" if x.gguf_file else "")
    if m.use_peft or x.adapter_path:
        method = (("QLoRA 4-bit " + str(m.bnb_4bit_quant_type)) if m.load_in_4bit else "LoRA") + \
            f" r {m.lora_r} α {m.lora_alpha} dropout {m.lora_dropout} on {m.lora_target_modules or 'all-linear'}"
    else:
        method = "full fine-tuning"
    batch = f"{t.per_device_train_batch_size} per device × {t.gradient_accumulation_steps} accumulation"
    length = "max_steps " + str(t.max_steps) if t.max_steps and t.max_steps > 0 else f"{t.num_train_epochs} epoch(s)"
    scheduler = getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)
    rows = [("stage", f"`{stage}`"), ("base model", f"`{base}`"),
            ("starting adapter", f"`{x.adapter_path}`" if x.adapter_path else "–"), ("method", method),
            ("training data", ", ".join(f"`{d.get('path')}`" for d in recipe.data.datasets) or "–"),
            ("held-out data", ", ".join(f"`{d.get('path')}`" for d in recipe.data.test_datasets)
             or f"seeded split ({recipe.data.test_split_size})"),
            ("optimisation", f"lr {t.learning_rate} {scheduler}, warmup {t.warmup_steps}, {length}, "
                             f"batch {batch}, seed {t.seed}")]
    for key in ("beta", "loss_type", "max_length"):
        if getattr(t, key, None) is not None:
            rows.append((key, f"{getattr(t, key)}"))
    library = "peft" if is_adapter else "transformers"
    title = f"# {os.path.basename(os.path.normpath(recipe.output_dir))} — alignkit `{stage}`"
    lines = ["---", f"library_name: {library}", f"base_model: {m.model_name_or_path}", "tags:", "- alignkit",
             f"- {stage}", "---", "", title, "",
             f"Made by `python -m alignkit.{stage} --config {recipe.path}`; the full resolved recipe is `config.yaml` "
             "beside this file, the loss curve `train_log.csv`.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    loader = ("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(DIR)"
              if is_adapter else "from transformers import AutoModelForCausalLM\n"
              "model = AutoModelForCausalLM.from_pretrained(DIR)")
    if stage == "reward":
        loader = loader.replace("CausalLM", "SequenceClassification")
    lines += ["", "## Load", "", "```python", loader, "```", ""]
    return "\n".join(lines)


def _plain(value):
    """YAML-safe copy (enums and other objects become strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
