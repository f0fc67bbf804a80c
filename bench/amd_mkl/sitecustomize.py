"""Loaded by Python at start-up when bench/amd_mkl.sh puts this folder on PYTHONPATH. `ALIGNKIT_AMD_MKL=1` (Intel
CPUs): computes the MKL work whose bits depend on the CPU's vendor as MKL computes it on an AMD CPU, and everything
else as usual, to show (issue 15) that this work is all that makes Intel's results differ from AMD-made ones.
`ALIGNKIT_AMD_MKL=count` (any CPU): only counts that work. Either way each process reports at exit what it saw.

With alignkit's portable settings (`MKL_CBWR=AVX2,STRICT`), MKL gives the same bits on Intel and AMD for matrix
products, but on AMD it runs its vector-math functions (`torch.exp`, `torch.log`, ... on floats) and its
matrix-vector products (one row or one column) on code it also has for Intel under `MKL_CBWR=AVX,STRICT` (measured:
bench/results/intel/amd_mkl.json); which operations: alignkit.numerics.mkl_vendor_dependent. MKL fixes its branch
once per process, so a worker process started with that setting computes those operations; a TorchDispatchMode
(torch's own hook for intercepting operators) sends them there. A diagnostic, never used by alignkit itself: every
operation goes through Python, so it runs ~1.5x slower.
"""

import atexit
import importlib
import os
import sys


def _worker(conn) -> None:
    import torch

    torch.set_num_threads(1)  # AMD's matrix-vector bits are Intel's AVX branch's on one thread (2 threads: others)
    while True:
        try:
            name, args, kwargs = conn.recv()
        except EOFError:
            return
        op, overload = name.split(".")
        conn.send(getattr(getattr(torch.ops.aten, op.removesuffix("_")), overload)(*args, **kwargs))


def _install() -> None:
    importlib.import_module("alignkit")  # alignkit's portable settings, before torch loads
    import collections
    import multiprocessing

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from alignkit.numerics import mkl_vendor_dependent

    route = os.environ["ALIGNKIT_AMD_MKL"] == "1"
    state = {"conn": None, "seen": collections.Counter()}

    def conn():
        if state["conn"] is None:
            spawn = multiprocessing.get_context("spawn")  # a fresh process: MKL fixes its branch when it loads
            parent, child = spawn.Pipe()
            saved = dict(os.environ)
            os.environ.update(MKL_CBWR="AVX,STRICT", ALIGNKIT_AMD_MKL_WORKER="1")
            try:
                spawn.Process(target=_worker, args=(child,), daemon=True).start()
            finally:
                os.environ.clear()
                os.environ.update(saved)
            state["conn"] = parent
        return state["conn"]

    class AmdMkl(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name, kwargs = str(func).removeprefix("aten."), kwargs or {}
            kind = mkl_vendor_dependent(name, args)
            if not kind:
                return func(*args, **kwargs)
            state["seen"][kind] += 1
            if not route or "out" in kwargs:
                return func(*args, **kwargs)
            c = conn()
            c.send((name, [a.detach().contiguous() if isinstance(a, torch.Tensor) else a for a in args], kwargs))
            out = c.recv()
            return args[0].copy_(out) if name.endswith("_.default") else out

    AmdMkl().__enter__()

    def report():
        seen = ", ".join(f"{kind} {n}" for kind, n in sorted(state["seen"].items())) or "none"
        # one write of the whole line: processes sharing a stream (ranks of one stage) do not split each other's
        sys.stderr.write(f"[amd_mkl] vendor-dependent MKL work{' computed as on AMD' if route else ''}: {seen}\n")
        sys.stderr.flush()

    atexit.register(report)


if os.environ.get("ALIGNKIT_AMD_MKL") in ("1", "count") and not os.environ.get("ALIGNKIT_AMD_MKL_WORKER"):
    _install()
