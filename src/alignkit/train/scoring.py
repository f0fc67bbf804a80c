"""Scoring that does less work than TRL 1.16's and computes the same numbers, for SFT and DPO.

TRL's trainers get per-token log-probs from a fused LM head that, off CUDA/XPU, projects every position — prompt and
padding too — through the LM head and a log-softmax over the whole vocabulary; and its DPO trainer runs every pair
twice through the policy, prompt + chosen and prompt + rejected, each padded to the longest row. The trainers here
hand TRL's own loss code a policy that computes only what the loss reads:

- `CompletionScorer` (SFT): the model's ordinary forward for the hidden states, then only the positions whose next
  token has a label go through the LM head, with TRL's own chunked log-prob kernel (`ChunkedLogProbFunction`, the
  one TRL uses for exactly this on CUDA) — on the CPU with `CpuLogProbs`, the same values from ATen's own softmax
  kernels — laid out as TRL's fused head returns them (zero where the label is -100).
- `PairScorer` (DPO): besides, each pair runs once as one row, prompt · chosen · rejected, under an attention mask
  in which the chosen tokens see the prompt and themselves and the rejected tokens the prompt and themselves
  (position ids restart after the prompt): the prompt is computed once for both answers, and a row is as long as
  the prompt and both answers rather than twice the prompt and the longer answer.

TRL's loss, metrics, reference handling and every loss type then run unchanged on those values
(tests/test_scoring.py: losses, rewards, metrics and gradients equal TRL's own to 1e-6). The model is always called
through its own forward, so DDP and DeepSpeed see an ordinary forward. Where a batch or a setup does not fit — a pair
whose two rows truncation cut differently, flash attention (no arbitrary masks), logit softcapping or scaling,
multimodal or MoE inputs, prompt-learning PEFT, ZeRO-3 with a trainable LM head on a GPU — TRL's own forward runs
instead, for that batch or for the run. (On the CPU such a head runs through its own module: `module_log_probs`.)
"""

from __future__ import annotations

import logging

import torch
from trl import SFTTrainer
from trl.kernels.chunked_logprob import ChunkedLogProbFunction
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

from alignkit.attention import PORTABLE_SDPA
from alignkit.train.stored_reference import StoredReferenceDPOTrainer

logger = logging.getLogger("alignkit")

# TRL's vocabulary tile for its fused head (trl/trainer/utils.py, _CHUNKED_LOGPROB_CHUNK_SIZE).
VOCAB_CHUNK = 32768
# Config attributes that change the logits after the LM head; TRL's fused head applies them, PairScorer does not.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")
# What TRL's losses read from the policy's output (sft_trainer.py, dpo_trainer.py: add_fused_lm_head(outputs=...)).
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")
DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
# Model inputs the scorers pass on; with any other (pixel values, router logits, pre-shifted labels) TRL's forward runs.
PLAIN_INPUTS = {"input_ids", "attention_mask", "position_ids", "use_cache"}


def no_logits():
    """`logits_to_keep` for a forward whose logits nobody reads (the scorers take the hidden states): no position.
    `logits_to_keep=1` would still project each row's last position through the whole vocabulary — on a CPU one
    batched matrix-vector product per row, ~35 ms of a 1.4 s smol SFT step. On the CPU: an index may live there
    whatever device the last layer is on."""
    return torch.zeros(0, dtype=torch.long)


def unwrapped(model):
    """The model under DDP/DeepSpeed and PEFT wrappers: the causal LM whose config and head we read."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(model) -> str | None:
    """Why PairScorer cannot score for `model` (None when it can)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    base = unwrapped(model)
    config = base.config.get_text_config()
    if "flash" in str(getattr(config, "_attn_implementation", "") or ""):
        return "flash attention takes no custom attention mask"
    if any(getattr(config, a, None) not in (None, 1.0) for a in LOGIT_TRANSFORMS):
        return "the model transforms its logits after the LM head"
    if config is not base.config:
        return "a multimodal model"
    if getattr(config, "output_router_logits", False):
        return "a mixture-of-experts model with a router loss"
    peft_configs = getattr(model.module if hasattr(model, "module") else model, "peft_config", {}) or {}
    if any(getattr(c, "num_virtual_tokens", None) for c in peft_configs.values()):
        return "prompt-learning PEFT"
    head = base.get_output_embeddings().weight
    if is_deepspeed_zero3_enabled() and head.requires_grad and head.device.type != "cpu":
        # on the CPU head_log_probs runs such a head through its own module (ZeRO-3's hooks gather it and reduce its
        # gradient); on a GPU that would hold the logits of every scored position at once, TRL's forward does not
        return "ZeRO-3 with a trainable LM head on a GPU (its gradient must be reduced inside the model's forward)"
    return None


