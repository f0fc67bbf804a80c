"""Every input format normalises to golden rows; every bad-row kind is named by file, row and field."""

from __future__ import annotations

import json
import os

import pytest

from alignkit.data import CONVERSATION, PREFERENCE, load_mixture, load_splits, normalize_rows
from alignkit.errors import DataError
from conftest import write_jsonl

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731

GOLDEN_PREF = {"prompt": [U("Hi?")], "chosen": [A("Hello.")], "rejected": [A("Go away.")]}


@pytest.mark.parametrize("row,kind,golden", [
    ({"messages": [S("Be brief."), U("Hi?"), A("Hello.")]}, CONVERSATION,
     {"messages": [S("Be brief."), U("Hi?"), A("Hello.")]}),
    ({"prompt": "Hi?", "completion": "Hello."}, CONVERSATION, {"messages": [U("Hi?"), A("Hello.")]}),
    ({"prompt": [U("Hi?")], "completion": [A("Hello.")]}, CONVERSATION, {"messages": [U("Hi?"), A("Hello.")]}),
    ({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}, PREFERENCE, GOLDEN_PREF),
    ({"prompt": [U("Hi?")], "chosen": [A("Hello.")], "rejected": [A("Go away.")]}, PREFERENCE, GOLDEN_PREF),
    # hh-rlhf: full transcripts, the shared prefix becomes the prompt
    ({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."},
     PREFERENCE, GOLDEN_PREF),
    ({"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: Hi?\n\nAssistant: Hello.",
      "rejected": "\n\nHuman: A\n\nAssistant: B\n\nHuman: Hi?\n\nAssistant: Go away."},
     PREFERENCE, {"prompt": [U("A"), A("B"), U("Hi?")], "chosen": [A("Hello.")], "rejected": [A("Go away.")]}),
    # UltraFeedback-binarized: message lists that repeat the prompt (plus a prompt string column)
    ({"prompt": "Hi?", "chosen": [U("Hi?"), A("Hello.")], "rejected": [U("Hi?"), A("Go away.")],
      "score_chosen": 8.0}, PREFERENCE, GOLDEN_PREF),
    ({"chosen": [U("Hi?"), A("Hello.")], "rejected": [U("Hi?"), A("Go away.")]}, PREFERENCE, GOLDEN_PREF),
])
def test_formats_normalise_to_golden_rows(row, kind, golden):
    """Each recognised input format, and the rows the stage of that kind trains on."""
    rows, report = normalize_rows("x.jsonl", [row], kind, drop_invalid=False)
    assert rows == [golden]
    assert report.rows_read == report.rows_kept == 1


GOOD_PREF = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
GOOD_CONV = {"messages": [U("Hi?"), A("Hello.")]}


@pytest.mark.parametrize("bad,kind,field,reason", [
    ({"prompt": "Hi?", "chosen": "Hello."}, PREFERENCE, "rejected", "missing field"),  # missing field
    ({"prompt": "Hi?", "chosen": "  ", "rejected": "No."}, PREFERENCE, "chosen", "empty text"),
    ({"prompt": "Hi?", "chosen": 3, "rejected": "No."}, PREFERENCE, "chosen",
     "expected a string or a list of messages, got int"),
    ({"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, PREFERENCE, "rejected", "identical to chosen"),
    ({"messages": [A("Hello."), U("Hi?")]}, CONVERSATION, "messages[0].role", "wrong role order"),
    ({"messages": [U("Hi?"), U("Again?")]}, CONVERSATION, "messages[1].role", "wrong role order"),
    ({"messages": [U("Hi?")]}, CONVERSATION, "messages", "must end with a assistant turn"),
    ({"messages": [U("Hi?"), {"role": "robot", "content": "x"}]}, CONVERSATION, "messages[1].role", "unknown role"),
    ({"messages": [U("Hi?"), {"role": "assistant"}]}, CONVERSATION, "messages[1]", "missing 'content'"),
    ({"messages": "Hi?"}, CONVERSATION, "messages", "expected a non-empty list"),
    ({"chosen": "\n\nHuman: Hi?\n\nAssistant: A", "rejected": "\n\nHuman: Other?\n\nAssistant: B"},
     PREFERENCE, "rejected", "do not share the same prompt"),
    ({"chosen": "no turns here", "rejected": "none"}, PREFERENCE, "chosen", "not an hh-rlhf transcript"),
])
def test_bad_row_names_file_row_and_field(tmp_path, bad, kind, field, reason):
    good = GOOD_PREF if kind == PREFERENCE else GOOD_CONV
    if set(bad) != set(good) and "messages" not in bad and "prompt" not in bad:
        good = {"chosen": "\n\nHuman: Hi?\n\nAssistant: A", "rejected": "\n\nHuman: Hi?\n\nAssistant: B"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as err:
        load_mixture([path], kind, seed=0, drop_invalid=False)
    msg = str(err.value)
    assert msg.startswith(f"{path}: row 3: field '{field}': ")
    assert reason in msg


def test_drop_invalid_counts_instead_of_failing(tmp_path):
    rows = [GOOD_PREF, {"prompt": "Hi?", "chosen": "X.", "rejected": "X."}, GOOD_PREF, {"prompt": "Hi?"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    kept, report = load_mixture([path], PREFERENCE, seed=0, drop_invalid=True)
    assert len(kept) == 2
    assert report.as_metrics("data") == {"data_rows_read": 4, "data_rows_kept": 2, "data_rows_dropped": 2}


def test_malformed_json_line_and_missing_and_empty_files(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD_CONV) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl: row 2: not valid JSON"):
        load_mixture([str(path)], CONVERSATION, seed=0, drop_invalid=False)
    with pytest.raises(DataError, match="no such file"):
        load_mixture([str(tmp_path / "missing.jsonl")], CONVERSATION, seed=0, drop_invalid=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        load_mixture([str(tmp_path / "empty.jsonl")], CONVERSATION, seed=0, drop_invalid=False)


def test_kind_mismatch_is_named(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD_CONV])
    with pytest.raises(DataError, match="row 1: field 'messages': a conversation row where a preference"):
        load_mixture([path], PREFERENCE, seed=0, drop_invalid=False)


def test_parquet_and_json_sources(tmp_path):
    import datasets

    datasets.Dataset.from_list([GOOD_PREF] * 3).to_parquet(str(tmp_path / "p.parquet"))
    (tmp_path / "p.json").write_text(json.dumps([GOOD_PREF] * 2))
    rows, report = load_mixture([str(tmp_path / "p.parquet"), {"path": str(tmp_path / "p.json")}], PREFERENCE,
                                seed=0, drop_invalid=False)
    assert rows == [GOLDEN_PREF] * 5 and report.rows_kept == 5


def test_weighted_mixture_and_seeded_split(tmp_path):
    from alignkit.config import DataArguments

    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}?", "completion": "x"} for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}?", "completion": "y"} for i in range(20)])
    args = DataArguments(datasets=[{"path": a, "fraction": 0.5}, {"path": b, "fraction": 0.25}], test_split_size=0.2)
    train, test, _ = load_splits(args, CONVERSATION, seed=3)
    prompts = [r["messages"][0]["content"] for r in list(train) + list(test)]
    assert sum(p.startswith("a") for p in prompts) == 20 and sum(p.startswith("b") for p in prompts) == 5
    assert len(test) == 5 and len(train) == 20
    train2, test2, _ = load_splits(args, CONVERSATION, seed=3)
    assert list(test2) == list(test) and list(train2) == list(train)
    _, test3, _ = load_splits(args, CONVERSATION, seed=4)
    assert list(test3) != list(test)


def test_text_and_unpaired_kinds(tmp_path):
    from alignkit.data import TEXT, UNPAIRED

    rows, _ = normalize_rows("t", [{"text": "Hallo wereld.", "url": "x"}], TEXT, drop_invalid=False)
    assert rows == [{"text": "Hallo wereld."}]
    unpaired = {"prompt": "Hi?", "completion": "Hello.", "label": True}
    rows, _ = normalize_rows("u", [unpaired], UNPAIRED, drop_invalid=False)
    assert rows == [{"prompt": [U("Hi?")], "completion": [A("Hello.")], "label": True}]
    rows, report = normalize_rows("p", [GOOD_PREF], UNPAIRED, drop_invalid=False)  # a pair becomes two rows
    assert rows == [{"prompt": [U("Hi?")], "completion": [A("Hello.")], "label": True},
                    {"prompt": [U("Hi?")], "completion": [A("Go away.")], "label": False}]
    assert report.rows_kept == 1
    with pytest.raises(DataError, match="row 1: field 'label': expected true or false, got str"):
        normalize_rows("u", [{**unpaired, "label": "yes"}], UNPAIRED, drop_invalid=False)
    with pytest.raises(DataError, match="row 1: field 'messages': a conversation row where a raw-text dataset"):
        normalize_rows("c", [GOOD_CONV], TEXT, drop_invalid=False)
    with pytest.raises(DataError, match="row 1: field 'text': empty text"):
        normalize_rows("t", [{"text": " "}], TEXT, drop_invalid=False)


def test_a_local_dataset_repository_resolves_splits_by_name_and_is_read_afresh_after_an_edit(tmp_path):
    """The CPU twins' data are local dataset repositories with the hub sets' split names (their README's
    `configs`), loaded through the same `datasets.load_dataset(path, split=...)` a hub name takes. datasets keyed
    its cache on the paths: after an edit it served the old rows."""
    import json as _json

    from alignkit.data import load_source_rows

    repo = tmp_path / "ultrachat_200k"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                    "  - split: train_sft\n    path: data/train_sft.jsonl\n---\n")

    def write(n):
        with open(repo / "data" / "train_sft.jsonl", "w") as f:
            for i in range(n):
                f.write(_json.dumps({"prompt": f"q{i}", "prompt_id": str(i), "messages": [
                    {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n")

    write(3)
    label, rows = load_source_rows({"path": str(repo), "split": "train_sft"})
    assert label.endswith("ultrachat_200k[train_sft]") and len(rows) == 3 and rows[0]["prompt_id"] == "0"
    write(5)
    assert len(load_source_rows({"path": str(repo), "split": "train_sft"})[1]) == 5


def test_ranks_reading_the_same_local_dataset_share_no_cache(tmp_path):
    """Every rank of a multi-process stage reads its data. Through the shared datasets cache (rebuilt on every read,
    to see edits) one rank deleted the cache another was reading: the 2-process Zephyr twin died with
    FileNotFoundError for dataset_info.json. Each read now has a cache of its own: 2 processes × 6 reads at once
    all succeed, and the shared cache stays empty."""
    import subprocess
    import sys

    repo = tmp_path / "prefs"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                    "  - split: train_prefs\n    path: data/train_prefs.jsonl\n---\n")
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(200)]
    (repo / "data" / "train_prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shared = tmp_path / "hf-datasets-cache"
    code = ("import sys; from alignkit.data import load_source_rows\n"
            "for _ in range(6): assert len(load_source_rows({'path': sys.argv[1], 'split': 'train_prefs'})[1]) == 200")
    env = {**os.environ, "HF_DATASETS_CACHE": str(shared)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(repo)], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert not shared.exists() or not any(shared.iterdir())
