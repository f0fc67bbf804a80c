"""What keeps a long run alive and traceable: checkpoints that a rerun resumes from, preemption signals,
a stop on non-finite losses, a disk check before the first checkpoint, and the manifest of every output.

Checkpoints live beside the stage's output, in `.<output name>.checkpoints/` (DVC deletes a stage's declared
outputs before it reruns the stage, so they must not be inside it), under a fingerprint of everything that
determines the run: a rerun with the same recipe, data and starting model resumes from the last complete
checkpoint (model or adapter, optimizer, scheduler, RNG states, data position — the Trainer's own); anything
else starts afresh. They are removed once the final output is in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys

logger = logging.getLogger("alignkit")

# Exit status of a stage stopped by SIGTERM/SIGUSR1 after saving a checkpoint: EX_TEMPFAIL ("try again").
# slurm/launch.sh requeues the job on it; any rerun resumes.
REQUEUE_EXIT = 75
SECRET_WORDS = ("token", "key", "secret", "password")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite: training stopped instead of training on."""


class Preempted(Exception):
    """A checkpoint was saved after SIGTERM/SIGUSR1; the process exits with REQUEUE_EXIT."""


# ----------------------------------------------------------------------------------------------- checkpoints

def checkpoint_root(output_dir: str) -> str:
    output_dir = os.path.abspath(output_dir)
    return os.path.join(os.path.dirname(output_dir), f".{os.path.basename(output_dir)}.checkpoints")