def pair_layout(input_ids, attention_mask, labels):
    """For TRL's DPO batch (chosen rows, then rejected rows; right padded; labels -100 outside the completion), the
    one-row-per-pair layout, or None when some pair does not share its prompt exactly. Returns (ids, position_ids,
    allowed, hidden_at, target, out_row, out_col): `allowed[i, q, k]` whether packed position q attends to k; for
    each scored token its target id, the packed (row, position) whose hidden state predicts it, and its place in
    TRL's shifted per-token layout. Built on the CPU (a few hundred small index operations) and moved once."""
    device = input_ids.device
    ids_in, attention, scored = input_ids.cpu(), attention_mask.cpu().bool(), (labels != -100).cpu()
    pairs = ids_in.size(0) // 2
    rows = []
    for i in range(pairs):
        parts = []
        for r in (i, i + pairs):
            n = int(attention[r].sum())
            completion = scored[r].nonzero().flatten()
            if (not len(completion) or not attention[r, :n].all() or int(completion[0]) + len(completion) != n
                    or int(completion[-1]) != n - 1):
                return None  # not right padded, or a completion that is not one contiguous tail
            parts.append((r, int(completion[0]), n))
        (c, p, nc), (rr, pr, nr) = parts
        if p != pr or p < 1 or not torch.equal(ids_in[c, :p], ids_in[rr, :p]):
            return None  # truncation cut the prompt differently in the two rows
        rows.append((c, rr, p, nc - p, nr - p))

    size = max(p + lc + lr for _, _, p, lc, lr in rows)
    ids = ids_in.new_zeros(pairs, size)
    position_ids = torch.zeros(pairs, size, dtype=torch.long)
    allowed = torch.zeros(pairs, size, size, dtype=torch.bool)
    causal = torch.ones(size, size, dtype=torch.bool).tril()
    hidden_at, source, out_col = [], [], []
    for i, (c, rr, p, lc, lr) in enumerate(rows):
        ids[i, :p + lc] = ids_in[c, :p + lc]
        ids[i, p + lc:p + lc + lr] = ids_in[rr, p:p + lr]
        position_ids[i, :p + lc] = torch.arange(p + lc)
        position_ids[i, p + lc:p + lc + lr] = torch.arange(p, p + lr)
        block = torch.zeros(size, size, dtype=torch.bool)
        block[:p + lc, :p + lc] = True  # prompt and chosen
        block[p + lc:p + lc + lr, :p] = True  # rejected sees the prompt ...
        block[p + lc:p + lc + lr, p + lc:p + lc + lr] = True  # ... and itself, not the chosen answer
        allowed[i] = causal & block
        pad = torch.arange(p + lc + lr, size)
        allowed[i, pad, pad] = True  # padding attends to itself alone (a fully masked row would give NaN)
        for row, start, length in ((c, p, lc), (rr, p + lc, lr)):
            for j in range(length):
                hidden_at.append((i, p - 1 if j == 0 else start + j - 1))
                source.append((row, p + j))
                out_col.append(p + j - 1)
    source = torch.tensor(source, dtype=torch.long)
    target = ids_in[source[:, 0], source[:, 1]]
    moved = (ids, position_ids, allowed, torch.tensor(hidden_at, dtype=torch.long), target, source[:, 0],
             torch.tensor(out_col, dtype=torch.long))
    return tuple(t.to(device) for t in moved)


