"""`publish`: a finished output directory — weights, model card with its metrics, manifest — uploaded to the Hugging
Face Hub, the way the handbook's users share a model.

    alignkit publish build/models/dpo --repo_id me/smol-dpo [--private]
    (or `push_to_hub: true` + `hub_model_id: me/smol-dpo` in a recipe: the stage publishes after its output is
    complete)

Only a complete output is uploaded (it has its manifest.json, written last inside the atomic rename); never a
checkpoint or a temporary directory. The token comes from the environment (HF_TOKEN), never from a recipe or the
command line. A failed upload leaves the output as it was; rerun `alignkit publish` to retry.
"""

from __future__ import annotations

import argparse
import os

from huggingface_hub import HfApi

from alignkit.command import run_cli
from alignkit.errors import PublishError, UsageError

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def publishable(directory: str) -> str:
    """`directory`, checked to be a complete alignkit output (not a checkpoint, not a temporary)."""
    directory = os.path.normpath(directory)
    name = os.path.basename(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"nothing to publish: {directory} is not a directory")
    if name.startswith(".") or name.startswith("checkpoint-") or ".checkpoints" in directory.split(os.sep):
        raise UsageError(f"{directory} is a checkpoint or a temporary directory; publish the stage's output")
    if not os.path.isfile(os.path.join(directory, "manifest.json")):
        raise UsageError(f"{directory} is not a finished alignkit output (no manifest.json)")
    return directory


def publish(directory: str, repo_id: str, *, private: bool = False, commit_message: str | None = None) -> str:
    """Upload `directory` to the model repository `repo_id` (created if needed); returns the commit URL."""
    directory = publishable(directory)
    token = next((os.environ[v] for v in TOKEN_VARIABLES if os.environ.get(v)), None)
    if token is None:
        raise UsageError(f"publishing to {repo_id} needs a Hub token in ${TOKEN_VARIABLES[0]}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=directory, repo_id=repo_id, repo_type="model",
                                   commit_message=commit_message or f"alignkit: {os.path.basename(directory)}",
                                   ignore_patterns=[".*"])
    except Exception as e:  # network, permissions, quota: the output stays as it is
        raise PublishError(f"uploading {directory} to {repo_id} failed ({type(e).__name__}: {e}); the output is "
                           f"intact — retry with: alignkit publish {directory} --repo_id {repo_id}") from e
    return str(getattr(commit, "commit_url", commit))


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit publish", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="a finished stage output, e.g. build/models/dpo")
    p.add_argument("--repo_id", required=True, help="the Hub model repository, e.g. me/smol-dpo")
    p.add_argument("--private", action="store_true")
    args = p.parse_args(argv)
    print(publish(args.directory, args.repo_id, private=args.private))
    return 0


def main(argv=None) -> int:
    return run_cli("publish", run, argv)
