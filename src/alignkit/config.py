"""Recipes: one flat YAML per stage, parsed into TRL's own dataclasses.

A recipe mixes three groups of keys, all at the top level (as in the alignment-handbook):
  * alignkit's `DataArguments` and `AlignkitArguments` (below),
  * TRL's `ModelConfig` (model id, dtype, LoRA / QLoRA switches),
  * the stage's TRL trainer config (`SFTConfig`, `DPOConfig`, ... — every `TrainingArguments` key).

`load_recipe` reads the YAML, rejects unknown keys (naming the nearest valid ones) before anything heavy is
imported or loaded, applies `--key value` overrides from the command line through `TrlParser` (so CLI beats
YAML and values are typed by the dataclasses), picks precision/device for this machine, and runs the
cross-field checks. `alignkit check` calls exactly this path.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from alignkit.errors import RecipeError, nearest
from alignkit.templates import resolve_chat_template

# The keys of one data source in a recipe's `datasets` / `test_datasets`.
SOURCE_KEYS = {"path", "name", "split", "data_files", "data_dir", "fraction", "revision"}


@dataclass
class DataArguments:
    datasets: list[dict] = field(
        default_factory=list,
        metadata={
            "help": "Training sources. Each: {path, name?, split?, data_files?, fraction?}. `path` is a local "
            ".jsonl/.json/.parquet file or directory, or a hub dataset id; `fraction` takes that share of the "
            "source's rows (seeded shuffle), like the handbook's dataset mixer."
        },
    )
    test_datasets: list[dict] = field(
        default_factory=list,
        metadata={"help": "Held-out sources (same form). Empty: a seeded split of `test_split_size` is made."},
    )
    test_split_size: float = field(
        default=0.1, metadata={"help": "Fraction (<1) or row count (>=1) held out when no test_datasets are given."}
    )
    drop_invalid: bool = field(
        default=False,
        metadata={"help": "Drop bad rows (counted in the stage's metrics) instead of failing on the first one."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training rows after mixing."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on held-out rows."})


@dataclass
class AlignkitArguments:
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file name inside model_name_or_path (dequantised on load)."}
    )
    adapter_path: str | None = field(
        default=None,
        metadata={"help": "Start from this PEFT adapter (e.g. the SFT stage's output) and keep training it."},
    )
    ref_logps: str | None = field(
        default=None,
        metadata={
            "help": "DPO: a directory of reference log-probs written by `alignkit ref_logps` for this recipe; read "
            "instead of computed (needs precompute_ref_log_probs: true), so a β or loss sweep computes them once."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template: a name (smollm2, chatml, zephyr), a Jinja string, or unset = model's own."},
    )
    bnb_4bit_compute_dtype: str | None = field(
        default=None, metadata={"help": "QLoRA compute dtype (bfloat16, float16, float32); default: bf16 on GPU."}
    )
    merge_adapter: bool = field(
        default=False, metadata={"help": "Also save the adapter merged into the base model under <output_dir>/merged."}
    )
    requires_gpu: bool = field(
        default=False, metadata={"help": "Refuse to run (before loading anything) on a machine without a CUDA GPU."}
    )
    prepare_only: bool = field(
        default=False,
        metadata={
            "help": "Validate the recipe, read and check every data row, fetch tokenizer and hub data into the cache "
            "(and pack CPT blocks), then stop before loading weights: the CPU step before a GPU job (slurm/)."
        },
    )
    cpu_keep_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "Training on CPU (glibc): serve large tensors from the heap and never hand freed memory back to "
            "the OS, so each step reuses it instead of faulting in fresh zeroed pages (~20% of a smol DPO step was "
            "kernel time). Process-wide; peak RSS grows a little (+5 % for the smol DPO run)."
        },
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Sequences per optimiser step over all processes. gradient_accumulation_steps is derived at "
            "launch as global / (world size x per_device_train_batch_size), so 1, 8 or 16 GPUs optimise alike."
        },
    )
    cache_dir: str = field(
        default="build/cache", metadata={"help": "Where tokenised, packed data is cached between runs (CPT)."}
    )
    metrics_dir: str | None = field(
        default=None,
        metadata={
            "help": "Also write metrics.json and train_log.csv here as <stage>.json / <stage>_log.csv "
            "(DVC metrics and plots must live outside the stage's output directory)."
        },
    )


@dataclass
class Recipe:
    """Everything one stage run needs, resolved."""

    path: str | None
    data: DataArguments
    model: Any  # trl.ModelConfig
    alignkit: AlignkitArguments  # the recipe's own keys (not TRL's)
    train: Any  # the stage's TRL config
    explicit_keys: set[str]
    notes: list[str]
    half_precision: set[str] = field(default_factory=set)  # {"bf16", "fp16"} as asked by YAML/CLI
    output_dir: str = ""  # where the final output goes (the Trainer's own output_dir holds the checkpoints)
    publish_to: str | None = None  # the Hub repository the finished output goes to (push_to_hub + hub_model_id)

    def asks(self, precision: str) -> bool:
        """Whether the recipe asks for bf16/fp16, even when `alignkit check` validated it in fp32 on a CPU."""
        return precision in self.half_precision or bool(getattr(self.train, precision))

    def resolved(self) -> dict:
        """Flat dict of every key of this recipe, as it will be used (written next to each stage output).
        `output_dir` is the recipe's own: the Trainer's is the run directory alignkit points it at (an absolute,
        per-run path that must not reach a manifest, a config.yaml or a checkpoint fingerprint)."""
        out: dict[str, Any] = {}
        for group in (self.data, self.alignkit, self.model):
            out.update(dataclasses.asdict(group))
        train = self.train.to_dict()
        for key in ("hub_token", "push_to_hub_token"):  # never written anywhere
            train.pop(key, None)
        out.update(train)
        out["output_dir"] = self.output_dir
        return out


def _field_names(*classes) -> set[str]:
    return {f.name for cls in classes for f in dataclasses.fields(cls)}


def _nearest(key: str, valid: set[str]) -> str:
    close = nearest(key, valid)
    return close if close != "(none close)" else "(none close; see `alignkit check --keys`)"

def _check_types(parser, config: dict, argv: list[str], where: str) -> None:
    """A value of the wrong type names its key, where it came from and what was expected (argparse alone says
    only that the arguments are invalid; TrainingArguments fails later with a TypeError)."""
    actions = {a.dest: a for a in parser._actions}
    given = [(k, v, where) for k, v in config.items()]
    for i, a in enumerate(argv):
        if a.startswith("--"):
            key, eq, value = a[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
            given.append((key, value if (eq or value) else None, "command line"))
    for key, value, source in given:
        action = actions.get(key)
        if (action is None or value is None or not callable(action.type) or isinstance(value, (list, dict))
                or action.type in (dict, list)):
            continue
        if isinstance(value, bool) and action.type in (int, float):
            ok = False
        else:
            try:
                converted = action.type(str(value).lower() if isinstance(value, bool) else str(value))
                ok = action.choices is None or converted in action.choices or str(converted) in map(str, action.choices)
            except (TypeError, ValueError, AttributeError, argparse.ArgumentTypeError):
                ok = False
        if not ok:
            expected = getattr(action.type, "__name__", str(action.type))
            if expected == "string_to_bool":
                expected = "true or false"
            elif expected == "<lambda>":
                expected = "a choice"
            choices = f" (one of: {', '.join(map(str, action.choices))})" if action.choices else ""
            raise RecipeError(f"{source}: {key}: {value!r} is not a valid value; expected {expected}{choices}")


# transformers 5 renamed these TrainingArguments; the old names still parse but warn, and where both are set the
# new one wins — so a recipe's `gradient_checkpointing: false` would lose to alignkit's own default.
RENAMED = {"gradient_checkpointing": "activation_checkpointing",
           "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def _current_names(config: dict, argv: list[str], where: str) -> tuple[dict, list[str]]:
    """The recipe and command line with renamed keys under their current names."""
    for old, new in RENAMED.items():
        if old in config and new in config:
            raise RecipeError(f"{where}: {old} and {new} are the same setting (the first is its old name); keep {new}")
        if old in config:
            config = {(new if k == old else k): v for k, v in config.items()}
    renamed = []
    for a in argv:
        key, eq, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        renamed.append(f"--{RENAMED[key]}{eq}{value}" if key in RENAMED else a)
    return config, renamed


def _cli_keys(argv: list[str]) -> list[str]:
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--")]


def cuda_info() -> tuple[bool, bool]:
    """(has CUDA GPU, GPU supports bf16)."""
    import torch

    if not torch.cuda.is_available():
        return False, False
    return True, torch.cuda.is_bf16_supported()


def load_recipe(
    config_path: str | None,
    argv: list[str],
    trainer_config_cls,
    *,
    stage_check=None,
    stage_defaults: dict | None = None,
    for_check: bool = False,
) -> Recipe:
    """Parse a recipe YAML plus `--key value` overrides into a `Recipe`.

    `for_check` validates a recipe meant for another machine (e.g. a GPU recipe on this CPU laptop): precision
    is forced to fp32 for building the config objects only, and the GPU requirement becomes a note.
    `stage_check(recipe, fail)` adds the stage's own cross-field checks; `stage_defaults` are the stage's own
    defaults for keys the recipe leaves unset.
    """
    from trl import ModelConfig, TrlParser

    classes = (DataArguments, AlignkitArguments, ModelConfig, trainer_config_cls)
    valid = _field_names(*classes)
    where = config_path or "command line"

    config: dict[str, Any] = {}
    if config_path is not None:
        if os.path.isdir(config_path):
            raise RecipeError(f"{config_path} is a directory, not a recipe file "
                              f"(e.g. {config_path.rstrip('/')}/sft.yaml)")
        if not os.path.isfile(config_path):
            raise RecipeError(f"recipe file not found: {config_path}")
        with open(config_path) as f:
            try:
                config = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise RecipeError(f"{config_path}: not valid YAML: {e}") from e
        if not isinstance(config, dict):
            raise RecipeError(f"{config_path}: a recipe must be a YAML mapping of key: value")

    for key in list(config) + _cli_keys(argv):
        if key not in valid:
            source = "command line" if key not in config else config_path
            raise RecipeError(f"unknown key '{key}' ({source}); nearest valid keys: {_nearest(key, valid)}")

    config, argv = _current_names(config, argv, where)
    explicit = set(config) | set(_cli_keys(argv))
    has_cuda, has_bf16 = cuda_info()
    notes: list[str] = []

    defaults = {**(stage_defaults or {}), **config}
    half = {p for p in ("bf16", "fp16") if config.get(p) is True or f"--{p}" in argv or f"--{p}=true" in argv}
    if any(a in ("--bf16", "--fp16") for a in argv):  # `--bf16 false` is not a request
        for i, a in enumerate(argv[:-1]):
            if a in ("--bf16", "--fp16") and argv[i + 1].lower() in ("false", "0", "no"):
                half.discard(a[2:])
    wants_half = bool(half)
    if for_check and not has_cuda:
        if wants_half or config.get("requires_gpu"):
            notes.append("GPU recipe: validated here with fp32 on CPU; it will refuse to train without a GPU")
        defaults["bf16"], defaults["fp16"] = False, False
    else:
        # TRL defaults to bf16=True, which crashes without a GPU and is ~10x slower on a CPU without bf16 units.
        defaults.setdefault("bf16", has_bf16)
        defaults.setdefault("fp16", False)
        if not has_cuda:
            defaults.setdefault("use_cpu", True)
    # Checkpointing trades ~20% speed for memory: worth it on a GPU, not on a CPU with plenty of RAM.
    defaults.setdefault("activation_checkpointing", has_cuda)
    defaults.setdefault("report_to", "none")
    defaults.setdefault("logging_steps", 1)
    # Checkpoints for resume (beside the output, see train/checkpoints.py); the last two survive a crash mid-save.
    defaults.setdefault("save_strategy", "steps")
    defaults.setdefault("save_steps", 100)
    defaults.setdefault("save_total_limit", 2)

    parser = TrlParser(classes)
    _check_types(parser, config, argv, where)
    parser.set_defaults_with_config(**defaults)
    try:
        data, own, model, train = parser.parse_args_into_dataclasses(args=list(argv))
    except SystemExit as e:  # argparse prints its own message for a bad CLI value
        raise RecipeError(f"{where}: invalid command-line arguments {argv}") from e
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: {e}") from e

    train.report_to = check_report_to(train.report_to, where)
    recipe = Recipe(config_path, data, model, own, train, explicit, notes, half, output_dir=train.output_dir)
    # The Trainer would push every checkpoint as it saves; alignkit publishes the finished output once, after its
    # atomic rename (train/stage.py: finish).
    if train.push_to_hub and not train.hub_model_id:
        raise RecipeError(f"{where}: push_to_hub: true needs hub_model_id (the repository to publish to, e.g. "
                          "me/smol-dpo)")
    recipe.publish_to, train.push_to_hub = (train.hub_model_id if train.push_to_hub else None), False
    validate(recipe, for_check=for_check, has_cuda=has_cuda, stage_check=stage_check)
    return recipe


# report_to: the trackers alignkit supports and the packages each needs (extras: pip install -e '.[tracking]').
# "all" is refused: it would log to whatever happens to be installed.
TRACKERS = {"none": (), "dvclive": ("dvclive",), "tensorboard": ("tensorboard", "tensorboardX"),
            "wandb": ("wandb",), "mlflow": ("mlflow",)}


def check_report_to(report_to, where: str) -> list[str]:
    """The recipe's trackers as a list ([]: none), each known and importable (found without importing it)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or ["none"])
    for name in names:
        if name not in TRACKERS:
            raise RecipeError(f"{where}: report_to: unknown tracker '{name}'; nearest valid: "
                              f"{nearest(name, TRACKERS)} (any of {', '.join(TRACKERS)})")
        packages = TRACKERS[name]
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise RecipeError(f"{where}: report_to: {name} needs the {' or '.join(packages)} package, which is not "
                              f"installed: pip install -e '.[tracking]'")
    return [n for n in names if n != "none"]


