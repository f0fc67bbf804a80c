"""Reference log-probs stored as an artifact, and the DPO trainer that reads them: what the `ref_logps` stage writes
(ref_logps.py) and the `dpo` stage attaches to its rows (dpo.py), kept here so that neither imports the other.

The stored values are keyed by row content and tagged with everything they depend on (`reference_identity`): a DPO
recipe whose reference differs is refused with the keys named, and a row the artifact lacks is refused with its
number.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil

from datasets import load_from_disk
from trl import DPOTrainer

from alignkit.artifacts import sha256_path, tokenizer_hashes
from alignkit.errors import RecipeError

logger = logging.getLogger("alignkit")

# Recipe keys that change the values (with the model's and adapter's contents, the tokenizer and the template).
VALUE_KEYS = (
    "model_name_or_path", "model_revision", "gguf_file", "adapter_path", "dtype", "attn_implementation", "bf16",
    "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage",
    "bnb_4bit_compute_dtype", "chat_template", "max_length", "truncation_mode", "ld_alpha",
)

# Recipe keys that change which rows there are (rows are looked up by content, so only coverage depends on these).
ROW_KEYS = ("datasets", "test_datasets", "test_split_size", "max_train_samples", "max_eval_samples",
            "drop_invalid", "seed")

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")

SPLITS = ("train", "test")

KEY_COLUMN = "alignkit_row_key"



class StoredReferenceDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer; datasets that already carry the reference log-probs (attached from a `ref_logps`
    artifact) are used as they are instead of being run through the reference model again.

    Several processes: TRL's reference pass has rank 0 write the log-probs into the dataset's cache directory and
    every rank read them back. An in-memory dataset (alignkit's, built from normalised rows) has none, so each rank
    would pick its own temporary file and the others could not open rank 0's. The dataset is first given a home on
    disk that every rank shares (the run directory, beside the output), then TRL's pass runs unchanged."""

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if all(c in dataset.column_names for c in REF_COLUMNS):
            return dataset
        if self.accelerator.num_processes > 1 and not dataset.cache_files:
            dataset = self._shared_on_disk(dataset, name)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _shared_on_disk(self, dataset, name):
        home = os.path.join(self.args.output_dir, "reference-pass", name)
        if self.accelerator.is_main_process:
            shutil.rmtree(home, ignore_errors=True)
            dataset.save_to_disk(home)
        self.accelerator.wait_for_everyone()
        return load_from_disk(home)



def row_key(row: dict) -> str:
    """Content key of a normalised preference row (prompt, chosen, rejected)."""
    text = json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()



def _contents(path: str | None) -> dict | None:
    """A local model/adapter by the sha256 of its files (where it lies does not matter); a hub id by name."""
    if not path:
        return None
    digest = sha256_path(path)
    return {"sha256": digest} if digest else {"hub": path}



def reference_identity(recipe, tokenizer) -> dict:
    """Everything the reference log-probs of `recipe`'s rows depend on."""
    resolved = recipe.resolved()
    identity = {key: resolved.get(key) for key in VALUE_KEYS}
    identity["model_name_or_path"] = _contents(recipe.model.model_name_or_path)
    identity["adapter_path"] = _contents(recipe.alignkit.adapter_path)
    identity.update(tokenizer_hashes(tokenizer))
    return json.loads(json.dumps(identity, default=str))  # as it reads back from reference.json



def attach(recipe, tokenizer, train_ds, eval_ds):
    """The DPO stage's datasets with the stored reference log-probs added (after checking they are the ones this
    recipe would compute). Unchanged when the recipe has no `ref_logps`."""
    directory = recipe.alignkit.ref_logps
    if not directory:
        return train_ds, eval_ds
    where = recipe.path or "command line"
    redo = f"recompute them: alignkit ref_logps --config {recipe.path} (in a pipeline: dvc repro ref_logps)"
    info = os.path.join(directory, "reference.json")
    if not os.path.isfile(info):
        raise FileNotFoundError(f"ref_logps: no reference log-probs in {directory} (no reference.json); {redo}")
    with open(info) as f:
        stored = json.load(f)["reference"]
    wanted = reference_identity(recipe, tokenizer)
    differ = [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    if differ:
        detail = "; ".join(f"{k}: stored {stored.get(k)!r}, this recipe {wanted.get(k)!r}" for k in differ)
        raise RecipeError(f"{where}: the reference log-probs in {directory} were computed for another reference "
                          f"({detail}); {redo}")
    values: dict[str, tuple] = {}
    for split in SPLITS:
        with open(os.path.join(directory, f"{split}.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                values[row["key"]] = tuple(math.nan if row[c] is None else row[c] for c in REF_COLUMNS)

    def with_reference(ds, split):
        keys = [row_key(r) for r in ds]
        missing = [i for i, k in enumerate(keys) if k not in values]
        if missing:
            raise RecipeError(f"{where}: {directory} has no reference log-probs for {split} row {missing[0] + 1} "
                              f"({len(missing)} of {len(keys)} rows missing): the data changed since they were "
                              f"computed; {redo}")
        for i, column in enumerate(REF_COLUMNS):
            ds = ds.add_column(column, [values[k][i] for k in keys])
        return ds

    logger.info("reference log-probs read from %s (not computed)", directory)
    return with_reference(train_ds, "train"), with_reference(eval_ds, "test")
