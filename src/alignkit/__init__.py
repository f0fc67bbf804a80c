"""alignkit: a thin layer over TRL, PEFT, bitsandbytes, accelerate/DeepSpeed, DVC and lm-eval."""

from . import numerics as _numerics

_numerics.apply()  # before anything imports torch: CPU results independent of the instruction set (numerics.py)
