"""Attention on the CPU that never hands MKL a matrix-vector product, so its bits are the same on Intel and AMD CPUs.

torch's CPU flash-attention kernel (what `scaled_dot_product_attention` runs for transformers' "sdpa") cuts the
queries into blocks of 32, 64 or 256 rows and the keys into blocks of 512, and multiplies each pair of blocks with
MKL's sgemm. A sequence whose length is 1 more than a multiple of 32 leaves a last block of one row: a matrix-vector
product, which MKL computes with other bits on AMD CPUs than on Intel ones whatever MKL_CBWR says
(numerics.mkl_vendor_dependent). Inside the kernel no operator-level hook sees it (MKL_VERBOSE=1 does): the anima
twin's reference pass made 2160 of them (rows of 65 tokens) and its log-probs, and the zephyr twin's DPO gradients,
differed between an Intel Xeon and an AMD EPYC in the last bits.

`sdpa_without_single_rows` is transformers' own SDPA attention (`sdpa_attention_forward`) with such a length padded by
one position: a query row repeated (its output dropped) and a key that no query may attend to, so every block has at
least two rows and columns. Lengths that need no padding run exactly as before. Registered with transformers'
AttentionInterface (its extension point for attention functions) as PORTABLE_SDPA, which `portable_attention`
selects for a model on the CPU in portable mode (numerics.py); masks are built as for "sdpa".
"""

from __future__ import annotations

import functools

from alignkit.numerics import in_effect

PORTABLE_SDPA = "alignkit_sdpa"
# Every block size of torch's CPU flash-attention kernel (queries 32, 64 or 256; keys 512) is a multiple of this: a
# length 1 more than a multiple of it is the only way a block of one row or column arises.
BLOCK_MULTIPLE = 32


def single_row_block(length: int) -> bool:
    """Whether torch's CPU flash-attention kernel would cut `length` positions into a block of one."""
    return length % BLOCK_MULTIPLE == 1


def query_rows(module, query, attention_mask, key, value) -> int:
    """The query rows the kernel will see: transformers folds the heads sharing a key/value head into the rows of a
    single query position (pack_gqa) when SDPA does not take the heads grouped."""
    from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] == 1 and groups > 1 and not use_gqa_in_sdpa(attention_mask, key, value):
        return groups
    return query.shape[2]


def sdpa_without_single_rows(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
    """transformers' `sdpa_attention_forward`, with a query or key length that would leave the CPU kernel a block of
    one row padded by one position (see the module's docstring). Returns what it returns."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def unchanged(mask):
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)

    # decided before any work: this runs in every layer of every forward
    if query.device.type != "cpu" or kwargs.get("cache") is not None or kwargs.get("position_bias") is not None:
        return unchanged(attention_mask)
    lq, lk = query.shape[2], key.shape[2]
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :lk]
    pad_q = single_row_block(query_rows(module, query, attention_mask, key, value))
    pad_k = single_row_block(lk)
    if not (pad_q or pad_k):
        return unchanged(attention_mask)
    if attention_mask is None:  # what SDPA's is_causal would apply (top-left aligned), made explicit
        causal = lq > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        attention_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device)
        attention_mask = (attention_mask.tril() if causal else attention_mask)[None, None]
    if pad_q:  # a copy of the last query row, with its mask row: never a fully masked row; its output is dropped
        query = torch.cat([query, query[:, :, -1:]], 2)
        if attention_mask.shape[2] > 1:  # (a mask of one row applies to every query)
            attention_mask = torch.cat([attention_mask, attention_mask[:, :, -1:]], 2)
    if pad_k:  # a zero key and value that no query attends to
        key, value = (torch.cat([x, x.new_zeros(*x.shape[:2], 1, x.shape[3])], 2) for x in (key, value))
        shape, dtype = (*attention_mask.shape[:3], 1), attention_mask.dtype
        blocked = (torch.zeros(shape, dtype=dtype, device=query.device) if dtype == torch.bool
                   else torch.full(shape, torch.finfo(dtype).min, dtype=dtype, device=query.device))
        attention_mask = torch.cat([attention_mask, blocked], 3)
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=False, **kwargs)
    return out[:, :lq], weights


@functools.cache
def register() -> str:
    """Register PORTABLE_SDPA with transformers (once per process); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PORTABLE_SDPA, sdpa_without_single_rows)
    AttentionMaskInterface.register(PORTABLE_SDPA, sdpa_mask)
    return PORTABLE_SDPA


def portable_implementation(implementation: str | None, on_cpu: bool) -> str | None:
    """The attention implementation to load a model with: PORTABLE_SDPA for "sdpa" on the CPU in portable mode."""
    if implementation == "sdpa" and on_cpu and in_effect()["cpu"] == "portable":
        return register()
    return implementation


def portable_attention(model) -> None:
    """In portable mode, a model on the CPU whose attention is "sdpa" runs PORTABLE_SDPA instead (the same function
    apart from the padding); others are left as they are. The saved config does not record it (transformers keeps
    the implementation out of config.json)."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    wanted = portable_implementation(current, on_cpu)
    if wanted != current:
        model.set_attn_implementation(wanted)
