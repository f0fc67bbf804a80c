"""Reference log-probs as an artifact: computed once per (reference model, data, max length), read by every DPO
run of a β or loss sweep.

    python -m alignkit.ref_logps --config recipes/smol/dpo.yaml [--key value ...]

It reads the DPO recipe itself — the same model, starting adapter, chat template, data and max_length the DPO stage
will use — runs TRL's own reference pass (DPOTrainer with `precompute_ref_log_probs`), and writes the directory
the recipe names as `ref_logps`:

  train.jsonl / test.jsonl   one line per row: its content key, ref_chosen_logps, ref_rejected_logps
                             (null for a row TRL drops because its prompt alone fills max_length)
  reference.json             what the values depend on: model and adapter contents (sha256), tokenizer and chat
                             template, precision, quantisation, max_length, truncation
  manifest.json              code, environment, inputs

A DPO recipe with `ref_logps:` then reads them instead of computing them: it checks reference.json against what
it would compute itself (a mismatch names the keys and says how to recompute), looks every row up by its content
(any order, any mix of the same rows), and trains exactly as TRL's own precompute would — the trajectory is
identical. In a DVC pipeline the `ref_logps` stage depends only on the recipe keys in VALUE_KEYS and ROW_KEYS, so
`dvc exp run -S dpo.beta=…` (or a loss change) reruns the DPO stage and not this one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os

from trl import DPOTrainer

from .config import RecipeError
from .data import PREFERENCE
# the DPO stage's recipe parsing and checks (also what `alignkit launch ref_logps` validates)
from .dpo import SPEC, check_rows_fit

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
_KEY_COLUMN = "alignkit_row_key"


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
        import shutil

        from datasets import load_from_disk

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
    from .reliability import sha256_path

    if not path:
        return None
    digest = sha256_path(path)
    return {"sha256": digest} if digest else {"hub": path}


def reference_identity(recipe, tokenizer) -> dict:
    """Everything the reference log-probs of `recipe`'s rows depend on."""
    from .reliability import tokenizer_hashes

    resolved = recipe.resolved()
    identity = {key: resolved.get(key) for key in VALUE_KEYS}
    identity["model_name_or_path"] = _contents(recipe.model.model_name_or_path)
    identity["adapter_path"] = _contents(recipe.extras.adapter_path)
    identity.update(tokenizer_hashes(tokenizer))
    return json.loads(json.dumps(identity, default=str))  # as it reads back from reference.json


def compute(argv: list[str]) -> dict:
    """The stage: recipe → data → reference model → TRL's reference pass → the artifact, atomically."""
    from .models import atomic_output
    from .reliability import checkpoint_root, manifest, remove_checkpoints, write_manifest
    from .stage import load_inputs, make_trainer, prepared, recipe_inputs

    recipe = SPEC.parse(argv)
    where = recipe.path or "command line"
    out_dir = recipe.extras.ref_logps
    if not out_dir:
        raise RecipeError(f"{where}: ref_logps: name the directory to write the reference log-probs to "
                          "(the DPO stage reads them from there)")
    if recipe.train.use_liger_kernel:
        raise RecipeError(f"{where}: use_liger_kernel: TRL's Liger DPO loss computes the reference itself; "
                          "there are no reference log-probs to store")
    recipe.train.precompute_ref_log_probs = True
    train_ds, eval_ds, report, tokenizer, model = load_inputs(recipe, PREFERENCE, prepare_data=check_rows_fit)
    if model is None:
        return prepared("ref_logps", report)
    train_ds = train_ds.add_column(_KEY_COLUMN, [row_key(r) for r in train_ds])
    eval_ds = eval_ds.add_column(_KEY_COLUMN, [row_key(r) for r in eval_ds])
    # Nothing is trained or saved; the run directory holds only what every rank of the reference pass shares. It
    # lies beside the output (one path for all ranks and nodes), and goes once the artifact is in place.
    run_dir = os.path.join(checkpoint_root(out_dir), "reference-pass")
    trainer = make_trainer(StoredReferenceDPOTrainer, recipe, model, tokenizer, train_ds, eval_ds, run_dir=run_dir)
    computed = {"train": (train_ds, trainer.train_dataset), "test": (eval_ds, trainer.eval_dataset)}

    main = trainer.accelerator.is_main_process
    barrier = trainer.accelerator.wait_for_everyone if trainer.args.world_size > 1 else None
    summary = {"rows": {}, "dropped_rows": {}}
    with atomic_output(out_dir, main=main, barrier=barrier) as tmp:
        if not main:
            return summary
        for split, (raw, done) in computed.items():
            values = dict(zip(done[_KEY_COLUMN], zip(*(done[c] for c in REF_COLUMNS))))
            with open(os.path.join(tmp, f"{split}.jsonl"), "w") as f:
                for row, key in enumerate(raw[_KEY_COLUMN]):
                    chosen, rejected = values.get(key, (None, None))
                    f.write(json.dumps({"row": row, "key": key, REF_COLUMNS[0]: chosen, REF_COLUMNS[1]: rejected})
                            + "\n")
            summary["rows"][split] = len(raw)
            summary["dropped_rows"][split] = len(raw) - len(done)
        stored = {"reference": reference_identity(recipe, tokenizer), **summary}
        with open(os.path.join(tmp, "reference.json"), "w") as f:
            json.dump(stored, f, indent=2, sort_keys=True)
        resolved = recipe.resolved()
        inputs = {k: v for k, v in recipe_inputs(recipe).items() if k != "ref_logps"}  # that is this output
        write_manifest(tmp, manifest("ref_logps", inputs=inputs,
                                     config=resolved, seed=recipe.train.seed, world_size=trainer.args.world_size,
                                     tokenizer=tokenizer))
    if main:
        remove_checkpoints(out_dir)
    logger.info("ref_logps done: %s → %s", json.dumps(summary), out_dir)
    return summary


def attach(recipe, tokenizer, train_ds, eval_ds):
    """The DPO stage's datasets with the stored reference log-probs added (after checking they are the ones this
    recipe would compute). Unchanged when the recipe has no `ref_logps`."""
    directory = recipe.extras.ref_logps
    if not directory:
        return train_ds, eval_ds
    where = recipe.path or "command line"
    redo = f"recompute them: python -m alignkit.ref_logps --config {recipe.path} (in a pipeline: dvc repro ref_logps)"
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


def main(argv=None) -> int:
    from .stage import run_cli

    return run_cli("ref_logps", lambda a: (compute(a), 0)[1], argv)


if __name__ == "__main__":
    raise SystemExit(main())
