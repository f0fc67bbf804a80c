"""KTO stage: Kahneman-Tversky optimisation (TRL's KTOTrainer) from unpaired desirable/undesirable answers.

    alignkit kto --config recipes/smol/kto.yaml [--key value ...]

Data: unpaired rows (`prompt`, `completion`, `label` true/false), or any paired preference format — each pair
becomes one desirable and one undesirable row. Reference: the adapter-disabled model under LoRA.
"""

from __future__ import annotations

from alignkit.data import UNPAIRED
from alignkit.train.stage import StageSpec, reward_metrics


def kto_metrics(evaluation: dict) -> dict:
    out = reward_metrics(evaluation)
    if "eval_kl" in evaluation:
        out["eval_kl"] = evaluation["eval_kl"]
    return out


SPEC = StageSpec(
    name="kto",
    config="trl:KTOConfig",
    trainer="trl:KTOTrainer",
    data_kind=UNPAIRED,
    fp16_refused="it compares summed log-probs against the reference",
    metrics=kto_metrics,
)
train, main = SPEC.train, SPEC.main