def head_log_probs(model, hidden, targets, outputs: tuple[str, ...]):
    """Log-probs (and `outputs`) of the scored positions through the LM head of `model`, for their hidden states:
    TRL's chunked kernel, on the CPU CpuLogProbs — or, for a trainable head under ZeRO-3 on the CPU,
    module_log_probs."""
    head = unwrapped(model).get_output_embeddings()
    hidden, targets = hidden.to(head.weight.device), targets.to(head.weight.device)
    if head.weight.device.type == "cpu" and hasattr(head.weight, "ds_id") and head.weight.requires_grad:
        return module_log_probs(head, hidden, targets, outputs)
    with maybe_gather_lm_head_ctx(head.weight, head.bias):
        if head.weight.device.type == "cpu":
            return CpuLogProbs.apply(hidden, head.weight, head.bias, targets, outputs)
        return ChunkedLogProbFunction.apply(hidden, head.weight, head.bias, targets, 1.0, VOCAB_CHUNK, None, 1.0,
                                            outputs)


def module_log_probs(head, hidden, targets, outputs: tuple[str, ...]):
    """head_log_probs through the LM head's own module, then logits_log_probs: ZeRO-3 gathers a partitioned weight
    and reduces its gradient in hooks around the module's forward, which a kernel given the weight itself bypasses
    (TRL's too: it refuses such a head). The same values as CpuLogProbs, holding every scored position's logits."""
    return logits_log_probs(rows_through(head, hidden.to(compute_dtype(hidden))).float(), targets, outputs)


class CpuLogProbs(torch.autograd.Function):
    """TRL's ChunkedLogProbFunction (temperature 1, no logit transforms) for the CPU, from ATen's log-softmax and
    softmax kernels. TRL's CPU tiles call `torch.exp` and `torch.log`, which torch computes with MKL's vector math,
    and MKL computes those differently on Intel and AMD CPUs whatever MKL_CBWR says (the last bit of a few percent
    of values; numerics.mkl_vendor_dependent): SFT gradients and DPO metrics then differed between vendors. ATen's
    own kernels give the same bits on every x86-64 CPU under alignkit's portable settings (numerics.py).

    Outputs as TRL's: log-probs, then entropy, log(sum p^2), mean logit and is-top-1 when asked for (None when not);
    gradients flow through the log-probs and the entropy. Positions run in tiles of at most TOKENS (`tiles`), each
    through the whole vocabulary. The backward reuses the forward's logits where they take at most KEEP_BYTES (TRL's
    kernel always recomputes them: on a GPU memory is short, and long sequences score thousands of positions); past
    that it recomputes each tile's, the same bits either way. Keeping them saves one of the head's three products per
    position: on the smol DPO step's 215 scored positions, 42 MB and 12 GFLOP (~4 % of the step)."""

    TOKENS = 256
    KEEP_BYTES = 512 * 2 ** 20

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, outputs):
        ctx.set_materialize_grads(False)
        dtype = compute_dtype(hidden)
        n = hidden.shape[0]
        log_probs = torch.zeros(n)
        entropy, log_sum_sq, mean_logits = (torch.zeros(n) if k in outputs else None
                                            for k in ("entropy", "log_sum_sq_probs", "mean_logits"))
        is_top1 = torch.zeros(n, dtype=torch.bool) if "is_top1" in outputs else None
        # only when a backward will come (needs_input_grad is set under no_grad too; hidden states computed under
        # no_grad, as in evaluation and the reference pass, do not require grad)
        keep = hidden.requires_grad and n * weight.shape[0] * 4 <= CpuLogProbs.KEEP_BYTES
        ctx.logits = []  # per tile, for the backward (empty: it recomputes them)
        for rows in tiles(n):
            z = tile_logits(hidden[rows], weight, bias, dtype)
            values = logits_log_probs(z, targets[rows], outputs)
            for whole, tile in zip((log_probs, entropy, log_sum_sq, mean_logits, is_top1), values):
                if whole is not None:
                    whole[rows] = tile
            if keep:
                ctx.logits.append(z)
        ctx.save_for_backward(hidden, weight, bias, targets, entropy)
        ctx.dtype = dtype
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, bias, targets, entropy = ctx.saved_tensors
        kept, ctx.logits = ctx.logits, []  # freed as used; a second backward (retain_graph) recomputes them
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros(hidden.shape) if needs_hidden else None
        with maybe_gather_lm_head_ctx(weight, bias):
            grad_weight = torch.zeros(weight.shape) if needs_weight else None
            grad_bias = torch.zeros(bias.shape) if needs_bias else None
            weight32 = weight.float()
            for i, rows in enumerate(tiles(hidden.shape[0])):
                z = kept[i] if kept else tile_logits(hidden[rows], weight, bias, ctx.dtype)
                if kept:
                    kept[i] = None
                p = torch.softmax(z, -1)
                grad = torch.zeros_like(z)
                if grad_log_probs is not None:  # d log p_target / dz_j = 1[j = target] - p_j
                    grad -= grad_log_probs[rows, None].float() * p
                    grad.scatter_add_(-1, targets[rows, None], grad_log_probs[rows, None].float())
                if grad_entropy is not None:  # d entropy / dz_j = -p_j (log p_j + entropy)
                    grad -= grad_entropy[rows, None].float() * p * (torch.log_softmax(z, -1) + entropy[rows, None])
                grad = grad.to(ctx.dtype).float()  # as TRL's tile: the logits' gradient in the compute dtype
                if grad_hidden is not None:
                    grad_hidden[rows] = product(grad, weight32)
                if grad_weight is not None:
                    grad_weight.addmm_(grad.t(), hidden[rows].float())
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def logits_log_probs(z, targets, outputs: tuple[str, ...]):
    """For the fp32 logits `z` of scored positions and their target ids: log-probs, then entropy, log(sum p^2), mean
    logit and is-top-1 where `outputs` asks for them (None where not), as TRL's kernel returns them, from ATen's
    log-softmax and softmax kernels. Under autograd, differentiable through the log-probs and the entropy."""
    # the log-probs from a float64 log-softmax: in fp32 its rounding and that of TRL's online log-sum-exp differ by
    # ~1 ulp of log p, which losses that amplify log-ratios (sppo_hard, discopop) carry to 1e-6 of the gradient; in
    # float64 only TRL's own rounding is left (tests/test_scoring.py)
    log_probs = torch.log_softmax(z, -1, dtype=torch.float64).gather(-1, targets[:, None]).squeeze(-1).float()
    log_p = torch.log_softmax(z, -1) if "entropy" in outputs or "log_sum_sq_probs" in outputs else None
    entropy = -(torch.softmax(z, -1) * log_p).sum(-1) if "entropy" in outputs else None
    with torch.no_grad():
        log_sum_sq = mean_logits = is_top1 = None
        if "log_sum_sq_probs" in outputs:  # log sum exp(2 log p), as 2 max log p - log_softmax(2 log p) at the max
            top = log_p.argmax(-1, keepdim=True)
            log_sum_sq = 2 * log_p.gather(-1, top).squeeze(-1) - torch.log_softmax(2 * log_p, -1).gather(
                -1, top).squeeze(-1)
        if "mean_logits" in outputs:
            mean_logits = z.mean(-1)
        if "is_top1" in outputs:  # argmax is the first maximum: a tie with an earlier token is not top-1, as TRL's
            is_top1 = z.argmax(-1) == targets
    return log_probs, entropy, log_sum_sq, mean_logits, is_top1


