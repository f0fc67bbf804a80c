"""Publishing to the Hub (no network here: huggingface_hub's client is replaced by a recorder): the exact folder and
arguments it is handed, only a finished output, the token from the environment only, and a failed upload leaving
the output intact."""

from __future__ import annotations

import os

import pytest

from alignkit import publish as publishing
from alignkit.errors import RecipeError
from alignkit.train import sft
from conftest import tiny_recipe


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records every call; `fail` makes the upload raise."""

    calls: list = []
    fail = False

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = kwargs["folder_path"]
        self.calls.append(("upload_folder", {**kwargs, "files": sorted(os.listdir(folder))}))
        if self.fail:
            raise ConnectionError("the Hub is unreachable")
        return "https://huggingface.co/me/tiny/commit/abc"


@pytest.fixture
def hub(monkeypatch):
    RecordingHub.calls, RecordingHub.fail = [], False
    monkeypatch.setattr(publishing, "HfApi", RecordingHub)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_from_env")
    return RecordingHub


def test_a_stage_publishes_its_finished_output_once_and_never_a_checkpoint(hub, tiny_model, tiny_data, tmp_path,
                                                                           capfd):
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", max_steps=2, save_steps=1, push_to_hub=True,
                         hub_model_id="me/tiny")
    sft.train(["--config", recipe])
    out = tmp_path / "out-sft"
    uploads = [c for name, c in hub.calls if name == "upload_folder"]
    assert len(uploads) == 1  # not one per checkpoint
    up = uploads[0]
    assert os.path.realpath(up["folder_path"]) == os.path.realpath(out) and up["repo_id"] == "me/tiny"
    assert {"adapter_model.safetensors", "README.md", "manifest.json", "metrics.json"} <= set(up["files"])
    assert up["repo_type"] == "model" and up["ignore_patterns"] == [".*"]
    assert ("init", {"token": "hf_secret_from_env"}) in hub.calls
    created = {"repo_id": "me/tiny", "repo_type": "model", "private": False, "exist_ok": True}
    assert ("create_repo", created) in hub.calls
    assert "hf_secret_from_env" not in (out / "manifest.json").read_text() + (out / "config.yaml").read_text()
    assert "hf_secret_from_env" not in "".join(capfd.readouterr())


def test_a_failed_upload_leaves_the_output_intact_and_says_how_to_retry(hub, tiny_model, tiny_data, tmp_path,
                                                                        capsys):
    hub.fail = True
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", max_steps=1, push_to_hub=True, hub_model_id="me/t")
    assert sft.main(["--config", recipe]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("alignkit sft: error: uploading") and "the output is intact" in err
    assert "alignkit publish" in err and "--repo_id me/t" in err
    out = tmp_path / "out-sft"
    assert (out / "manifest.json").is_file() and (out / "adapter_model.safetensors").is_file()
    hub.fail = False
    assert publishing.main([str(out), "--repo_id", "me/t"]) == 0  # the retry


def test_only_finished_outputs_and_only_tokens_from_the_environment(hub, tmp_path, tiny_model, tiny_data,
                                                                    monkeypatch):
    half = tmp_path / ".out.tmp-host-1-x"
    half.mkdir()
    (half / "manifest.json").write_text("{}")
    no_manifest = tmp_path / "model"
    no_manifest.mkdir()
    assert publishing.main([str(half), "--repo_id", "me/t"]) == 2
    assert publishing.main([str(no_manifest), "--repo_id", "me/t"]) == 2
    assert not [c for c in hub.calls if c[0] == "upload_folder"]
    with pytest.raises(RecipeError, match="hub_token: a token never goes in a recipe"):
        sft.SPEC.parse(["--config", tiny_recipe(tmp_path, tiny_model, tiny_data, "sft"), "--hub_token", "x"])
    with pytest.raises(RecipeError, match="push_to_hub: true needs hub_model_id"):
        sft.SPEC.parse(["--config", tiny_recipe(tmp_path, tiny_model, tiny_data, "sft", push_to_hub=True)])
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    (no_manifest / "manifest.json").write_text("{}")
    assert publishing.main([str(no_manifest), "--repo_id", "me/t"]) == 2
