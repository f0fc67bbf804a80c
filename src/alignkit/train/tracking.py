"""Experiment trackers for a training stage (`report_to`): DVCLive — the pipelines' default — TensorBoard, W&B,
MLflow. The Trainer's own callbacks log; alignkit decides where they write, and keeps DVCLive's files, which DVC
versions with each experiment, reproducible:

- dvclive writes `<metrics_dir>/dvclive/<stage>/` (`dvclive/<stage>/` without a metrics_dir): metrics.json (the
  last value of each), one plots/metrics/{train,eval}/<name>.tsv per logged value, params.yaml (the resolved
  recipe — not TrainingArguments, which names the run's temporary checkpoint directory). x is the optimizer
  step; the run's closing summary (its average loss and wall times, in metrics/<stage>.json and the log), eval
  wall times and TRL's running token count are left out, so a rerun writes the same bytes and DVC sees nothing
  change. A run resumed from a
  checkpoint first replays the checkpoint's log history: a killed and resumed run writes what an uninterrupted
  one does. DVC records the experiment itself (dvc exp run): DVCLive neither saves one nor edits dvc.yaml — the
  pipelines declare its files.
- tensorboard writes one event file per run to `runs/<stage>/` (not versioned: they hold wall times). Needs
  tensorboard or tensorboardX. transformers' callback closes its writer when training ends, and the stage's final
  evaluation then opens a new file named by the second and the host: within the same second it replaced the file
  holding the training curves. alignkit's callback keeps the one writer open for the stage's final evaluation.
- wandb and mlflow log where their own settings say (WANDB_PROJECT, MLFLOW_TRACKING_URI, ...). Without settings
  they stay on this machine, as the CPU targets reach no network: W&B runs offline (`wandb/`, `wandb sync` later),
  MLflow writes a file store in `mlruns/` (`mlflow ui`): MLflow 3.17's own default is a SQLite database, which
  the client-only package (the `tracking` extra's mlflow-skinny) cannot open, and it refuses a file store unless
  MLFLOW_ALLOW_FILE_STORE says yes. Like TensorBoard's, MLflow's callback ends its run when training ends, and the
  final evaluation started a second one; alignkit's keeps the run open (one run per stage).
"""

from __future__ import annotations

import os
import subprocess

from alignkit.config import Recipe
from alignkit.errors import RecipeError
from alignkit.train.saving import plain

# What the Trainer reports in seconds, by the end of the key
WALL_TIMES = ("_runtime", "_per_second", "_preparation_time")


def tracker_dir(recipe: Recipe, stage: str, tracker: str) -> str:
    if tracker == "dvclive":
        return os.path.join(recipe.alignkit.metrics_dir or ".", "dvclive", stage)
    return os.path.join("runs", stage)


def tracking_callbacks(recipe: Recipe, stage: str, *, main: bool) -> list:
    """The callbacks for the recipe's trackers that alignkit places itself (DVCLive; TensorBoard via its
    directory); the others stay in `report_to` for the Trainer to add. `main`: this is the process that logs."""
    wanted = list(recipe.train.report_to or [])
    callbacks = []
    if "tensorboard" in wanted:
        wanted.remove("tensorboard")
        callbacks.append(stage_tensorboard(tracker_dir(recipe, stage, "tensorboard")))
    if "wandb" in wanted:
        os.environ.setdefault("WANDB_MODE", "offline")
    if "mlflow" in wanted:
        if "MLFLOW_TRACKING_URI" not in os.environ:
            os.environ["MLFLOW_TRACKING_URI"] = "file:" + os.path.abspath("mlruns")
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        wanted.remove("mlflow")
        callbacks.append(stage_mlflow())
    if "dvclive" in wanted:
        wanted.remove("dvclive")
        callbacks.append(stage_dvclive(recipe, stage, main=main))
    recipe.train.report_to = wanted
    return callbacks


def stage_tensorboard(log_dir: str):
    from transformers.integrations import TensorBoardCallback

    class StageTensorBoard(TensorBoardCallback):
        """transformers' TensorBoard callback writing to `log_dir` (unless TENSORBOARD_LOGGING_DIR says where),
        whose writer outlives `on_train_end` (flushed there, closed with the process) so the evaluation after
        training lands in the same event file."""

        def __init__(self):
            super().__init__()
            self.logging_dir = self.logging_dir or log_dir

        def on_train_end(self, args, state, control, **kwargs):
            if self.tb_writer:
                self.tb_writer.flush()

    return StageTensorBoard()


def stage_mlflow():
    from transformers.integrations import MLflowCallback

    class StageMLflow(MLflowCallback):
        """transformers' MLflow callback whose run outlives `on_train_end`: the stage's final evaluation logs into
        the training's run (transformers' ends it there, and the evaluation's metrics started a second run). The run
        ends with the callback (its __del__) or the process (MLflow's own exit handler)."""

        def on_train_end(self, args, state, control, **kwargs):
            pass

    return StageMLflow()


def git_without_commits() -> bool:
    """Inside a git work tree whose HEAD has no commit yet."""
    def ok(*args):
        return subprocess.run(["git", *args], capture_output=True).returncode == 0

    return ok("rev-parse", "--is-inside-work-tree") and not ok("rev-parse", "--verify", "-q", "HEAD")


def stage_dvclive(recipe: Recipe, stage: str, *, main: bool):
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class StageDVCLive(DVCLiveCallback):
        """transformers' DVCLive callback, logging at the optimizer step, without wall-time values, the recipe
        as params, and a resumed run's history replayed first."""

        def setup(self, args, state, model):
            self._initialized = True
            if not state.is_world_process_zero:
                return
            self.live.log_params(plain(recipe.resolved()))
            self.logged = set()
            for entry in state.log_history:  # empty unless resumed from a checkpoint
                self.log_step(entry["step"], {k: v for k, v in entry.items() if k != "step"})

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if not self._initialized:
                self.setup(args, state, model)
            if state.is_world_process_zero:
                self.log_step(state.global_step, logs)

        def log_step(self, step: int, logs: dict) -> None:
            split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
            if "train_runtime" in logs or (step, split) in self.logged:  # the closing summary; the final
                return  # evaluation again at a step already evaluated
            self.logged.add((step, split))
            self.live.step = step
            # Sorted, as a checkpoint's history stores them; without wall times (runtimes, rates, an evaluation's
            # model preparation time: they differ on every run) and TRL's running token count (it restarts on
            # resume): a rerun or a resumed run writes the bytes an uninterrupted one does.
            named = {k if k.startswith("eval_") else f"train_{k}": v for k, v in sorted(logs.items())
                     if not k.endswith(WALL_TIMES + ("num_tokens",))}
            super().on_log(None, _Zero, None, logs=named)

    # Only the logging process opens the directory: Live() empties it, and other ranks must not race it.
    if main and git_without_commits():
        # DVCLive 3.49 reads the baseline revision of the enclosing git repository and fails in one with no commit
        raise RecipeError("report_to: dvclive needs the git repository it runs in to have a commit (DVCLive records "
                          "the experiment's baseline revision): commit once, or set report_to: none")
    live = Live(dir=tracker_dir(recipe, stage, "dvclive"), save_dvc_exp=False, dvcyaml=None) if main else None
    return StageDVCLive(live=live, log_model=False)


class _Zero:
    """The state DVCLiveCallback.on_log reads when StageDVCLive hands it one step: this process logs."""

    is_world_process_zero = True