def validate_source_spec(spec, label: str, where: str) -> dict:
    """A recipe's data source, checked, as a mapping ({path, name?, split?, data_files?, fraction?})."""
    if isinstance(spec, str) and spec.strip():
        return {"path": spec}
    if not isinstance(spec, dict) or "path" not in spec:
        raise RecipeError(f"{where}: {label} must be a path string or a mapping with a 'path' key, got {spec!r}")
    unknown = set(spec) - SOURCE_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise RecipeError(f"{where}: {label}: unknown key '{key}'; nearest valid keys: {_nearest(key, SOURCE_KEYS)}")
    frac = spec.get("fraction")
    if frac is not None and not (isinstance(frac, (int, float)) and 0 < frac <= 1):
        raise RecipeError(f"{where}: {label}.fraction must be in (0, 1], got {frac!r}")
    return dict(spec)


def validate(recipe: Recipe, *, for_check: bool, has_cuda: bool, stage_check=None) -> None:
    """Cross-field checks that no single dataclass can do. Raise RecipeError naming the keys involved."""
    m, x, d = recipe.model, recipe.alignkit, recipe.data
    where = recipe.path or "command line"

    def fail(msg: str):
        raise RecipeError(f"{where}: {msg}")

    if not m.model_name_or_path:
        fail("model_name_or_path is required")
    if "hub_token" in recipe.explicit_keys:
        fail("hub_token: a token never goes in a recipe or on the command line; set HF_TOKEN in the environment")
    if not d.datasets:
        fail("datasets: at least one training source is required")
    # Either form of a source — `data/my.jsonl` or `{path: data/my.jsonl, ...}` — becomes the mapping here, once, so
    # everything downstream (loading, fingerprints, manifests, model cards) reads one form.
    d.datasets = [validate_source_spec(spec, f"datasets[{i}]", where) for i, spec in enumerate(d.datasets)]
    d.test_datasets = [validate_source_spec(spec, f"test_datasets[{i}]", where)
                       for i, spec in enumerate(d.test_datasets)]
    if not d.test_datasets and not (0 < d.test_split_size):
        fail("test_split_size must be > 0 when no test_datasets are given")
    if m.load_in_4bit and m.load_in_8bit:
        fail("load_in_4bit and load_in_8bit are mutually exclusive")
    if (m.load_in_4bit or m.load_in_8bit) and not m.use_peft:
        fail("QLoRA (load_in_4bit/load_in_8bit) needs use_peft: true — a quantised base cannot be fully fine-tuned")
    if x.merge_adapter and not (m.use_peft or x.adapter_path):
        fail("merge_adapter: true needs a LoRA run (use_peft: true or adapter_path); a full fine-tune is already "
             "a whole model")
    if x.adapter_path and m.use_peft:
        fail("adapter_path continues training an existing adapter; do not also set use_peft (a new adapter)")
    if recipe.asks("bf16") and recipe.asks("fp16"):
        fail("bf16 and fp16 are mutually exclusive")
    if x.bnb_4bit_compute_dtype not in (None, "bfloat16", "float16", "float32"):
        fail(f"bnb_4bit_compute_dtype: {x.bnb_4bit_compute_dtype!r} is not one of bfloat16, float16, float32")
    try:
        resolve_chat_template(x.chat_template)
    except ValueError as e:
        fail(str(e))
    if needs_gpu(recipe) and not has_cuda and not for_check:  # (4-bit runs on CPU with bitsandbytes >= 0.45)
        which = "requires_gpu" if x.requires_gpu else ("fp16" if recipe.asks("fp16") else "bf16")
        fail(f"this recipe needs a CUDA GPU ({which}: true) and this machine has none; nothing was loaded")
    if x.global_batch_size is not None:
        derive_accumulation(recipe, world_size(), fail)
    if stage_check is not None:
        stage_check(recipe, fail)


