"""The `alignkit` command: `alignkit <command> [args]` — every stage and tool of the pipelines, one table.

A command, its module and its DVC stage share one name (`alignkit rejection_sampling` is
alignkit/prepare/rejection_sampling.py and the `rejection_sampling` stage); `python -m alignkit <command>` is the
same command with a chosen interpreter.
"""

from __future__ import annotations

import importlib
import sys

import yaml

from alignkit.command import configure_output, run_cli
from alignkit.errors import RecipeError, nearest
from alignkit.launch.preflight import accelerate_config_problems, read_accelerate_config
from alignkit.registry import TOOLS, command_module
from alignkit.train import STAGES, stage_module, stage_of

USAGE = f"""usage: alignkit <command> [args]

training stages (alignkit <stage> --config RECIPE [--key value ...]):
  {', '.join(STAGES)}
validate recipes without training:
  check RECIPE [RECIPE ...]     (stage from the file name: recipes/<name>/<stage>*.yaml, or --stage)
pipeline tools:
  {', '.join(TOOLS)}
--verbose (anywhere; or ALIGNKIT_LOG_LEVEL=INFO): every library's log and warnings, not only alignkit's
"""


def is_accelerate_config(path: str) -> bool:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "distributed_type" in data


def check_accelerate_config(path: str) -> bool:
    """An accelerate config (recipes/accelerate/*.yaml) is read with accelerate's own loader."""
    from accelerate.commands.config.config_args import ClusterConfig  # accelerate's own loader: heavy

    try:
        config = ClusterConfig.from_yaml_file(path)
    except (ValueError, TypeError, KeyError) as e:
        print(f"FAIL {path}: not a valid accelerate config: {e}")
        return False
    problems = accelerate_config_problems(read_accelerate_config(path))
    if problems:
        print(f"FAIL {path}: " + "; ".join(problems))
        return False
    zero = (config.deepspeed_config or {}).get("zero_stage")
    print(f"ok   {path}: accelerate {config.distributed_type.value}" + (f", ZeRO-{zero}" if zero else ""))
    return True


def check(argv: list[str]) -> int:
    """Validate recipes: parse, resolve every key, cross-field checks. Nothing is loaded or trained."""
    stage_override = None
    if "--stage" in argv:
        i = argv.index("--stage")
        stage_override, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    if not argv:
        print("usage: alignkit check RECIPE [RECIPE ...] [--stage sft|dpo]", file=sys.stderr)
        return 2
    failed = 0
    for path in argv:
        if is_accelerate_config(path):
            failed += not check_accelerate_config(path)
            continue
        stage = stage_override or stage_of(path)
        if stage not in STAGES:
            print(f"FAIL {path}: cannot tell the stage; name it <stage>*.yaml ({', '.join(STAGES)}) or pass --stage")
            failed += 1
            continue
        try:
            recipe = stage_module(stage).SPEC.parse(["--config", path], for_check=True)
        except RecipeError as e:
            print(f"FAIL {path}: {e}")
            failed += 1
            continue
        notes = f" ({'; '.join(recipe.notes)})" if recipe.notes else ""
        print(f"ok   {path}: {stage}, {recipe.model.model_name_or_path}{notes}")
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = configure_output(list(sys.argv[1:] if argv is None else argv))  # before a command's imports
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "check":
        return run_cli("check", check, rest)
    module = command_module(command)
    if module is None:
        print(f"alignkit: unknown command '{command}'; did you mean: {nearest(command, [*STAGES, *TOOLS, 'check'])}",
              file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    return importlib.import_module(module).main(rest)
