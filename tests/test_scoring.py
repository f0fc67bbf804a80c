"""PairScoringDPOTrainer (one row per pair, only completion positions through the LM head) computes what TRL's own
DPOTrainer computes: the same loss, rewards, metrics and gradients to 1e-6, for every DPO loss type, with WPO
weighting and LD-DPO's ld_alpha, and the same reference log-probs; and batches or models that do not fit its layout
fall back to TRL's forward."""

from __future__ import annotations

import pytest
import torch

from alignkit.train.dpo import LOSS_TYPES

# Prompts, chosen and rejected answers of different lengths, so rows pad differently in TRL's layout and in the
# one-row-per-pair layout.
ROWS = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "The capital of France is London, I think."}]},
    {"prompt": [{"role": "user", "content": "Say hello."}],
     "chosen": [{"role": "assistant", "content": "Hello! How can I help you today?"}],
     "rejected": [{"role": "assistant", "content": "Bye."}]},
    {"prompt": [{"role": "user", "content": "What is two plus two? Answer in one word, please."}],
     "chosen": [{"role": "assistant", "content": "Four."}],
     "rejected": [{"role": "assistant", "content": "Five."}]},
    {"prompt": [{"role": "user", "content": "Is a cat an animal?"}],
     "chosen": [{"role": "assistant", "content": "Yes. Cats and dogs are animals."}],
     "rejected": [{"role": "assistant", "content": "No."}]},
]


def trainers(tmp_path, model_path, *, lora=True, **config):
    """TRL's DPOTrainer and alignkit's, on identical models (same LoRA initialisation), data and arguments."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignkit.train.scoring import PairScoringDPOTrainer

    built = []
    for name, cls in (("trl", DPOTrainer), ("alignkit", PairScoringDPOTrainer)):
        torch.manual_seed(0)
        args = DPOConfig(**{"output_dir": str(tmp_path / name), "per_device_train_batch_size": len(ROWS),
                            "bf16": False, "use_cpu": True, "report_to": "none", "gradient_checkpointing": False,
                            "max_length": 64, "precompute_ref_log_probs": False, **config})
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
        peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          task_type="CAUSAL_LM") if lora else None
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(ROWS),
                      processing_class=AutoTokenizer.from_pretrained(model_path), peft_config=peft)
        with torch.no_grad():  # a policy that moved from its reference: rewards that are not all zero or symmetric
            for n, p in trainer.model.named_parameters():
                noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n)))
                if "lora_B" in n:
                    p.copy_(noise * 0.05)
                elif not lora:
                    p.add_(noise * 0.02)
        built.append(trainer)
    return built


def batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def loss_metrics_grads(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.item(), metrics, grads


def seen_by(module, measure, run):
    """`measure(inputs, output)` of each call of `module` while `run()` ran, and run()'s result."""
    seen = []
    hook = module.register_forward_hook(lambda m, a, out: seen.append(measure(a, out)))
    try:
        return seen, run()
    finally:
        hook.remove()


def rows_through(trainer, run):
    """The number of rows of each batch the model's embedding saw while `run()` ran, and run()'s result."""
    return seen_by(trainer.model.get_input_embeddings(), lambda a, out: out.shape[0], run)


def head_positions(trainer, run):
    """How many positions each call of the model's own LM head module projected while `run()` ran (the scorers'
    kernel reads the head's weight, not the module), and run()'s result."""
    return seen_by(trainer.model.get_output_embeddings(), lambda a, out: a[0].shape[:-1].numel(), run)


def assert_gradients_equal(grads_a, grads_b):
    """Each parameter's gradient to 1e-6 of its norm (fp32 sums in another order differ in the last bits; where a
    loss amplifies, as sppo_hard's square of log-ratios of ~50, an element can differ by 1e-5 of itself)."""
    for n in grads_a:
        error = (grads_b[n] - grads_a[n]).norm().item()
        assert error <= 1e-6 * max(grads_a[n].norm().item(), 1e-6), (n, error, grads_a[n].norm().item())


