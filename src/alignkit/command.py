"""What every command shares: one error handling (a user error is one line and exit status 2, a preempted run exits
for requeue) and the argument forms several commands take."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from alignkit.errors import REQUEUE_EXIT, USER_ERROR_EXIT, USER_ERRORS, Preempted, UsageError


def run_cli(command: str, body, argv) -> int:
    """Run `body(argv)`; a user error becomes `alignkit <command>: error: <message>` and exit status 2; a
    preempted run (checkpoint saved after SIGTERM/SIGUSR1) exits with REQUEUE_EXIT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    status = 1
    try:
        status = body(list(sys.argv[1:] if argv is None else argv)) or 0
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
