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

import ctypes
import importlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import yaml

from alignkit.artifacts import atomic_output, manifest, write_json, write_manifest
from alignkit.command import run_cli
from alignkit.config import Recipe, load_recipe, split_config_arg
from alignkit.data import load_splits
from alignkit.errors import Preempted
from alignkit.models import load_model, load_tokenizer, lora_config
from alignkit.publish import publish
from alignkit.train.batches import padding_fraction, truncation_metrics, with_length_column
from alignkit.train.checkpoints import (
    checkpoint_run_dir,
    checkpoints,
    make_callbacks,
    recipe_inputs,
    remove_checkpoints,
)
from alignkit.train.saving import merge_saved_adapter, model_card, plain, round_floats, save_trained, write_log_csv
from alignkit.train.tracking import tracking_callbacks

logger = logging.getLogger("alignkit")


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
        if recipe.alignkit.ref_logps and self.prepare_data is None:
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
                               lora_task_type=self.lora_task_type, tracked_as=self.name)
        truncation = truncation_metrics(trainer, {"train": len(train_ds), "eval": len(eval_ds)})
        resume = checkpoints(trainer, recipe)  # an interrupted identical run's last checkpoint, if any
        metrics, evaluation = train_and_evaluate(trainer, data_report, resume_from=resume)  # 5
        metrics.update(truncation)
        if self.metrics is not None:
            metrics.update(self.metrics(evaluation))
        return finish(self.name, recipe, trainer, tokenizer, metrics)  # 6

    def main(self, argv=None) -> int:
        return run_cli(self.name, lambda a: (self.train(a), 0)[1], argv)


def load_inputs(recipe: Recipe, kind: str, *, auto_class=None, check_tokenizer=None, model_kwargs=None,
                prepare_data=None):
    """(train, eval, data report, tokenizer, model) for a stage — cheapest first, so that a bad row, a missing
    chat template or stale stored reference log-probs fail before any weights are loaded."""
    train_ds, eval_ds, report = load_splits(recipe.data, kind, seed=recipe.train.seed)
    tokenizer = load_tokenizer(recipe)
    if check_tokenizer is not None:
        check_tokenizer(recipe, tokenizer)
    if recipe.alignkit.prepare_only:
        return train_ds, eval_ds, report, tokenizer, None
    if prepare_data is not None:
        train_ds, eval_ds = prepare_data(recipe, tokenizer, train_ds, eval_ds)
    model = load_model(recipe, tokenizer, auto_class=auto_class, **(model_kwargs or {}))
    return train_ds, eval_ds, report, tokenizer, model


def make_trainer(trainer_cls, recipe: Recipe, model, tokenizer, train_ds, eval_ds, *, lora_task_type="CAUSAL_LM",
                 run_dir: str | None = None, tracked_as: str | None = None):
    """A TRL trainer the way every stage builds one: the recipe's args, a new LoRA adapter if `use_peft`, the
    recipe's experiment trackers filing the run under `tracked_as` (none without it: a reference pass)."""
    # The Trainer writes (and creates) its output_dir: point it at this run's checkpoint directory, so that a
    # killed run never leaves anything at the stage's output path.
    recipe.train.output_dir = run_dir or checkpoint_run_dir(recipe)
    reentrant_checkpointing_for_zero3_lora(recipe)
    if tracked_as:
        trackers = tracking_callbacks(recipe, tracked_as, main=recipe.train.process_index == 0)
    else:
        trackers, recipe.train.report_to = [], []
    trainer = trainer_cls(
        model=model,
        args=recipe.train,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.model, lora_task_type),
        callbacks=make_callbacks() + trackers,
    )
    if trainer.args.device.type == "cpu" and recipe.alignkit.cpu_keep_freed_memory and keep_freed_memory():
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
    lora = recipe.model.use_peft or recipe.alignkit.adapter_path
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
    if platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>; a trim threshold of -1 turns trimming off
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


def prepared(stage: str, data_report, **extra) -> dict:
    """What a `prepare_only` run reports: the data checked and cached, no weights loaded."""
    metrics = {"prepared": True, **data_report.as_metrics("data"), **extra}
    logger.info("%s prepare_only: data and tokenizer checked and cached, nothing trained: %s", stage,
                json.dumps(metrics))
    return metrics


def train_and_evaluate(trainer, data_report, resume_from: str | None = None) -> tuple[dict, dict]:
    """Train (resuming from a checkpoint when given), then evaluate on the held-out split.
    Returns (the metrics every stage reports, raw eval metrics)."""
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


def finish(stage: str, recipe: Recipe, trainer, tokenizer, metrics: dict) -> dict:
    """Save model/adapter, metrics.json, train_log.csv and config.yaml into the output dir, atomically."""
    out_dir = recipe.output_dir
    metrics = round_floats(dict(sorted(metrics.items())))
    main = trainer.args.should_save
    barrier = trainer.accelerator.wait_for_everyone if trainer.args.world_size > 1 else None
    with atomic_output(out_dir, main=main, barrier=barrier) as tmp:
        merge = (lambda d: merge_saved_adapter(recipe, tokenizer, d)) if recipe.alignkit.merge_adapter else None
        save_trained(trainer, tokenizer, tmp, merge_into=merge)
        if not main:
            return metrics
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        write_log_csv(trainer.state.log_history, os.path.join(tmp, "train_log.csv"))
        resolved = recipe.resolved()  # output_dir: the recipe's, not the temporary or run directory
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(plain(resolved), f, sort_keys=True)
        for name in ("README.md", "training_args.bin"):  # trainer boilerplate: not reproducible, not needed
            if os.path.exists(os.path.join(tmp, name)):
                os.remove(os.path.join(tmp, name))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(stage, recipe, metrics, os.path.exists(os.path.join(tmp, "adapter_config.json"))))
        write_manifest(tmp, manifest(stage, inputs=recipe_inputs(recipe), config=resolved, seed=recipe.train.seed,
                                     world_size=trainer.args.world_size, tokenizer=tokenizer))
    remove_checkpoints(out_dir)  # the output is complete: nothing to resume any more
    if recipe.alignkit.metrics_dir:
        write_json(os.path.join(recipe.alignkit.metrics_dir, f"{stage}.json"), metrics)
        write_log_csv(trainer.state.log_history, os.path.join(recipe.alignkit.metrics_dir, f"{stage}_log.csv"))
    if recipe.publish_to and main:  # only now: the output is whole and in place
        logger.info("published %s to %s: %s", out_dir, recipe.publish_to,
                    publish(out_dir, recipe.publish_to, commit_message=f"alignkit {stage}: {recipe.path}"))
    logger.info("%s done: %s → %s", stage, json.dumps(metrics), out_dir)
    return metrics


