"""What the pipeline writes and how: outputs written atomically (a crash never leaves half a model for DVC), the
temporaries a killed run left removed by the next, and the manifest beside every output — what produced it, the
same on every machine that reproduces it."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from importlib import metadata

from alignkit.numerics import in_effect
from alignkit.sources import ROOT as SOURCES_ROOT
from alignkit.sources import command_modules, source_files

logger = logging.getLogger("alignkit")

SECRET_WORDS = ("token", "key", "secret", "password")


# ------------------------------------------------------------------------------------------------ atomic writes

def _temporary_prefix(name: str, kind: str) -> str:
    # host and pid in the name, so a rerun can tell a dead run's leftovers from a live writer's
    return f".{name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def remove_stale_temporaries(parent: str, name: str) -> list[str]:
    """Remove the `.<name>.tmp-*` / `.<name>.old-*` siblings that killed runs of this output left behind (for a
    merged 7B model, gigabytes per kill): those of a process on this host that is gone, the shared one of a
    multi-process save, and unnamed ones from before writers named themselves. Returns what was removed."""
    removed = []
    if not os.path.isdir(parent):
        return removed
    host = socket.gethostname()
    for entry in os.listdir(parent):
        for kind in ("tmp", "old"):
            prefix = f".{name}.{kind}-"
            if not entry.startswith(prefix):
                continue
            rest = entry[len(prefix):]
            parts = rest.rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit():
                if parts[0] != host or _alive(int(parts[1])):
                    continue  # another host's, or a live writer's
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d temporary director%s a killed run left beside %s: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", name, ", ".join(sorted(removed)))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output(final_dir: str, *, main: bool = True, barrier=None):
    """Yield a temporary sibling directory; rename it to `final_dir` only if the block finishes.

    A crash (or kill) leaves at most a `.<name>.tmp-*` directory, never a half-written `final_dir`
    that DVC would take as complete. In a multi-process run pass `barrier` (every rank calls this, since
    ZeRO-3 gathers the weights from all ranks to save them): the ranks share one temporary directory, the
    main process creates and renames it.
    """
    final_dir = os.path.abspath(final_dir)
    parent, name = os.path.split(final_dir)
    if main:
        remove_stale_temporaries(parent, name)
    if barrier is None:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=_temporary_prefix(name, "tmp"), dir=parent)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    else:
        tmp = os.path.join(parent, f".{name}.tmp-shared")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
    try:
        yield tmp
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if barrier is not None:
        barrier()  # every rank has written its part
    if main:
        old = None
        if os.path.exists(final_dir):
            old = tempfile.mkdtemp(prefix=_temporary_prefix(name, "old"), dir=parent)
            os.rename(final_dir, os.path.join(old, name))
        os.rename(tmp, final_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    if barrier is not None:
        barrier()


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary sibling path to write `path` through; it replaces `path` only if the block finishes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_json(path: str, data, *, indent: int = 2, **dump_kwargs) -> None:
    """`data` as JSON at `path` (indented), atomically, its directory created."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, **dump_kwargs)


def write_text(path: str, text: str) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------------- manifest

def redact(config: dict) -> dict:
    """Drop values of keys that name a secret (hub_token, api_key, ...)."""
    return {k: ("<redacted>" if any(w in k.lower() for w in SECRET_WORDS) and v else v) for k, v in config.items()}


def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        # not __pycache__: its .pyc files differ per install (an input that is an installed package's directory)
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(path)
                      if "__pycache__" not in os.path.relpath(d, path).split(os.sep) for f in fs)
    return []


def sha256_path(path: str, suffix: str = "") -> str | None:
    """sha256 of a file, or of a directory (over its files' relative paths and contents; only names ending in
    `suffix`); None if absent."""
    files = [f for f in files_under(path) if f.endswith(suffix)]
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


@functools.cache
def installed_packages() -> dict[str, list[str]]:
    """Top-level module → distributions, read once per process: reading it scans every installed distribution
    (~0.5 s), and a manifest names several inputs — under `python -m alignkit` the repository itself is on sys.path,
    so every input inside it was looked up."""
    return metadata.packages_distributions()


def portable_path(path: str) -> str:
    """How a manifest names an input, the same on every machine: a file of an installed distribution as
    'dist==version:path in the distribution' (first: a virtual environment may sit inside the repository, as
    `make venv` puts it); a path inside the working directory (the repository, for DVC stages) relative to it;
    anything else (a hub name, a path the user chose) as given."""
    if not os.path.exists(path):
        return path
    real, here = os.path.realpath(path), os.path.realpath(os.getcwd())
    for site in sorted({os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}, key=len, reverse=True):
        if real.startswith(site + os.sep):
            inside = os.path.relpath(real, site)
            top = inside.split(os.sep)[0]
            dists = installed_packages().get(top, [])
            if dists:
                return f"{dists[0]}=={metadata.version(dists[0])}:{inside}"
    if real == here or real.startswith(here + os.sep):
        return os.path.relpath(real, here)
    return path


def code_sha256(command: str) -> str:
    """sha256 of the alignkit source files `alignkit <command>` runs (alignkit.sources: the files its DVC stage
    depends on): which code produced an output, without naming a commit (the commit that records a DVC lock is
    made after the outputs it hashes). Only that closure: a change elsewhere neither reruns the stage in DVC nor
    changes its manifest, so an output DVC serves from its run cache is the one a fresh run writes."""
    h = hashlib.sha256()
    for rel in source_files(command_modules(f"alignkit {command}")):
        h.update(f"{rel}\0{_file_sha256(os.path.join(SOURCES_ROOT, rel))}\n".encode())
    return h.hexdigest()


def manifest(stage: str, *, inputs: dict[str, str], config: dict | None = None, seed: int | None = None,
             world_size: int = 1, tokenizer=None, judge: dict | None = None) -> dict:
    """What produced an output: code, environment, inputs (sha256), configuration — the same on every machine
    that reproduces it. No secrets, timestamps, hosts or absolute paths (the git commit goes to the log)."""
    lock = "requirements/cpu.lock"
    git = git_state()
    logger.info("%s: git %s%s", stage, git["sha"], " (uncommitted changes)" if git["dirty"] else "")
    data = {
        "stage": stage,
        "code_sha256": code_sha256(stage),
        "lock_sha256": sha256_path(lock) if os.path.isfile(lock) else None,
        "inputs": {name: {"path": portable_path(path), "sha256": sha256_path(path)} if files_under(path)
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
