"""CPU numerics that do not depend on the machine's instruction set, so a CPU pipeline gives the same bits on any
x86-64 CPU with AVX2: on a CPU with AVX-512, MKL (torch's CPU BLAS), ATen's vectorised kernels and oneDNN otherwise
pick AVX-512 code paths whose sums round differently in the low bits (metrics then differ in the 6th digit).

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
PORTABLE_CPU_ENV = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
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
    return {"cpu": "portable" if portable else "native", **settings}
