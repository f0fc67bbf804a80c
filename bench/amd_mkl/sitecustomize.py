"""Loaded by Python at start-up when bench/amd_mkl.sh puts this folder on PYTHONPATH: on an Intel CPU, computes the
three kinds of MKL work whose bits depend on the CPU's vendor as MKL computes them on an AMD CPU, and everything else
as usual, to show (issue 15) that these three are all that makes Intel's results differ from the AMD-made ones.

With alignkit's portable settings (`MKL_CBWR=AVX2,STRICT`), MKL gives the same bits on Intel and AMD for matrix
products, but on AMD it runs its vector-math functions (VML: `torch.exp`, `torch.log` on float32) and its
matrix-vector products (one row or one column) on code it also has for Intel under `MKL_CBWR=AVX,STRICT` (measured:
bench/results/intel/amd_mkl.json). MKL fixes its branch once per process, so a worker process started with that
setting computes those operations; a TorchDispatchMode (torch's own hook for intercepting operators) sends them
there. A diagnostic, never used by alignkit itself: every operation goes through Python, so it runs ~1.5x slower.
"""

import atexit
import importlib
import os
import sys

ROUTED = {"exp.default", "log.default", "exp_.default", "log_.default"}  # vector math; mm: see is_matrix_vector


def _worker(conn) -> None:
    import torch

    torch.set_num_threads(1)  # AMD's matrix-vector bits are Intel's AVX branch's on one thread (2 threads: others)
    while True:
        try:
            name, args = conn.recv()
        except EOFError:
            return
        op, overload = name.split(".")
        conn.send(getattr(getattr(torch.ops.aten, op.rstrip("_")), overload)(*args))


def _install() -> None:
    importlib.import_module("alignkit")  # alignkit's portable settings, before torch loads
    import multiprocessing

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    state = {"conn": None, "count": 0}

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

    def is_matrix_vector(name, args) -> bool:
        return name == "mm.default" and (args[0].shape[0] == 1 or args[1].shape[1] == 1)

    class AmdMkl(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func).removeprefix("aten.")
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if (not kwargs and tensors and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
                    and (name in ROUTED or is_matrix_vector(name, args))):
                c = conn()
                c.send((name, [a.detach().contiguous() if isinstance(a, torch.Tensor) else a for a in args]))
                out = c.recv()
                state["count"] += 1
                return args[0].copy_(out) if name.endswith("_.default") else out
            return func(*args, **(kwargs or {}))

    AmdMkl().__enter__()
    atexit.register(lambda: state["count"] and print(
        f"[amd_mkl] {state['count']} operations computed as MKL computes them on AMD", file=sys.stderr))


if os.environ.get("ALIGNKIT_AMD_MKL") == "1" and not os.environ.get("ALIGNKIT_AMD_MKL_WORKER"):
    _install()
