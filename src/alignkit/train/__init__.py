"""The training stages, one module each, and the registry that names them: `alignkit <stage> --config RECIPE`.

Every stage module declares a `SPEC` (alignkit.train.stage.StageSpec) and a `main(argv)`; cpt's story differs
(packed text, perplexity before and after) and is written out in cpt.py.
"""

from __future__ import annotations

import importlib
import os

# stage name → module; the command, the module and the DVC stage share the name
STAGES = {name: f"alignkit.train.{name}" for name in ("cpt", "sft", "dpo", "orpo", "cpo", "kto", "reward")}
# runs on a DPO recipe without training (`alignkit ref_logps --config R`), launchable like a stage
STAGES["ref_logps"] = "alignkit.train.ref_logps"


def stage_module(stage: str):
    """The module of a training stage (imported when asked for: each pulls in its TRL trainer)."""
    return importlib.import_module(STAGES[stage])


def stage_of(path: str) -> str | None:
    """recipes/zephyr/dpo_qlora.yaml → 'dpo'."""
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    for stage in sorted(STAGES, key=len, reverse=True):
        if stem == stage or stem.startswith((stage + "_", stage + "-", stage + ".")):
            return stage
    return None
