"""A reward model's one-output score head computed as a row sum, so its bits are the same on Intel and AMD CPUs.

`nn.Linear(hidden, 1)` runs as a matrix-vector product (x @ w.T with one output column; in the backward, one row
times the hidden states for the weight's gradient), which MKL computes with other bits on AMD CPUs than on Intel ones
whatever MKL_CBWR says (numerics.mkl_vendor_dependent): a reward model's scores, margins and gradients then differed
between vendors from the first step. `(x * w).sum(-1)` is ATen's own elementwise product and reduction, the same on
every x86-64 CPU under the portable settings, and the same function: the weight and its state-dict key stay
`score.weight`, so checkpoints load into plain transformers models and back.
"""

from __future__ import annotations

import functools

from alignkit.numerics import in_effect


@functools.cache
def row_sum_score():
    """The class RowSumScore, `nn.Linear(in_features, 1)` computed as a row sum (made on first use: torch loads only
    when a model does)."""
    import torch

    class RowSumScore(torch.nn.Linear):
        def forward(self, x):
            out = (x * self.weight[0].to(x.dtype)).sum(-1, keepdim=True)
            return out if self.bias is None else out + self.bias.to(x.dtype)

    return RowSumScore


def portable_score_head(model) -> None:
    """In portable mode (numerics.py), the one-output `score` head of a sequence-classification `model` computes as
    a RowSumScore holding the same parameters; other models are left as they are."""
    import torch

    head = getattr(model, "score", None)
    if in_effect()["cpu"] != "portable" or type(head) is not torch.nn.Linear or head.out_features != 1:
        return
    row_sum = row_sum_score()(head.in_features, 1, bias=head.bias is not None, device="meta")
    row_sum.weight, row_sum.bias = head.weight, head.bias
    model.score = row_sum