def cpu_bf16(recipe: Recipe) -> bool:
    """bf16 asked for on CPU on purpose (`use_cpu: true` stated beside it): bf16 autocast, fp32 weights where they
    are trained. Worth it on CPUs with AVX-512 BF16; ~10x slower on AVX2-only CPUs, and not bit-reproducible across
    instruction sets as the fp32 default is."""
    return recipe.asks("bf16") and "use_cpu" in recipe.explicit_keys and bool(recipe.train.use_cpu)


def needs_gpu(recipe: Recipe) -> bool:
    """Whether a recipe can only run on CUDA GPUs: it says so, or it asks for half precision (except bf16 on CPU
    by choice, see cpu_bf16)."""
    x = recipe.alignkit
    return bool(x.requires_gpu or recipe.asks("fp16") or (recipe.asks("bf16") and not cpu_bf16(recipe)))


def world_size() -> int:
    """Processes in this run, as torchrun / accelerate launch / srun export it (1 when launched plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def derive_accumulation(recipe: Recipe, world: int, fail) -> None:
    """gradient_accumulation_steps = global_batch_size / (world × per-device batch), or a clear error."""
    t, global_batch = recipe.train, recipe.alignkit.global_batch_size
    per_step = world * t.per_device_train_batch_size
    if global_batch <= 0 or global_batch % per_step:
        fail(f"global_batch_size {global_batch} is not divisible by world size {world} × "
             f"per_device_train_batch_size {t.per_device_train_batch_size} = {per_step}; change one of them")
    derived = global_batch // per_step
    if "gradient_accumulation_steps" in recipe.explicit_keys and t.gradient_accumulation_steps != derived:
        fail(f"gradient_accumulation_steps {t.gradient_accumulation_steps} contradicts global_batch_size "
             f"{global_batch} at world size {world} (which gives {derived}); set only global_batch_size")
    t.gradient_accumulation_steps = derived


def split_config_arg(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `--config PATH` (or `--config=PATH`) out of argv."""
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "--config":
            if i + 1 >= len(argv):
                raise RecipeError("--config needs a path")
            path = argv[i + 1]
            del argv[i : i + 2]
            return path, argv
        if a.startswith("--config="):
            del argv[i]
            return a.split("=", 1)[1], argv
    return None, argv
