"""CPU numerics that do not depend on the machine's instruction set, so a CPU pipeline gives the same bits on any
x86-64 CPU with AVX2: on a CPU with AVX-512, MKL (torch's CPU BLAS), ATen's vectorised kernels and oneDNN otherwise
pick AVX-512 code paths whose sums round differently in the low bits (metrics then differ in the 6th digit). On a
CPU with AVX-512 BF16, bitsandbytes also runs 4-bit layers in eval mode without gradients (evaluation, the
reference pass) through a kernel of its own on repacked weights, which the training pass does not use: a QLoRA
DPO's reference log-probs then differ from the policy's at step 0 (rewards not 0, the anima twin's loss 0.6808
instead of ln 2). `bitsandbytes_4bit` keeps every 4-bit layer on the kernel training uses (models.py).

MKL's AVX2 branch is taken in its strict mode (`MKL_CBWR=AVX2,STRICT`): without STRICT, MKL's threaded sgemm splits
a large product differently for each thread count (the same step's gradient norm differed between 1 and 2 threads),
so results would depend on how many cores a machine has, and its batched products for attention scores round
differently from the strict branch on Intel CPUs; with it, neither happens (tests/test_numerics.py).

Applied when `alignkit` is imported, before torch is (torch and its libraries read these when they load), as
defaults: a value already in the environment wins. `ALIGNKIT_CPU_NUMERICS=native` turns them off, for speed on
AVX-512 machines at the price of results that differ from the committed ones. GPUs are not affected (their kernels
are not bit-reproducible across GPU models anyway).
"""

from __future__ import annotations

import os
import platform
import sys

SWITCH = "ALIGNKIT_CPU_NUMERICS"  # portable (default) | native
PORTABLE_CPU_ENV = {"MKL_CBWR": "AVX2,STRICT", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
_state: dict = {}


def apply() -> None:
    """Set the portable CPU settings unless switched off or off x86-64. Once per process; if torch was imported
    before alignkit, the settings are too late for this process and it records itself as native."""
    if _state:
        return
    wanted = os.environ.get(SWITCH, "portable") != "native" and platform.machine().lower() in ("x86_64", "amd64")
    _state["torch_first"] = "torch" in sys.modules
    if wanted and not _state["torch_first"]:
        for key, value in PORTABLE_CPU_ENV.items():
            os.environ.setdefault(key, value)


def in_effect() -> dict:
    """What a manifest records: the mode and the settings this process runs under (the same on every machine in
    portable mode)."""
    apply()
    settings = {k: os.environ.get(k) for k in PORTABLE_CPU_ENV}
    portable = settings == PORTABLE_CPU_ENV and not _state["torch_first"]
    return {"cpu": "portable" if portable else "native", **settings,
            "bitsandbytes_4bit": "training kernel" if portable else "as the CPU allows"}


def portable_4bit(model) -> None:
    """In portable mode, every bitsandbytes 4-bit layer of `model` on CPU computes with the kernel the training
    pass uses, also in eval mode: bitsandbytes' own per-layer switch for its AVX-512 BF16 inference path
    (Linear4bit.support_avx512bf16_for_cpu, read on every forward) is turned off. Nothing else changes."""
    if in_effect()["cpu"] != "portable":
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


# What MKL computes with other bits on AMD CPUs than on Intel ones even under MKL_CBWR=AVX2,STRICT: on AMD it runs
# its vector math and its matrix-vector products (one row or one column) as its AVX branch does on Intel, not as the
# AVX2 one (measured for exp, log and those products: bench/results/intel/amd_mkl.json). So: the ATen operations torch
# hands to MKL's vector math (ATen/cpu/vml.h) whose bits differ between those two branches on an Intel Xeon — in
# float32 sin, cos and tanh are ATen's own, in float64 MKL's — and matrix-vector products. Not sqrt: MKL's AVX2 branch
# rounds it correctly, and AMD's gave the same bits (the anima twin's bitsandbytes optimiser, 420 square roots a step,
# trained to identical curves on both). alignkit's CPU paths call none of these on floats — scoring.CpuLogProbs,
# score_head.RowSumScore, generation's Gumbel noise (tests/test_numerics.py) — and bench/amd_mkl.sh --count counts
# any that a run still calls at the operator level. Kernels call MKL inside themselves too, where no operator hook
# sees it: torch's CPU flash attention multiplies one-row blocks for some lengths, which attention.py pads away
# (counted with MKL_VERBOSE=1: bench/vendor_work.py --mkl_verbose, tests/test_attention.py).
MKL_VECTOR_MATH = frozenset("exp log log2 log10 tan acos asin atan erf erfc erfinv".split())
MKL_VECTOR_MATH_FLOAT64 = frozenset("sin cos tanh".split())


def mkl_vendor_dependent(op: str, args) -> str | None:
    """For ATen operation `op` ('exp.default', 'mm.default', ...) called on CPU with `args`: the kind of MKL work
    whose bits depend on the CPU's vendor ('exp', 'matrix-vector', ...), or None."""
    import torch

    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(t.device.type != "cpu" or not t.is_floating_point() for t in tensors):
        return None
    name = op.split(".")[0].removesuffix("_")
    if name in MKL_VECTOR_MATH or (name in MKL_VECTOR_MATH_FLOAT64 and tensors[0].dtype == torch.float64):
        return name
    if name in ("mm", "addmm", "bmm", "baddbmm"):  # (input,) a, b: one row of a or one column of b
        a, b = args[-2], args[-1]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (a.shape[-2] == 1 or b.shape[-1] == 1):
            return "matrix-vector"
    if name in ("mv", "addmv"):
        return "matrix-vector"
    return None
