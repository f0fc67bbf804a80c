"""What every command shares: what it prints (alignkit's own progress and real warnings; third-party noise only with
--verbose), one error handling (a user error is one line and exit status 2, a preempted run exits for requeue) and
the argument forms several commands take."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

from alignkit.errors import REQUEUE_EXIT, USER_ERROR_EXIT, USER_ERRORS, Preempted, UsageError

LOG_LEVEL = "ALIGNKIT_LOG_LEVEL"  # unset: quiet; INFO or DEBUG: every library at that level (= --verbose)
# The environment variables quiet mode set itself (not the user), so that --verbose in a process that inherited them
# (a child of a quiet alignkit, or a program that called a command's main() in-process) turns them off again.
QUIETED_BY_ALIGNKIT = "ALIGNKIT_QUIETED"
# Third-party messages that tell an alignkit user nothing to act on, as (logger, start of the message). Anything
# else a library warns about is shown.
NOISE = (
    # bitsandbytes 0.50 looks for an optional kernels package on every import, then uses its own CPU kernel.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # DeepSpeed on a machine without a GPU (the distributed CPU tests, alignkit launch on CPU) says it uses the CPU.
    ("DeepSpeed", "Setting accelerator to CPU"),
)
NOISY_WARNINGS = (
    # PEFT 0.21's get_peft_model reads transformers 5's deprecated attribute itself; alignkit passes the new names.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)
_configured: dict = {}


class _DropNoise(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def configure_output(argv: list[str]) -> list[str]:
    """Set up what a command prints, before the libraries load (some warn on import); returns argv without
    `--verbose`. Quiet by default: alignkit's own log at INFO, other libraries' at WARNING less NOISE, no dataset
    progress bars (training shows its own). `--verbose` or ALIGNKIT_LOG_LEVEL=INFO|DEBUG: everything, at that
    level (also in the processes a launch starts, which inherit the environment)."""
    if "--verbose" in argv:
        argv = [a for a in argv if a != "--verbose"]
        os.environ[LOG_LEVEL] = "INFO"
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if _configured:
        return argv
    level = os.environ.get(LOG_LEVEL, "").upper()
    verbose = level in ("INFO", "DEBUG")
    if verbose:
        for key in filter(None, os.environ.pop(QUIETED_BY_ALIGNKIT, "").split(",")):
            os.environ.pop(key, None)
    logging.basicConfig(level=getattr(logging, level) if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alignkit").setLevel(getattr(logging, level, logging.INFO) if level else logging.INFO)
    if not verbose:
        if "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ:
            os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
            os.environ[QUIETED_BY_ALIGNKIT] = "HF_DATASETS_DISABLE_PROGRESS_BARS"
        for name, start in NOISE:
            logging.getLogger(name).addFilter(_DropNoise(start))
        for category, message in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
    _configured["verbose"] = verbose
    return argv


def run_cli(command: str, body, argv) -> int:
    """Run `body(argv)`; a user error becomes `alignkit <command>: error: <message>` and exit status 2; a
    preempted run (checkpoint saved after SIGTERM/SIGUSR1) exits with REQUEUE_EXIT."""
    argv = configure_output(list(sys.argv[1:] if argv is None else argv))
    status = 1
    try:
        status = body(argv) or 0
        return status
    except USER_ERRORS as e:
        print(f"alignkit {command}: error: {e}", file=sys.stderr)
        status = USER_ERROR_EXIT
        return status
    except Preempted as e:
        print(f"alignkit {command}: {e}", file=sys.stderr)
        status = REQUEUE_EXIT
        return status
    finally:
        leave_process_group(all_ranks_here=status in (0, REQUEUE_EXIT))


def leave_process_group(all_ranks_here: bool) -> None:
    """Destroy the distributed process group before the interpreter exits. A rank that exits with it open can
    abort in the communication library's threads at shutdown ("terminate called without an active exception",
    seen on a 2-rank DeepSpeed CPU run), and the elastic agent then SIGTERMs the other ranks, possibly while rank 0
    still writes. After a finished or preempted run every rank gets here: wait for all first. After an error the
    others may never arrive, so leave without waiting."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist  # only when the run already loaded torch

    if not (dist.is_available() and dist.is_initialized()):
        return
    if all_ranks_here:
        with contextlib.suppress(Exception):
            dist.barrier()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def named_paths(values: list[str], flag: str) -> dict[str, str]:
    """`--models sft=build/models/sft dpo=build/models/dpo` → {"sft": ..., "dpo": ...}, in the order given."""
    out = {}
    for value in values:
        name, eq, path = value.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"{flag}: {value!r} is not NAME=PATH")
        if name in out or name == "base":
            raise UsageError(f"{flag}: the name {name!r} is used twice (base is the base model)")
        out[name] = path
    return out
