"""Reward-model stage: a scalar head trained on preference pairs (TRL's RewardTrainer, Bradley-Terry loss).

    alignkit reward --config recipes/smol/reward.yaml [--key value ...]

Data: any preference format. Model: AutoModelForSequenceClassification with one label; LoRA task SEQ_CLS
(the score head is trained in full alongside the adapter). Metrics: held-out pairwise accuracy and mean margin.
"""

from __future__ import annotations

from alignkit.data import PREFERENCE
from alignkit.train.stage import StageSpec


def reward_model_metrics(evaluation: dict) -> dict:
    return {"eval_pairwise_accuracy": evaluation["eval_accuracy"], "eval_mean_margin": evaluation["eval_margin"]}


SPEC = StageSpec(
    name="reward",
    config="trl:RewardConfig",
    trainer="trl:RewardTrainer",
    data_kind=PREFERENCE,
    auto_class="transformers:AutoModelForSequenceClassification",
    model_kwargs={"num_labels": 1},
    lora_task_type="SEQ_CLS",
    metrics=reward_model_metrics,
)
train, main = SPEC.train, SPEC.main
