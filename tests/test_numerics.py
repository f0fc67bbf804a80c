"""alignkit's portable CPU numerics (alignkit/numerics.py) make a product's bits independent of the thread count:
a machine with more cores runs torch with more threads, and the committed numbers must not depend on that."""

from __future__ import annotations

import os
import subprocess
import sys

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


def product_bits(threads: int, **env) -> tuple[str, int, str]:
    run_env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY",
                                                                 "ONEDNN_MAX_CPU_ISA", "ALIGNKIT_CPU_NUMERICS")}
    run_env.update(env)
    done = subprocess.run([sys.executable, "-c", PRODUCT, str(threads)], env=run_env, capture_output=True, text=True,
                          check=True)
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
