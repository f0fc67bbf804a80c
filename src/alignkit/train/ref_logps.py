"""Reference log-probs as an artifact: computed once per (reference model, data, max length), read by every DPO
run of a β or loss sweep.

    alignkit ref_logps --config recipes/smol/dpo.yaml [--key value ...]

It reads the DPO recipe itself — the same model, starting adapter, chat template, data and max_length the DPO stage
will use — runs TRL's own reference pass (DPOTrainer with `precompute_ref_log_probs`, scoring as the DPO stage
does: scoring.py), and writes the directory
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

import json
import logging
import os

from alignkit.artifacts import atomic_output, manifest, write_manifest
from alignkit.command import run_cli
from alignkit.data import PREFERENCE
from alignkit.errors import RecipeError
from alignkit.train.checkpoints import checkpoint_root, recipe_inputs, remove_checkpoints

# the DPO stage's recipe parsing and checks (also what `alignkit launch ref_logps` validates)
from alignkit.train.dpo import SPEC, check_rows_fit
from alignkit.train.scoring import PairScoringDPOTrainer
from alignkit.train.stage import load_inputs, make_trainer, prepared
from alignkit.train.stored_reference import KEY_COLUMN, REF_COLUMNS, reference_identity, row_key

logger = logging.getLogger("alignkit")


def compute(argv: list[str]) -> dict:
    """The stage: recipe → data → reference model → TRL's reference pass → the artifact, atomically."""
    recipe = SPEC.parse(argv)
    where = recipe.path or "command line"
    out_dir = recipe.alignkit.ref_logps
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
    train_ds = train_ds.add_column(KEY_COLUMN, [row_key(r) for r in train_ds])
    eval_ds = eval_ds.add_column(KEY_COLUMN, [row_key(r) for r in eval_ds])
    # Nothing is trained or saved; the run directory holds only what every rank of the reference pass shares. It
    # lies beside the output (one path for all ranks and nodes), and goes once the artifact is in place.
    run_dir = os.path.join(checkpoint_root(out_dir), "reference-pass")
    trainer = make_trainer(PairScoringDPOTrainer, recipe, model, tokenizer, train_ds, eval_ds, run_dir=run_dir)
    computed = {"train": (train_ds, trainer.train_dataset), "test": (eval_ds, trainer.eval_dataset)}

    main = trainer.accelerator.is_main_process
    barrier = trainer.accelerator.wait_for_everyone if trainer.args.world_size > 1 else None
    summary = {"rows": {}, "dropped_rows": {}}
    with atomic_output(out_dir, main=main, barrier=barrier) as tmp:
        if not main:
            return summary
        for split, (raw, done) in computed.items():
            values = dict(zip(done[KEY_COLUMN], zip(*(done[c] for c in REF_COLUMNS))))
            with open(os.path.join(tmp, f"{split}.jsonl"), "w") as f:
                for row, key in enumerate(raw[KEY_COLUMN]):
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



def main(argv=None) -> int:
    return run_cli("ref_logps", lambda a: (compute(a), 0)[1], argv)
