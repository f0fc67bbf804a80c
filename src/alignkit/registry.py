"""Every `alignkit` command and the module that runs it — one table for the CLI, the training-stage registry and
the manifests (which hash the code a command runs). A command, its module and its DVC stage share one name
(`alignkit rejection_sampling` is alignkit/prepare/rejection_sampling.py and the `rejection_sampling` stage).

Module names are strings, imported only when a command runs: each training stage pulls in its TRL trainer.
"""

from __future__ import annotations

# training stages: `alignkit <stage> --config RECIPE`
STAGES = {name: f"alignkit.train.{name}" for name in ("cpt", "sft", "dpo", "orpo", "cpo", "kto", "reward")}
# runs on a DPO recipe without training (`alignkit ref_logps --config R`), launchable like a stage
STAGES["ref_logps"] = "alignkit.train.ref_logps"

# Pipeline tools with their own flags, by folder: before training, after it, scaling out, checking.
TOOLS = {
    "base_model": "alignkit.prepare.base_model",
    "pairs": "alignkit.prepare.pairs",
    "rejection_sampling": "alignkit.prepare.rejection_sampling",
    "evaluate": "alignkit.evaluation.evaluate",
    "mtbench": "alignkit.evaluation.mtbench",
    "lmeval": "alignkit.evaluation.lmeval",
    "alpacaeval": "alignkit.evaluation.alpacaeval",
    "report": "alignkit.evaluation.report",
    "launch": "alignkit.launch.launch",
    "plan": "alignkit.launch.plan",
    "verify": "alignkit.verify",
    "publish": "alignkit.publish",
}


def command_module(command: str) -> str | None:
    """The module that runs `alignkit <command>`, or None for no such command."""
    return STAGES.get(command) or TOOLS.get(command)
