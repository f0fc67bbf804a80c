"""alignkit's portable CPU numerics (alignkit/numerics.py) make a product's bits independent of the thread count:
a machine with more cores runs torch with more threads, and the committed numbers must not depend on that."""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys

from conftest import tiny_recipe, write_jsonl

# The shape of the LM head's vocabulary tile in TRL's chunked log-prob kernel (tokens × hidden @ hidden × 32768):
# large enough that MKL's threaded sgemm splits it, and differently for each thread count, unless in strict mode.
PRODUCT = """
import hashlib, sys
import alignkit  # first: its settings act only before torch loads
import torch
from alignkit.numerics import in_effect
torch.set_num_threads(int(sys.argv[1]))  # torch sets MKL's and OpenMP's thread counts with it
g = torch.Generator().manual_seed(0)
a, b = torch.randn(320, 576, generator=g), torch.randn(576, 32768, generator=g)
acc = torch.randn(320, 576, generator=g)
out = torch.mm(a, b)  # the forward tile: tokens x vocabulary chunk
acc.addmm_(out, b.t().contiguous())  # the backward: the tile's gradient back to the hidden states
digest = hashlib.sha256(out.numpy().tobytes() + acc.numpy().tobytes()).hexdigest()
print(in_effect()["cpu"], torch.get_num_threads(), digest)
"""


def run_python(code: str, *args: str, prefix: tuple[str, ...] = (), **env) -> subprocess.CompletedProcess:
    """`code` in a fresh process (alignkit's settings act only before torch loads), behind `prefix` if given, with
    this environment's numerics settings removed and `env` added."""
    run_env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY",
                                                                 "ONEDNN_MAX_CPU_ISA", "ALIGNKIT_CPU_NUMERICS")}
    run_env.update(env)
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], env=run_env, capture_output=True, text=True)


def product_bits(threads: int, **env) -> tuple[str, int, str]:
    done = run_python(PRODUCT, str(threads), **env)
    done.check_returncode()
    mode, n, digest = done.stdout.split()
    return mode, int(n), digest


def test_portable_products_have_the_same_bits_for_any_thread_count():
    runs = [product_bits(t) for t in (1, 2, 4)]
    assert [(mode, n) for mode, n, _ in runs] == [("portable", 1), ("portable", 2), ("portable", 4)]
    assert len({digest for _, _, digest in runs}) == 1


def test_what_mkls_branch_setting_does_on_this_cpu():
    """MKL's fixed code branches exist for Intel CPUs only (its developer guide). On Intel, the non-strict AVX2
    branch splits this product differently for each thread count: what the strict mode is for (if MKL ever stops
    doing so, this says so, and the setting can be reconsidered). On other CPUs (AMD), every branch setting but
    COMPATIBLE falls back to AUTO: the portable setting gives AUTO's bits, COMPATIBLE's differ — why a CPU of the
    other vendor reproduces forward passes but not all gradients (README, "The same bits on any x86-64 CPU")."""
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    if intel:
        runs = [product_bits(t, MKL_CBWR="AVX2") for t in (1, 2)]
        assert runs[0][2] != runs[1][2]
    else:
        portable, auto, compatible = (product_bits(2, **env)[2] for env in ({}, {"MKL_CBWR": "AUTO"},
                                                                            {"MKL_CBWR": "COMPATIBLE"}))
        assert portable == auto != compatible


# The work whose bits depend on the CPU's vendor under the portable settings (bench/results/intel/amd_mkl.json):
# MKL's vector-math exp and a matrix-vector product (a reward model's one-output score head).
VENDOR_WORK = """
import hashlib, sys
import alignkit
import torch
from alignkit.numerics import in_effect
torch.set_num_threads(int(sys.argv[1]))
x = ((torch.arange(29 * 4096, dtype=torch.float64) * 2654435761 % 10007) / 10007 - 0.9).float().reshape(29, 4096)
w = ((torch.arange(4096, dtype=torch.float64) * 40503 % 101) / 101 - 0.5).float().reshape(4096, 1)
print(in_effect()["cpu"], hashlib.sha256(torch.exp(x).numpy().tobytes() + (x @ w).numpy().tobytes()).hexdigest())
"""


