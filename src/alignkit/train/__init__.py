"""The training stages, one module each (named in alignkit/registry.py): `alignkit <stage> --config RECIPE`.

Every stage module declares a `SPEC` (alignkit.train.stage.StageSpec) and a `main(argv)`; cpt's story differs
(packed text, perplexity before and after) and is written out in cpt.py.
"""

from __future__ import annotations

import importlib
import os

from alignkit.registry import STAGES  # stage name → module (the command, the module and the DVC stage share it)


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
