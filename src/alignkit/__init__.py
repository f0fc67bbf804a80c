"""alignkit: a thin layer over TRL, PEFT, bitsandbytes, accelerate/DeepSpeed, DVC and lm-eval.

The package shows the pipeline in its folders; dependencies point one way, cli → launch → {prepare, train,
evaluation} → the core, and the three stage folders never import each other (they meet through files on disk):

    cli.py            `alignkit <command>`, `check`    registry.py    the command table (stages and tools)
    errors.py         the errors a user can fix from the message; command.py: how every command reports them
    config.py         recipes → TRL dataclasses        data.py        sources → validated rows, jsonl
    models.py         loading models and tokenizers    templates.py   named chat templates
    generation.py     batched generation (transformers, vLLM)
    artifacts.py      atomic outputs, manifests        architecture.py  model shapes and memory
    numerics.py       CPU numerics independent of the instruction set      verify.py  did this machine reproduce?
    sources.py        the source files a command runs (its DVC deps, its manifest's code hash)
    prepare/          base_model, pairs, rejection_sampling
    train/            the stage story (stage.py), checkpoints, saving, one module per stage, stored reference
    evaluation/       evaluate, judges, mtbench, lmeval, alpacaeval, report
    launch/           preflight, plan, launch (accelerate on every GPU, Slurm's nodes)

Imports sit at the top of each module, except torch, transformers, TRL, PEFT, datasets, bitsandbytes, lm-eval,
AlpacaEval and vLLM where only some functions need them: they take seconds to import, and `alignkit check`,
`plan` and `launch --preflight` must answer in one (tests/test_layout.py keeps both rules).
"""

from alignkit import numerics as _numerics

_numerics.apply()  # before anything imports torch: CPU results independent of the instruction set (numerics.py)
