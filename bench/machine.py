"""This machine as the bench results record it: the CPU's name, its cores and the instruction-set extensions that
change which kernels run (AVX2, AVX-512 and its subsets, AMX). Linux (/proc/cpuinfo); elsewhere what Python knows."""

from __future__ import annotations

import os
import platform
import re


def cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor()


def isa_flags() -> list[str]:
    """The CPU's AVX2, AVX-512 and AMX flags, sorted."""
    return sorted(f for f in cpuinfo_field("flags").split() if re.fullmatch(r"avx2|avx512\w*|amx\w*", f))


def describe() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "isa": " ".join(isa_flags())}