def assert_same(tmp_path, model_path, shared=True, lora=True, **config):
    stock, ours = trainers(tmp_path, model_path, lora=lora, **config)
    inputs = batch(stock)
    assert torch.equal(inputs["input_ids"], batch(ours)["input_ids"])
    loss_a, metrics_a, grads_a = loss_metrics_grads(stock, inputs)
    heads, (seen, (loss_b, metrics_b, grads_b)) = head_positions(
        ours, lambda: rows_through(ours, lambda: loss_metrics_grads(ours, inputs)))
    # the policy ran once per pair (one row each), not TRL's chosen rows + rejected rows (or it fell back); then,
    # with LoRA, TRL's own reference forward through the same model (precompute_ref_log_probs is off here)
    assert seen == [len(ROWS) if shared else 2 * len(ROWS)] + ([2 * len(ROWS)] if lora else [])
    if shared:  # the policy's own LM head projected nothing: the scored positions went through TRL's kernel alone
        assert heads[0] == 0, heads
    assert loss_b == pytest.approx(loss_a, rel=1e-6, abs=1e-6)
    assert set(metrics_a) == set(metrics_b)
    for k in metrics_a:
        assert metrics_b[k] == pytest.approx(metrics_a[k], rel=1e-6, abs=1e-6), k
    assert set(grads_a) == set(grads_b) and grads_a
    assert_gradients_equal(grads_a, grads_b)
    # not a vacuous comparison: the adapter's rewards differ between chosen and rejected, and gradients flow
    assert metrics_a["rewards/margins"] != 0 and any(g.abs().sum() > 0 for g in grads_a.values())
    return stock, ours, inputs


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_equals_trl(tmp_path, tiny_model, loss_type):
    extra = {"label_smoothing": 1e-3} if loss_type == "exo_pair" else {}
    assert_same(tmp_path, tiny_model, loss_type=[loss_type], **extra)


def test_combined_losses_equal_trl(tmp_path, tiny_model):
    assert_same(tmp_path, tiny_model, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])


def test_wpo_weighting_and_ld_alpha_equal_trl(tmp_path, tiny_model):
    """(TRL 1.16 itself fails on use_weighting with the `sft` and `hinge` losses: it scales them in place.)"""
    assert_same(tmp_path, tiny_model, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], use_weighting=True,
                ld_alpha=0.5)


def test_full_fine_tuning_equals_trl(tmp_path, tiny_model):
    """Every weight trained, the (tied) LM head included: its gradient comes through the chunked kernel."""
    assert_same(tmp_path, tiny_model, lora=False, loss_type=["sigmoid"], beta=0.3)


def test_reference_log_probs_equal_trl_and_the_layout_is_one_row_per_pair(tmp_path, tiny_model):
    from alignkit.train.scoring import pair_layout

    stock, ours, inputs = assert_same(tmp_path, tiny_model, loss_type=["sigmoid"])
    ref_a = stock.compute_ref_log_probs(stock.model, inputs)
    ref_b = ours.compute_ref_log_probs(ours.model, inputs)
    for a, b in zip(ref_a, ref_b):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    ids, _, allowed, _, target, _, _ = pair_layout(inputs["input_ids"], inputs["attention_mask"], labels)
    pairs, width = len(ROWS), inputs["input_ids"].size(1)
    # fewer positions through the model than TRL's 2 rows per pair, and only completion tokens scored
    assert ids.shape[0] == pairs and ids.numel() < 2 * pairs * width
    assert len(target) == int(inputs["completion_mask"].sum())
    assert not allowed[:, torch.arange(ids.size(1)), torch.arange(ids.size(1))].logical_not().any()


def test_pairs_whose_prompts_differ_fall_back_to_trls_forward(tmp_path, tiny_model):
    """keep_end truncation cuts prompt + chosen and prompt + rejected at different places: no shared prompt, so the
    batch goes through TRL's own forward — and still gives TRL's numbers."""
    from alignkit.train.scoring import pair_layout

    stock, ours, inputs = assert_same(tmp_path, tiny_model, shared=False, loss_type=["sigmoid"], max_length=18,
                                      truncation_mode="keep_end")
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    assert pair_layout(inputs["input_ids"], inputs["attention_mask"], labels) is None


def test_flash_attention_and_logit_softcapping_use_trls_forward(tiny_model):
    from transformers import AutoModelForCausalLM

    from alignkit.train.scoring import unsupported

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    assert unsupported(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "logits" in unsupported(model)
    model.config.final_logit_softcapping = None
    model.config._attn_implementation = "flash_attention_2"
    assert "flash" in unsupported(model)


def sft_trainers(tmp_path, model_path, rows, **config):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from alignkit.train.scoring import CompletionScoringSFTTrainer

    built = []
    for name, cls in (("trl", SFTTrainer), ("alignkit", CompletionScoringSFTTrainer)):
        torch.manual_seed(0)
        args = SFTConfig(**{"output_dir": str(tmp_path / name), "per_device_train_batch_size": len(rows),
                            "bf16": False, "use_cpu": True, "report_to": "none", "gradient_checkpointing": False,
                            "max_length": 64, **config})
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
        peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=AutoTokenizer.from_pretrained(model_path), peft_config=peft)
        with torch.no_grad():
            for n, p in trainer.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
        built.append(trainer)
    return built