def test_amd_mkl_computes_the_vendor_dependent_work_as_mkl_does_on_amd():
    """bench/amd_mkl.sh (issue 15's diagnosis): on an Intel CPU, exp and matrix-vector products get the bits of MKL's
    AVX branch on one thread (what MKL runs on AMD), unlike the portable settings' AVX2 branch; elsewhere it refuses
    in one line with exit status 2 (MKL computes as on AMD already)."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "amd_mkl.sh")
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    emulated = run_python(VENDOR_WORK, "2", prefix=("bash", script))
    if not intel:
        refusal = emulated.stderr.strip()
        assert emulated.returncode == 2 and refusal.startswith("amd_mkl.sh: this CPU is not an Intel one")
        assert "\n" not in refusal
        return
    assert emulated.returncode == 0, emulated.stderr
    portable = run_python(VENDOR_WORK, "2").stdout.split()[1]
    one_thread_avx = run_python(VENDOR_WORK, "1", MKL_CBWR="AVX,STRICT").stdout.split()[1]
    assert emulated.stdout.split() == ["portable", one_thread_avx]
    assert portable != one_thread_avx


@contextlib.contextmanager
def vendor_dependent_calls():
    """Counts, by kind, the calls of MKL work whose bits depend on the CPU's vendor (numerics.mkl_vendor_dependent)
    made inside the block."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from alignkit.numerics import mkl_vendor_dependent

    seen = collections.Counter()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kind = mkl_vendor_dependent(str(func).removeprefix("aten."), args)
            if kind:
                seen[kind] += 1
            return func(*args, **(kwargs or {}))

    with Record():
        yield seen


def test_training_scoring_and_sampling_call_no_vendor_dependent_mkl_work(tmp_path, tiny_model, tiny_data):
    """What makes a CPU pipeline's bits differ between Intel and AMD is gone from alignkit's paths: CPT, SFT, DPO
    (policy, reference and evaluation scoring) and reward-model training, each with its optimiser steps, scoring a
    single position, and sampled generation call none of it — TRL's CPU log-prob tiles (exp, log), a one-output
    score head (matrix-vector) and the Gumbel noise's log did."""
    import torch
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from alignkit.generation import RowSampler
    from alignkit.train import stage_module

    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "The capital of France is Paris. " * 8}] * 8)
    for stage in ("cpt", "sft", "dpo", "reward"):
        recipe = tiny_recipe(tmp_path, tiny_model, {**tiny_data, "text_train": text, "text_test": text}, stage,
                             max_steps=2, eval_strategy="steps", eval_steps=1, max_length=32)
        with vendor_dependent_calls() as seen:
            metrics = stage_module(stage).train(["--config", recipe])
        assert metrics and dict(seen) == {}, stage
    from alignkit.train.scoring import CpuLogProbs

    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(5, 32, generator=g), torch.randn(64, 32, generator=g)
    with vendor_dependent_calls() as seen:
        noise = RowSampler([0.7], [3]).gumbel(0, 4096)
        one = hidden[:1].clone().requires_grad_()
        CpuLogProbs.apply(one, head, None, torch.arange(1), ("log_probs", "entropy"))[0].sum().backward()
    assert dict(seen) == {} and torch.isfinite(noise).all() and one.grad.abs().sum() > 0
    # and the counter sees that work where it happens: TRL's kernel on the CPU, a plain score head, torch.log
    with vendor_dependent_calls() as seen:
        ChunkedLogProbFunction.apply(hidden, head, None, torch.arange(5), 1.0, 32768, None, 1.0, ("log_probs",))
        torch.nn.Linear(32, 1)(hidden)
        torch.log(torch.rand(8, generator=g))
    assert seen["exp"] and seen["log"] and seen["matrix-vector"]
