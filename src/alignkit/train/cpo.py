"""CPO / SimPO stage (TRL's experimental CPOTrainer): reference-free preference optimisation.

    alignkit cpo --config recipes/smol/cpo_simpo.yaml [--key value ...]

`loss_type: simpo` (with `cpo_alpha: 0`, `simpo_gamma`) is SimPO: -log sigmoid(beta * (mean log p(chosen) -
mean log p(rejected)) - gamma). Other loss types: sigmoid, hinge, ipo, alphapo (CPO).
"""

from __future__ import annotations

from alignkit.data import PREFERENCE
from alignkit.train.stage import StageSpec, reward_metrics

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def check(recipe, fail) -> None:
    if recipe.train.loss_type not in LOSS_TYPES:
        fail(f"loss_type: unknown {recipe.train.loss_type!r}; valid for CPO/SimPO: {', '.join(LOSS_TYPES)}")


SPEC = StageSpec(
    name="cpo",
    config="trl.experimental.cpo:CPOConfig",
    trainer="trl.experimental.cpo:CPOTrainer",
    data_kind=PREFERENCE,
    check=check,
    fp16_refused="the loss compares mean log-probs that fp16 rounds",
    metrics=reward_metrics,
)
train, main = SPEC.train, SPEC.main