def tiles(n: int) -> list[slice]:
    """n positions in tiles of at most CpuLogProbs.TOKENS, as equal as can be: no tile of one row beside others (a
    one-row product is a matrix-vector product)."""
    count = -(-n // CpuLogProbs.TOKENS)
    return [slice(n * i // count, n * (i + 1) // count) for i in range(count)]


def compute_dtype(x):
    """The dtype the head's product runs in: autocast's where it is on for the CPU, else x's own."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def rows_through(f, x):
    """f(x) for a row-wise f ending in a matrix product, never as a matrix-vector product — MKL's bits for those
    depend on the CPU's vendor (numerics.mkl_vendor_dependent): a single row of x is computed as two."""
    return f(torch.cat([x, x]))[:1] if x.shape[0] == 1 else f(x)


def product(a, b):
    """a @ b, never as a matrix-vector product (rows_through)."""
    return rows_through(lambda rows: rows @ b, a)


def tile_logits(hidden, weight, bias, dtype):
    """fp32 logits of a tile of positions, the product in the compute dtype (as TRL's tiles)."""
    z = product(hidden.to(dtype), weight.to(dtype).t())
    return (z if bias is None else z + bias.to(dtype)).float()


def fused_output(labels, per_token, place) -> FusedCausalLMOutput:
    """TRL's FusedCausalLMOutput from the scored positions' values; `place(x)` lays one field out as [rows, len - 1]
    with zeros where the label is -100."""
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (None if x is None else place(x) for x in per_token)
    label_mask = labels[:, 1:] != -100
    loss = -log_probs.sum() / label_mask.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=label_mask)


class CompletionScorer:
    """What TRL's loss calls as the policy (`model(**inputs, labels=labels, fused_lm_head=True)`): the model's own
    forward for the hidden states, then TRL's kernel on the positions whose next token has a label. Anything else
    is passed to the model unchanged."""

    def __init__(self, model, outputs: tuple[str, ...]):
        self.model, self.outputs = model, outputs

    def fits(self, args, kwargs, fused_lm_head, labels) -> bool:
        return bool(fused_lm_head) and not args and labels is not None and set(kwargs) <= PLAIN_INPUTS

    def __call__(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not self.fits(args, kwargs, fused_lm_head, labels):
            return self.model(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        out = self.model(**{**kwargs, "use_cache": False}, output_hidden_states=True, logits_to_keep=no_logits())
        scored = labels[:, 1:] != -100
        per_token = head_log_probs(self.model, out.hidden_states[-1][:, :-1][scored], labels[:, 1:][scored],
                                   self.outputs)
        # masked_scatter, as TRL's own compact path: connected to the model even when no label is scored
        return fused_output(labels, per_token, lambda x: x.new_zeros(scored.shape).masked_scatter(scored, x))


class PairScorer(CompletionScorer):
    """CompletionScorer for TRL's DPO batches: each pair's one-row forward (pair_layout), scored the same way."""

    def __call__(self, *args, fused_lm_head=False, labels=None, **kwargs):
        layout = None
        if self.fits(args, kwargs, fused_lm_head, labels) and set(kwargs) <= {"input_ids", "attention_mask",
                                                                                "use_cache"}:
            layout = pair_layout(kwargs["input_ids"], kwargs["attention_mask"], labels)
        if layout is None:
            return self.model(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        ids, position_ids, allowed, hidden_at, target, out_row, out_col = layout
        base = unwrapped(self.model)
        if base.config.get_text_config()._attn_implementation in ("sdpa", PORTABLE_SDPA):
            mask = allowed  # SDPA: True = attends, as transformers' own SDPA masks
        else:  # eager attention adds the mask to the scores
            weight = base.get_output_embeddings().weight
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
            mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill_(~allowed,
                                                                                             torch.finfo(dtype).min)
        out = self.model(input_ids=ids, attention_mask=mask.unsqueeze(1), position_ids=position_ids, use_cache=False,
                         output_hidden_states=True, logits_to_keep=no_logits())
        per_token = head_log_probs(self.model, out.hidden_states[-1][hidden_at[:, 0], hidden_at[:, 1]], target,
                                   self.outputs)
        shape = (labels.size(0), labels.size(1) - 1)
        return fused_output(labels, per_token, lambda x: x.new_zeros(shape).index_put((out_row, out_col), x))


def scoring_off(trainer, stage: str) -> str | None:
    """Why `trainer`'s model runs through TRL's own forward (None: through the scorer); decided once, on first use
    (TRL's DPO trainer scores its reference pass inside its own __init__)."""
    if not hasattr(trainer, "_alignkit_scoring_off"):
        trainer._alignkit_scoring_off = unsupported(trainer.model)
        if trainer._alignkit_scoring_off:
            logger.info("%s scoring: TRL's own forward (%s)", stage, trainer._alignkit_scoring_off)
    return trainer._alignkit_scoring_off


class CompletionScoringSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with the policy run through CompletionScorer when the model allows it."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scorer = model if scoring_off(self, "SFT") else CompletionScorer(model, SFT_OUTPUTS)
        return super().compute_loss(scorer, inputs, return_outputs, num_items_in_batch)


class PairScoringDPOTrainer(StoredReferenceDPOTrainer):
    """TRL's DPOTrainer (reading stored reference log-probs where attached), with the policy — and the reference
    pass, which must score the same way — run through PairScorer when the model allows it."""

    def scorer(self, model):
        if scoring_off(self, "DPO"):
            return model
        return PairScorer(model, DPO_OUTPUTS + (("log_sum_sq_probs",) if self.args.use_weighting else ()))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(self.scorer(model), inputs, return_outputs, num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(self.scorer(model), inputs)
