"""What keeps a long run alive: checkpoints that a rerun resumes from, preemption signals, a stop on non-finite
losses, a disk check before the first checkpoint.

Checkpoints live beside the stage's output, in `.<output name>.checkpoints/` (DVC deletes a stage's declared
outputs before it reruns the stage, so they must not be inside it), under a fingerprint of everything that
determines the run: a rerun with the same recipe, data and starting model resumes from the last complete
checkpoint (model or adapter, optimizer, scheduler, RNG states, data position — the Trainer's own); anything
else starts afresh. They are removed once the final output is in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal

from alignkit.artifacts import files_under
from alignkit.config import Recipe
from alignkit.errors import REQUEUE_EXIT, RecipeError, TrainingDiverged

logger = logging.getLogger("alignkit")


def checkpoint_root(output_dir: str) -> str:
    output_dir = os.path.abspath(output_dir)
    return os.path.join(os.path.dirname(output_dir), f".{os.path.basename(output_dir)}.checkpoints")


def fingerprint(resolved: dict, paths: list[str]) -> str:
    """sha256 of the resolved recipe (less where it is written) and of the inputs' files (size + mtime: a
    regenerated input never resumes a run made from the old one)."""
    config = {k: v for k, v in resolved.items() if k not in ("output_dir", "logging_dir", "run_name")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path in paths:
        for file in files_under(path):
            st = os.stat(file)
            h.update(f"{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def prepare_checkpoints(output_dir: str, key: str, *, main: bool = True) -> tuple[str, str | None]:
    """(the directory for this run's checkpoints, the last complete checkpoint to resume from or None)."""
    root = checkpoint_root(output_dir)
    run_dir = os.path.join(root, key)
    if main and os.path.isdir(root):
        for other in os.listdir(root):  # checkpoints of a different recipe/data/model: not resumable
            if other != key:
                shutil.rmtree(os.path.join(root, other), ignore_errors=True)
    return run_dir, last_complete_checkpoint(run_dir)


def last_complete_checkpoint(run_dir: str) -> str | None:
    """The highest `checkpoint-N` whose trainer_state.json (the Trainer writes it last) is present."""
    if not os.path.isdir(run_dir):
        return None
    steps = sorted((int(d.split("-")[1]) for d in os.listdir(run_dir)
                    if d.startswith("checkpoint-") and d.split("-")[1].isdigit()), reverse=True)
    for step in steps:
        path = os.path.join(run_dir, f"checkpoint-{step}")
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
    return None


def remove_checkpoints(output_dir: str) -> None:
    shutil.rmtree(checkpoint_root(output_dir), ignore_errors=True)


def check_disk(path: str, needed_bytes: int, what: str) -> None:
    """Refuse before training when the disk under `path` cannot hold `needed_bytes` (with 10 % to spare)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * 1.1:
        raise RecipeError(f"{what} needs about {needed_bytes / 2**30:.2f} GiB at {path}, but only "
                          f"{free / 2**30:.2f} GiB is free there; free space or move output_dir")


def checkpoint_bytes(model, save_only_model: bool) -> int:
    """Size of one checkpoint: the weights saved (trainable only under PEFT) plus Adam's two fp32 states."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = trainable * 4 if hasattr(model, "peft_config") else total
    return weights + (0 if save_only_model else trainable * 8)


def recipe_inputs(recipe: Recipe) -> dict[str, str]:
    """Local files and directories a run reads (hub names are recorded as such): for fingerprints and manifests."""
    inputs = {"model": recipe.model.model_name_or_path, "adapter": recipe.alignkit.adapter_path,
              "ref_logps": recipe.alignkit.ref_logps}
    for kind, specs in (("train", recipe.data.datasets), ("test", recipe.data.test_datasets)):
        for i, spec in enumerate(specs):
            inputs[f"{kind}_data_{i}"] = spec.get("path")
    return {k: v for k, v in inputs.items() if v}


def checkpoint_run_dir(recipe: Recipe) -> str:
    """`.<output>.checkpoints/<fingerprint of recipe and inputs>` beside the stage's output."""
    return os.path.join(checkpoint_root(recipe.output_dir),
                        fingerprint(recipe.resolved(), list(recipe_inputs(recipe).values())))


def checkpoints(trainer, recipe: Recipe) -> str | None:
    """Check the disk can hold a checkpoint; drop checkpoints of other recipes/inputs. Returns the last complete
    checkpoint of an interrupted identical run (to resume from), or None."""
    run_dir = trainer.args.output_dir
    _, resume = prepare_checkpoints(recipe.output_dir, os.path.basename(run_dir), main=trainer.args.should_save)
    if trainer.args.save_strategy != "no":
        check_disk(run_dir, checkpoint_bytes(trainer.model, trainer.args.save_only_model), "a checkpoint")
    if resume:
        logger.info("resuming from %s", resume)
    return resume


def make_callbacks():
    """The Trainer callbacks every stage uses (imported lazily: transformers is heavy)."""
    from transformers import TrainerCallback

    class NonFiniteGuard(TrainerCallback):
        """Stop with the step and the values as soon as a logged loss or gradient norm is NaN or infinite."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            bad = {k: v for k, v in (logs or {}).items()
                   if k in ("loss", "grad_norm", "eval_loss") and isinstance(v, float) and not math.isfinite(v)}
            if bad:
                keys = ("loss", "grad_norm", "eval_loss", "learning_rate")
                values = ", ".join(f"{k}={logs[k]}" for k in keys if k in logs)
                raise TrainingDiverged(f"training diverged at step {state.global_step}: {values}; nothing was "
                                       "saved as a result — lower learning_rate, set max_grad_norm, or check the data")

    class PreemptionCheckpoint(TrainerCallback):
        """SIGTERM/SIGUSR1 (Slurm's warning before preemption or the time limit): checkpoint after the current
        optimiser step and stop. All ranks agree on the step, so a distributed save cannot deadlock."""

        def __init__(self):
            self.received = None
            self.previous = {}

        def on_train_begin(self, args, state, control, **kwargs):
            # installed for the training loop only, and the process's own handlers put back after it: a stage run
            # in-process (a notebook, a test session) must not keep reacting to signals meant for a later run
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self.previous[sig] = signal.signal(sig, self._handler)

        def on_train_end(self, args, state, control, **kwargs):
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.previous = {}

        def _handler(self, signum, frame):
            self.received = signal.Signals(signum).name
            logger.warning("received %s: checkpointing after this step, then exiting with %d for requeue",
                           self.received, REQUEUE_EXIT)

        def on_step_end(self, args, state, control, **kwargs):
            stop = self.received is not None
            if args.world_size > 1:
                import torch
                import torch.distributed as dist

                flag = torch.tensor([int(stop)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step
                self.stopped_by = self.received or "a signal to another rank"

    return [NonFiniteGuard(), PreemptionCheckpoint()]
