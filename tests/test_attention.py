"""alignkit.attention: CPU attention without MKL matrix-vector products (whose bits differ between Intel and AMD)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from test_numerics import run_python

# (query length, key length): blocks of one row in torch's CPU kernel (33, 65, 97, 257), decoding a single query
# (1) against such keys, and lengths that need no padding
LENGTHS = [(33, 33), (65, 65), (97, 97), (257, 257), (1, 33), (1, 65), (1, 2), (2, 33), (32, 32), (1, 1)]


def masks(kind: str, lq: int, lk: int):
    import torch

    if kind == "none":
        return None
    allowed = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)[None, None].repeat(2, 1, 1, 1)
    allowed[0, :, 1:, 0] = lk == 1  # a padded first key in one row of the batch
    if kind == "bool-one-row":
        return allowed[:, :, -1:]
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("groups", [1, 3])
def test_padded_attention_equals_transformers_sdpa(groups):
    """Values and gradients of query, key and value equal transformers' own SDPA attention to 1e-5, for every mask
    form transformers passes (none: causal; boolean; additive; one row for all queries), with and without grouped
    key/value heads; lengths that need no padding give the same bits."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from alignkit.attention import sdpa_without_single_rows

    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    generator = torch.Generator().manual_seed(groups)
    for lq, lk in LENGTHS:
        for kind in ("none", "bool", "additive", "bool-one-row"):
            if kind == "none" and lq not in (1, lk):
                continue
            q = torch.randn(2, 3 * groups, lq, 16, generator=generator).requires_grad_()
            k, v = (torch.randn(2, 3, lk, 16, generator=generator).requires_grad_() for _ in range(2))
            results = []
            for attention in (sdpa_attention_forward, sdpa_without_single_rows):
                for t in (q, k, v):
                    t.grad = None
                out, _ = attention(module, q, k, v, masks(kind, lq, lk), scaling=0.25)
                out.square().sum().backward()
                results.append([out.detach()] + [t.grad.clone() for t in (q, k, v)])
            for a, b in zip(*results):
                assert a.shape == b.shape
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"{lq}x{lk} {kind}")
                if lq % 32 != 1 and lk % 32 != 1 and not (lq == 1 and groups == 1):
                    assert torch.equal(a, b), f"{lq}x{lk} {kind}: padded although no block of one arises"


STEP = r"""
import sys
import alignkit  # first: its settings act only before torch loads
import torch
from alignkit.models import load_pretrained

model = load_pretrained(sys.argv[1])
if sys.argv[2] == "sdpa":
    model.set_attn_implementation("sdpa")
print("attention", model.config._attn_implementation)
ids = torch.arange(2 * 65).reshape(2, 65) % 300
mask = torch.ones_like(ids)
mask[1, :12] = 0  # left padding in one row
for length in (33, 65):
    out = model(input_ids=ids[:, :length], attention_mask=mask[:, :length], labels=ids[:, :length])
    out.loss.backward()
model.generate(ids[:, 30:63], attention_mask=mask[:, 30:63], max_new_tokens=3, do_sample=False)
"""


def matrix_vector_calls(mkl_log: str) -> int:
    """MKL's sgemm calls (MKL_VERBOSE lines) with one row or one column: matrix-vector products."""
    shapes = re.findall(r"MKL_VERBOSE SGEMM\([NT],[NT],(\d+),(\d+),", mkl_log)
    assert shapes, "MKL_VERBOSE printed no sgemm call"
    return sum(1 for m, n in shapes if "1" in (m, n))


def test_a_model_loaded_by_alignkit_runs_attention_without_matrix_vector_products(tiny_model):
    """At lengths that leave torch's CPU attention kernel a block of one row (33, 65 tokens; 65 was the anima twin's
    reference pass), a forward and backward of a batch, and a batched generation, make no MKL matrix-vector product
    in a model alignkit loads (MKL_VERBOSE lists every sgemm, also those inside the attention kernel, which no
    operator hook sees); with transformers' "sdpa" the same work makes them."""
    counts = {}
    for attention in ("portable", "sdpa"):
        done = run_python(STEP, tiny_model, attention, MKL_VERBOSE="1")
        assert done.returncode == 0, done.stderr[-2000:]
        assert ("attention alignkit_sdpa" in done.stdout) == (attention == "portable"), done.stdout
        counts[attention] = matrix_vector_calls(done.stdout + done.stderr)
    assert counts["portable"] == 0 and counts["sdpa"] > 0, counts
