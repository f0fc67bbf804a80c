"""Data: load sources, recognise their format, normalise and validate every row, mix, split.

Two normalised shapes leave this module:
  * conversation  {"messages": [{"role", "content"}, ...]}              (SFT)
  * preference    {"prompt": [msgs ending with a user turn],
                   "chosen": [{"role": "assistant", ...}], "rejected": [...]}  (DPO and friends)
Both are TRL's "conversational" formats, so the trainers apply the chat template themselves.

Recognised input formats (per row; a source must be consistent):
  messages | prompt+completion | prompt+chosen+rejected (strings or message lists) |
  chosen+rejected transcripts with "\n\nHuman:"/"\n\nAssistant:" turns (hh-rlhf) |
  chosen+rejected message lists that include the prompt (UltraFeedback-binarized).
A bad row raises DataError naming the source, the 1-based row number and the field; with
`drop_invalid` it is dropped and counted instead.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
from dataclasses import dataclass, field

from alignkit.artifacts import atomic_file
from alignkit.errors import DataError

logger = logging.getLogger(__name__)

CONVERSATION, PREFERENCE, TEXT, UNPAIRED = "conversation", "preference", "text", "unpaired"
# What each kind of dataset (as a stage asks for it) accepts, and how errors describe it.
ACCEPTS = {CONVERSATION: {CONVERSATION}, PREFERENCE: {PREFERENCE}, TEXT: {TEXT}, UNPAIRED: {UNPAIRED, PREFERENCE}}
KIND_NAMES = {
    CONVERSATION: "a conversation (SFT) dataset (messages or prompt/completion) is expected",
    PREFERENCE: "a preference dataset (prompt/chosen/rejected) is expected",
    TEXT: "a raw-text dataset (a 'text' column) is expected",
    UNPAIRED: "an unpaired (prompt/completion/label) or paired preference dataset is expected",
}
ROLES = ("system", "user", "assistant")
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


@dataclass
class LoadReport:
    """Counts written to the stage's metrics."""

    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def add(self, other: "LoadReport") -> None:
        self.rows_read += other.rows_read
        self.rows_kept += other.rows_kept
        for k, v in other.dropped.items():
            self.dropped[k] = self.dropped.get(k, 0) + v

    def as_metrics(self, prefix: str) -> dict:
        return {
            f"{prefix}_rows_read": self.rows_read,
            f"{prefix}_rows_kept": self.rows_kept,
            f"{prefix}_rows_dropped": sum(self.dropped.values()),
        }


class _RowError(Exception):
    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field_name, reason


# ---------------------------------------------------------------------------------------------------- sources


def _spec(spec) -> dict:
    return {"path": spec} if isinstance(spec, str) else dict(spec)


def _read_local_rows(path: str) -> list:
    """Read a local jsonl/json file ourselves, so a malformed line is reported with its line number."""
    if path.endswith(".jsonl"):
        return read_jsonl(path)
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json source must hold a list of records (or {{'data': [...]}})")
    return data


def _has_data_files(path: str) -> bool:
    for _, _, files in os.walk(path):
        if any(f.endswith((".jsonl", ".json", ".parquet", ".csv", ".arrow")) for f in files):
            return True
    return False


def load_source_rows(spec) -> tuple[str, list]:
    """Return (label, raw rows) of one source: a local file/dir or a hub dataset."""
    spec = _spec(spec)
    path = spec["path"]
    split = spec.get("split", "train")
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path):
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: file is empty")
        if ext in (".jsonl", ".json"):
            return path, _read_local_rows(path)
        if ext not in LOCAL_BUILDERS:
            raise DataError(f"{path}: unsupported file type {ext!r}; use .jsonl, .json or .parquet")
    elif ext in LOCAL_BUILDERS or path.startswith((".", "/")):
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file or directory")
    if os.path.isdir(path) and not _has_data_files(path):
        raise DataError(f"{path}: a directory with no data files (.jsonl, .json, .parquet, .csv, or a dataset "
                        "saved with save_to_disk); give a file, or a directory that holds them")

    import datasets

    kwargs = {k: spec[k] for k in ("name", "data_files", "data_dir", "revision") if spec.get(k) is not None}
    if os.path.isfile(path):
        builder, kwargs, split, label = LOCAL_BUILDERS[ext], {"data_files": path}, "train", path
    else:  # a local dataset directory or a hub id
        builder, label = path, f"{path}[{split}]"
    if not os.path.exists(path):  # a hub dataset: its cache is keyed on its revision
        return label, datasets.load_dataset(builder, split=split, **kwargs).to_list()
    # Local data is read afresh, into a cache of this process's own: datasets keys its cache of a local file or
    # directory on the path, not the contents (an edited file was served as it was before), and with a shared
    # cache the ranks of a multi-process run rebuilt it under each other (a rank's FileNotFoundError for
    # dataset_info.json, seen on the 2-process Zephyr twin). The rows are read before the cache goes.
    with tempfile.TemporaryDirectory(prefix="alignkit-data-") as cache:
        ds = datasets.load_dataset(builder, split=split, cache_dir=cache, verification_mode="no_checks", **kwargs)
        return label, ds.to_list()