@pytest.mark.parametrize("assistant_only_loss", [True, False])
def test_sft_equals_trl(tmp_path, tiny_model, assistant_only_loss):
    """Conversations of different lengths; with assistant_only_loss only the answers are scored (CompletionScorer
    projects those positions alone), without it every token after the first."""
    rows = [{"messages": r["prompt"] + r["chosen"]} for r in ROWS]
    stock, ours = sft_trainers(tmp_path, tiny_model, rows, assistant_only_loss=assistant_only_loss)
    inputs = batch(stock)
    assert torch.equal(inputs["input_ids"], batch(ours)["input_ids"])
    loss_a, metrics_a, grads_a = loss_metrics_grads(stock, inputs)
    heads, (loss_b, metrics_b, grads_b) = head_positions(ours, lambda: loss_metrics_grads(ours, inputs))
    assert heads == [0]  # the model's own LM head projected nothing; TRL's kernel scored the labelled positions
    assert loss_b == pytest.approx(loss_a, rel=1e-6, abs=1e-6)
    assert set(metrics_a) == set(metrics_b) and "entropy" in metrics_a
    for k in metrics_a:
        assert metrics_b[k] == pytest.approx(metrics_a[k], rel=1e-6, abs=1e-6), k
    assert set(grads_a) == set(grads_b) and grads_a
    assert_gradients_equal(grads_a, grads_b)
    if assistant_only_loss:  # the prompt is not scored: far fewer positions than TRL projects on this CPU
        labels = inputs["labels"][:, 1:]
        assert 0 < int((labels != -100).sum()) < labels.numel() // 2


@pytest.mark.parametrize("rows", [1, 37, 300])
def test_the_head_module_path_equals_the_cpu_kernel(rows):
    """What a trainable LM head under ZeRO-3 on the CPU scores through (the head's own module, so that ZeRO-3's hooks
    gather its weight and reduce its gradient, then logits_log_probs) gives CpuLogProbs' values and gradients: rows
    across CpuLogProbs' tiles, and a single row (computed as two)."""
    from alignkit.train.scoring import DPO_OUTPUTS, CpuLogProbs, module_log_probs

    outputs = DPO_OUTPUTS + ("log_sum_sq_probs",)
    generator = torch.Generator().manual_seed(rows)
    head = torch.nn.Linear(24, 1000, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1000, 24, generator=generator))
    hidden = torch.randn(rows, 24, generator=generator)
    targets = torch.randint(0, 1000, (rows,), generator=generator)
    upstream = torch.randn(2, rows, generator=generator)
    results = []
    for path in ("kernel", "module"):
        h, w = hidden.clone().requires_grad_(), head.weight
        w.grad = None
        if path == "kernel":
            values = CpuLogProbs.apply(h, w, None, targets, outputs)
        else:
            values = module_log_probs(head, h, targets, outputs)
        ((values[0] * upstream[0]).sum() + (values[1] * upstream[1]).sum()).backward()
        results.append((values, h.grad, w.grad.clone()))
    (kernel, hk, wk), (module, hm, wm) = results
    for a, b in zip(kernel, module):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert_gradients_equal({"hidden": hk, "weight": wk}, {"hidden": hm, "weight": wm})


@pytest.mark.parametrize("rows", [37, 300])
def test_cpu_kernel_reuses_its_logits_with_the_same_bits(rows, monkeypatch):
    """CpuLogProbs' backward takes the logits its forward computed (one product of the LM head per tile fewer) and
    gives exactly the values and gradients of recomputing them — which it still does past KEEP_BYTES, and for a
    second backward through a retained graph."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from alignkit.train.scoring import DPO_OUTPUTS, CpuLogProbs, tiles

    class HeadProducts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm") and 1000 in args[-1].shape + args[-2].shape:
                self.count += 1
            return func(*args, **(kwargs or {}))

    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(1000, 24, generator=generator)
    hidden = torch.randn(rows, 24, generator=generator)
    targets = torch.randint(0, 1000, (rows,), generator=generator)
    upstream = torch.randn(2, rows, generator=generator)
    runs = {}
    for keep in (CpuLogProbs.KEEP_BYTES, 0):
        monkeypatch.setattr(CpuLogProbs, "KEEP_BYTES", keep)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with HeadProducts() as counted:
            values = CpuLogProbs.apply(h, w, None, targets, DPO_OUTPUTS)
            forward = counted.count
            ((values[0] * upstream[0]).sum() + (values[1] * upstream[1]).sum()).backward(retain_graph=True)
        runs[keep] = (values, h.grad.clone(), w.grad.clone(), forward, counted.count - forward)
        ((values[0] * upstream[0]).sum() + (values[1] * upstream[1]).sum()).backward()  # recomputes: twice the grads
        assert torch.equal(h.grad, 2 * runs[keep][1]) and torch.equal(w.grad, 2 * runs[keep][2])
    (kept_values, kept_h, kept_w, kept_fwd, kept_bwd), (values, grad_h, grad_w, fwd, bwd) = runs.values()
    for a, b in zip(kept_values, values):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(kept_h, grad_h) and torch.equal(kept_w, grad_w)
    n_tiles = len(tiles(rows))
    assert kept_fwd == fwd == n_tiles and bwd - kept_bwd == n_tiles