def fingerprint(resolved: dict, paths: list[str]) -> str:
    """sha256 of the resolved recipe (less where it is written) and of the inputs' files (size + mtime: a
    regenerated input never resumes a run made from the old one)."""
    config = {k: v for k, v in resolved.items() if k not in ("output_dir", "logging_dir", "run_name")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path in paths:
        for file in _files(path):
            st = os.stat(file)
            h.update(f"{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    return []


def prepare_checkpoints(output_dir: str, key: str, *, main: bool = True) -> tuple[str, str | None]:
    """(the directory for this run's checkpoints, the last complete checkpoint to resume from or None)."""
    root = checkpoint_root(output_dir)
    run_dir = os.path.join(root, key)
    if main and os.path.isdir(root):
        for other in os.listdir(root):  # checkpoints of a different recipe/data/model: not resumable
            if other != key:
                shutil.rmtree(os.path.join(root, other), ignore_errors=True)
    return run_dir, last_complete_checkpoint(run_dir)


def last_complete_checkpoint(run_dir: str) -> str | None:
    """The highest `checkpoint-N` whose trainer_state.json (the Trainer writes it last) is present."""
    if not os.path.isdir(run_dir):
        return None
    steps = sorted((int(d.split("-")[1]) for d in os.listdir(run_dir)
                    if d.startswith("checkpoint-") and d.split("-")[1].isdigit()), reverse=True)
    for step in steps:
        path = os.path.join(run_dir, f"checkpoint-{step}")
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
    return None


def remove_checkpoints(output_dir: str) -> None:
    shutil.rmtree(checkpoint_root(output_dir), ignore_errors=True)


def check_disk(path: str, needed_bytes: int, what: str) -> None:
    """Refuse before training when the disk under `path` cannot hold `needed_bytes` (with 10 % to spare)."""
    from .config import RecipeError

    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * 1.1:
        raise RecipeError(f"{what} needs about {needed_bytes / 2**30:.2f} GiB at {path}, but only "
                          f"{free / 2**30:.2f} GiB is free there; free space or move output_dir")


def checkpoint_bytes(model, save_only_model: bool) -> int:
    """Size of one checkpoint: the weights saved (trainable only under PEFT) plus Adam's two fp32 states."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = trainable * 4 if hasattr(model, "peft_config") else total
    return weights + (0 if save_only_model else trainable * 8)


# ------------------------------------------------------------------------------------------------ callbacks

def make_callbacks():
    """The Trainer callbacks every stage uses (imported lazily: transformers is heavy)."""
    from transformers import TrainerCallback

    class NonFiniteGuard(TrainerCallback):
        """Stop with the step and the values as soon as a logged loss or gradient norm is NaN or infinite."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            bad = {k: v for k, v in (logs or {}).items()
                   if k in ("loss", "grad_norm", "eval_loss") and isinstance(v, float) and not math.isfinite(v)}
            if bad:
                keys = ("loss", "grad_norm", "eval_loss", "learning_rate")
                values = ", ".join(f"{k}={logs[k]}" for k in keys if k in logs)
                raise TrainingDiverged(f"training diverged at step {state.global_step}: {values}; nothing was "
                                       "saved as a result — lower learning_rate, set max_grad_norm, or check the data")

    class PreemptionCheckpoint(TrainerCallback):
        """SIGTERM/SIGUSR1 (Slurm's warning before preemption or the time limit): checkpoint after the current
        optimiser step and stop. All ranks agree on the step, so a distributed save cannot deadlock."""

        def __init__(self):
            self.received = None
            self.previous = {}

        def on_train_begin(self, args, state, control, **kwargs):
            # installed for the training loop only, and the process's own handlers put back after it: a stage run
            # in-process (a notebook, a test session) must not keep reacting to signals meant for a later run
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self.previous[sig] = signal.signal(sig, self._handler)

        def on_train_end(self, args, state, control, **kwargs):
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.previous = {}

        def _handler(self, signum, frame):
            self.received = signal.Signals(signum).name
            logger.warning("received %s: checkpointing after this step, then exiting with %d for requeue",
                           self.received, REQUEUE_EXIT)

        def on_step_end(self, args, state, control, **kwargs):
            stop = self.received is not None
            if args.world_size > 1:
                import torch
                import torch.distributed as dist

                flag = torch.tensor([int(stop)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step
                self.stopped_by = self.received or "a signal to another rank"

    return [NonFiniteGuard(), PreemptionCheckpoint()]


# ------------------------------------------------------------------------------------------------- manifest

def redact(config: dict) -> dict:
    """Drop values of keys that name a secret (hub_token, api_key, ...)."""
    return {k: ("<redacted>" if any(w in k.lower() for w in SECRET_WORDS) and v else v) for k, v in config.items()}


def sha256_path(path: str, suffix: str = "") -> str | None:
    """sha256 of a file, or of a directory (over its files' relative paths and contents; only names ending in
    `suffix`); None if absent."""
    files = [f for f in _files(path) if f.endswith(suffix)]
    if not files:
        return None
    h = hashlib.sha256()
    base = path if os.path.isdir(path) else os.path.dirname(path)
    for file in files:
        h.update(f"{os.path.relpath(file, base)}\0{_file_sha256(file)}\n".encode())
    return h.hexdigest()


# (file, size, mtime) → sha256: a run reads a model once, though its reference check and its manifest both hash it
_FILE_DIGESTS: dict[tuple, str] = {}


def _file_sha256(file: str) -> str:
    st = os.stat(file)
    key = (os.path.abspath(file), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)

    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"sha": sha.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.TimeoutExpired):
        return {"sha": None, "dirty": None}


def library_versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("alignkit", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
                 "bitsandbytes", "deepspeed", "lm_eval", "alpaca_eval", "vllm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def tokenizer_hashes(tokenizer) -> dict:
    """sha256 of the tokenizer (vocabulary, merges, normaliser) and of its chat template: what turns text into ids."""
    template = getattr(tokenizer, "chat_template", None)
    return {
        "tokenizer_sha256": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
        if hasattr(tokenizer, "backend_tokenizer") else None,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
    }


def portable_path(path: str) -> str:
    """How a manifest names an input, the same on every machine: a path inside the working directory (the
    repository, for DVC stages) relative to it; a file of an installed distribution as 'dist==version:path in
    the distribution'; anything else (a hub name, a path the user chose) as given."""
    if not os.path.exists(path):
        return path
    real, here = os.path.realpath(path), os.path.realpath(os.getcwd())
    if real == here or real.startswith(here + os.sep):
        return os.path.relpath(real, here)
    from importlib import metadata

    for site in sorted({os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}, key=len, reverse=True):
        if real.startswith(site + os.sep):
            inside = os.path.relpath(real, site)
            top = inside.split(os.sep)[0]
            dists = metadata.packages_distributions().get(top, [])
            if dists:
                return f"{dists[0]}=={metadata.version(dists[0])}:{inside}"
    return path


def code_sha256() -> str:
    """sha256 of alignkit's own source files: which code produced an output, without naming a commit (the commit
    that records a DVC lock is made after the outputs it hashes)."""
    return sha256_path(os.path.dirname(os.path.abspath(__file__)), suffix=".py")


def manifest(stage: str, *, inputs: dict[str, str], config: dict | None = None, seed: int | None = None,
             world_size: int = 1, tokenizer=None, judge: dict | None = None) -> dict:
    """What produced an output: code, environment, inputs (sha256), configuration — the same on every machine
    that reproduces it. No secrets, timestamps, hosts or absolute paths (the git commit goes to the log)."""
    from .numerics import in_effect

    lock = "requirements/cpu.lock"
    git = git_state()
    logger.info("%s: git %s%s", stage, git["sha"], " (uncommitted changes)" if git["dirty"] else "")
    data = {
        "stage": stage,
        "code_sha256": code_sha256(),
        "lock_sha256": sha256_path(lock) if os.path.isfile(lock) else None,
        "inputs": {name: {"path": portable_path(path), "sha256": sha256_path(path)} if _files(path)
                   else {"path": path, "hub": True} for name, path in sorted(inputs.items()) if path},
        "seed": seed,
        "world_size": world_size,
        "libraries": library_versions(),
        "numerics": in_effect(),
        # only inside alignkit's own image (its Dockerfile sets ALIGNKIT_BASE_IMAGE), not in any container
        "container": {"base_image": os.environ["ALIGNKIT_BASE_IMAGE"]} if os.environ.get("ALIGNKIT_BASE_IMAGE")
        else None,
    }
    if tokenizer is not None:
        data.update(tokenizer_hashes(tokenizer))
    if config is not None:
        data["config"] = redact(config)
    if judge is not None:
        data["judge"] = judge
    return data


def write_manifest(where: str, data: dict) -> None:
    """`where`/manifest.json for a directory output; `where` itself when it names a .json (a file's sidecar)."""
    path = where if where.endswith(".json") else os.path.join(where, "manifest.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