# ---------------------------------------------------------------------------------------------------- rows


def _text(value, field_name: str) -> str:
    if not isinstance(value, str):
        raise _RowError(field_name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(field_name, "empty text")
    return value


def _messages(value, field_name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else type(value).__name__
        raise _RowError(field_name, f"expected a non-empty list of messages, got {got}")
    out = []
    for i, msg in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(msg, dict):
            raise _RowError(where, f"expected a message mapping, got {type(msg).__name__}")
        for key in ("role", "content"):
            if key not in msg:
                raise _RowError(where, f"missing '{key}'")
        role = msg["role"]
        if role not in ROLES:
            raise _RowError(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        out.append({"role": role, "content": _text(msg["content"], f"{where}.content")})
    return out


def _check_turn_order(messages: list[dict], field_name: str, *, ends_with: str) -> None:
    """Optional leading system message, then user/assistant alternating from user, ending with `ends_with`."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise _RowError(field_name, "no user or assistant turn")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            idx = i + (len(messages) - len(turns))
            raise _RowError(f"{field_name}[{idx}].role", f"wrong role order: expected {expected}, got {msg['role']}")
    if turns[-1]["role"] != ends_with:
        raise _RowError(field_name, f"wrong role order: must end with a {ends_with} turn")


def _text_or_messages(value, field_name: str) -> None:
    if not isinstance(value, (str, list)):
        raise _RowError(field_name, f"expected a string or a list of messages, got {type(value).__name__}")


def _as_user_turns(value, field_name: str) -> list[dict]:
    _text_or_messages(value, field_name)
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, field_name)}]
    return _messages(value, field_name)


def _as_assistant_turns(value, field_name: str) -> list[dict]:
    _text_or_messages(value, field_name)
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, field_name)}]
    return _messages(value, field_name)


def _parse_hh(transcript, field_name: str) -> list[dict]:
    text = _text(transcript, field_name)
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise _RowError(field_name, "not an hh-rlhf transcript ('\\n\\nHuman: ... \\n\\nAssistant: ...')")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        msgs.append({"role": role, "content": _text(content.strip(), f"{field_name} ({speaker} turn)")})
    return msgs


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """Full conversations → (shared prompt up to the last user turn, chosen reply, rejected reply)."""
    _check_turn_order(chosen, "chosen", ends_with="assistant")
    _check_turn_order(rejected, "rejected", ends_with="assistant")
    if chosen[:-1] != rejected[:-1]:
        raise _RowError("rejected", "chosen and rejected do not share the same prompt turns")
    return chosen[:-1], chosen[-1:], rejected[-1:]


def detect_format(row: dict) -> str:
    keys = set(row)
    if "chosen" in keys and "rejected" in keys:
        if "prompt" in keys:  # strings, or message lists (UltraFeedback-binarized lists repeat the prompt)
            return "prompt_chosen_rejected"
        return "hh_rlhf" if isinstance(row["chosen"], str) else "chosen_rejected_conversations"
    if "messages" in keys:
        return "messages"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion_label" if "label" in keys else "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"unrecognised row with fields {sorted(keys)}; expected messages | prompt+completion(+label) | "
        "prompt+chosen+rejected | chosen+rejected | text"
    )


def normalize_row(row: dict, fmt: str) -> tuple[str, dict, str]:
    """(shape, normalised row, its main field) — shape is one of CONVERSATION, PREFERENCE, TEXT, UNPAIRED."""
    need = {
        "messages": ["messages"],
        "prompt_completion": ["prompt", "completion"],
        "prompt_completion_label": ["prompt", "completion", "label"],
        "prompt_chosen_rejected": ["prompt", "chosen", "rejected"],
        "hh_rlhf": ["chosen", "rejected"],
        "chosen_rejected_conversations": ["chosen", "rejected"],
        "text": ["text"],
    }[fmt]
    for key in need:
        if key not in row or row[key] is None:
            raise _RowError(key, "missing field")

    if fmt == "text":
        return TEXT, {"text": _text(row["text"], "text")}, "text"
    if fmt == "messages":
        messages = _messages(row["messages"], "messages")
        _check_turn_order(messages, "messages", ends_with="assistant")
        return CONVERSATION, {"messages": messages}, "messages"
    if fmt in ("prompt_completion", "prompt_completion_label"):
        prompt = _as_user_turns(row["prompt"], "prompt")
        completion = _as_assistant_turns(row["completion"], "completion")
        _check_turn_order(prompt + completion, "prompt", ends_with="assistant")
        if len(completion) != 1:
            raise _RowError("completion", "expected exactly one assistant reply")
        if fmt == "prompt_completion":
            return CONVERSATION, {"messages": prompt + completion}, "completion"
        if not isinstance(row["label"], bool):
            raise _RowError("label", f"expected true or false, got {type(row['label']).__name__}")
        return UNPAIRED, {"prompt": prompt, "completion": completion, "label": row["label"]}, "label"

    if fmt == "prompt_chosen_rejected":
        prompt = _as_user_turns(row["prompt"], "prompt")
        chosen = _as_assistant_turns(row["chosen"], "chosen")
        rejected = _as_assistant_turns(row["rejected"], "rejected")
        if chosen and chosen[0]["role"] != "assistant":  # UltraFeedback-binarized: lists repeat the prompt
            prompt, chosen, rejected = _split_shared_prompt(chosen, rejected)
    elif fmt == "hh_rlhf":
        prompt, chosen, rejected = _split_shared_prompt(
            _parse_hh(row["chosen"], "chosen"), _parse_hh(row["rejected"], "rejected")
        )
    else:
        prompt, chosen, rejected = _split_shared_prompt(
            _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
        )
    _check_turn_order(prompt, "prompt", ends_with="user")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise _RowError(name, "expected exactly one assistant reply after the prompt")
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise _RowError("rejected", "identical to chosen")
    return PREFERENCE, {"prompt": prompt, "chosen": chosen, "rejected": rejected}, "chosen"


def fit_to_kind(shape: str, row: dict, field_name: str, kind: str) -> list[dict]:
    """The rows a stage of `kind` trains on; a paired preference becomes two unpaired rows (KTO)."""
    if shape not in ACCEPTS[kind]:
        raise _RowError(field_name, f"a {shape} row where {KIND_NAMES[kind]}")
    if kind == UNPAIRED and shape == PREFERENCE:
        return [{"prompt": row["prompt"], "completion": row["chosen"], "label": True},
                {"prompt": row["prompt"], "completion": row["rejected"], "label": False}]
    return [row]


def normalize_rows(label: str, rows: list, kind: str, drop_invalid: bool) -> tuple[list[dict], LoadReport]:
    report = LoadReport(rows_read=len(rows))
    out, fmt, kept = [], None, 0
    for i, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise _RowError("(row)", f"expected a JSON object, got {type(row).__name__}")
            if fmt is None:
                try:
                    fmt = detect_format(row)
                except DataError as e:
                    raise DataError(f"{label}: row {i}: {e}") from None
            out.extend(fit_to_kind(*normalize_row(row, fmt), kind))
            kept += 1
        except _RowError as e:
            if not drop_invalid:
                raise DataError(f"{label}: row {i}: field '{e.field}': {e.reason}") from None
            reason = e.reason.split(":")[0]
            report.dropped[reason] = report.dropped.get(reason, 0) + 1
            logger.warning("dropping %s row %d: field '%s': %s", label, i, e.field, e.reason)
    report.rows_kept = kept  # source rows; a KTO stage trains on two unpaired rows per kept pair
    if not out:
        raise DataError(f"{label}: no valid rows (read {len(rows)}, dropped {sum(report.dropped.values())})")
    if report.dropped:
        logger.warning("%s: dropped %d of %d rows: %s", label, sum(report.dropped.values()), len(rows), report.dropped)
    return out, report


# ---------------------------------------------------------------------------------------------------- mixture


def _take_fraction(rows: list, fraction: float | None, seed: int) -> list:
    if fraction is None or fraction >= 1:
        return rows
    n = max(1, round(fraction * len(rows)))
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


def load_mixture(specs: list, kind: str, *, seed: int, drop_invalid: bool) -> tuple[list[dict], LoadReport]:
    rows, report = [], LoadReport()
    for spec in specs:
        label, raw = load_source_rows(spec)
        norm, rep = normalize_rows(label, raw, kind, drop_invalid)
        rows.extend(_take_fraction(norm, _spec(spec).get("fraction"), seed))
        report.add(rep)
    return rows, report


def load_splits(data_args, kind: str, seed: int):
    """Train and held-out `datasets.Dataset`s plus the load report, from a recipe's DataArguments."""
    import datasets

    train_rows, report = load_mixture(data_args.datasets, kind, seed=seed, drop_invalid=data_args.drop_invalid)
    if data_args.test_datasets:
        test_rows, test_report = load_mixture(
            data_args.test_datasets, kind, seed=seed, drop_invalid=data_args.drop_invalid
        )
        report.add(test_report)
        train, test = datasets.Dataset.from_list(train_rows), datasets.Dataset.from_list(test_rows)
    else:
        size = data_args.test_split_size
        size = int(size) if size >= 1 else size
        if len(train_rows) < 2:
            raise DataError("need at least 2 rows to hold out a test split")
        split = datasets.Dataset.from_list(train_rows).train_test_split(test_size=size, seed=seed)
        train, test = split["train"], split["test"]
    if data_args.max_train_samples:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if data_args.max_eval_samples:
        test = test.select(range(min(len(test), data_args.max_eval_samples)))
    return train, test, report


def read_jsonl(path: str) -> list:
    """The rows of a jsonl file (blank lines skipped); a line that is not JSON is reported with its number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {lineno}: not valid JSON ({e.msg})") from None
    return rows


def write_jsonl(rows, path: str) -> None:
    """One JSON object per line (keys sorted, UTF-8 as is), written atomically, its directory created."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
