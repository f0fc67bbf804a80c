"""The errors a user can fix from the message alone, and the exit statuses a command ends with.

Every command reports these as one line, `alignkit <command>: error: <message>`, with exit status 2 (command.py);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib

# Exit status of a stage stopped by SIGTERM/SIGUSR1 after saving a checkpoint: EX_TEMPFAIL ("try again").
# slurm/launch.sh requeues the job on it; any rerun resumes.
REQUEUE_EXIT = 75
USER_ERROR_EXIT = 2


class RecipeError(ValueError):
    """A recipe problem: unknown key, wrong type, contradiction, missing GPU. The message names the key."""


class DataError(ValueError):
    """A bad row or source. The message names the source, the row and the field."""


class UsageError(ValueError):
    """Bad input to a tool (arguments, question or instruction files): the message says what and where."""


class JudgeError(RuntimeError):
    """The judge could not be reached or kept failing; the message says which endpoint and why."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite: training stopped instead of training on."""


class SaveError(RuntimeError):
    """What was saved is not the model that was trained (missing, empty or mis-shaped tensors)."""


class PublishError(RuntimeError):
    """An upload to the Hub failed; the output it would have published is intact."""


class Preempted(Exception):
    """A checkpoint was saved after SIGTERM/SIGUSR1; the process exits with REQUEUE_EXIT."""


USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError, DataError, UsageError, JudgeError, TrainingDiverged,
                                                PublishError, FileNotFoundError, IsADirectoryError)


def nearest(name: str, valid) -> str:
    """The valid names closest to a bad one, for 'unknown X; nearest: …' messages."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    if not close:  # fall back to names that share a word with the bad one
        words = set(name.lower().replace("-", "_").split("_")) - {""}
        close = [k for k in valid if words & set(k.split("_"))][:3]
    return ", ".join(close) if close else "(none close)"
