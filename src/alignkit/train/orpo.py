"""ORPO stage: odds-ratio preference optimisation (TRL's experimental ORPOTrainer) — SFT and preference
alignment in one step, no reference model.

    alignkit orpo --config recipes/smol/orpo.yaml [--key value ...]

Loss = NLL(chosen) + beta * -log sigmoid(log odds(chosen) - log odds(rejected)), odds from mean token log-probs.
"""

from __future__ import annotations

from alignkit.data import PREFERENCE
from alignkit.train.stage import StageSpec, reward_metrics

SPEC = StageSpec(
    name="orpo",
    config="trl.experimental.orpo:ORPOConfig",
    trainer="trl.experimental.orpo:ORPOTrainer",
    data_kind=PREFERENCE,
    fp16_refused="log-odds of mean log-probs lose too much precision in fp16",
    metrics=reward_metrics,
)
train, main = SPEC.train, SPEC.main
