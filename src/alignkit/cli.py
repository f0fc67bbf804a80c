"""The `alignkit` command: `alignkit <command> [args]`; each command is also `python -m alignkit.<module>`."""

from __future__ import annotations

import importlib
import os
import sys

# Training stages: recipe-driven (`--config recipes/<name>/<stage>.yaml`).
STAGES = {name: f"alignkit.{name}" for name in ("cpt", "sft", "dpo", "orpo", "cpo", "kto", "reward")}
# Stages that run on a training stage's recipe without training (`alignkit ref_logps --config R`, launchable too).
STAGES["ref_logps"] = "alignkit.ref_logps"
# Pipeline tools with their own flags.
TOOLS = {
    "base-model": "alignkit.base_model",
    "pairs": "alignkit.pairs",
    "rejection-sampling": "alignkit.rejection_sampling",
    "evaluate": "alignkit.evaluate",
    "mtbench": "alignkit.mtbench",
    "lmeval": "alignkit.lmeval",
    "alpacaeval": "alignkit.alpacaeval",
    "launch": "alignkit.launch",
    "plan": "alignkit.plan",
    "report": "alignkit.report",
    "verify": "alignkit.verify",
}

USAGE = f"""usage: alignkit <command> [args]

training stages (python -m alignkit.<stage> --config RECIPE [--key value ...]):
  {', '.join(STAGES)}
validate recipes without training:
  check RECIPE [RECIPE ...]     (stage from the file name: recipes/<name>/<stage>*.yaml, or --stage)
pipeline tools:
  {', '.join(TOOLS)}
"""


def stage_of(path: str) -> str | None:
    """recipes/zephyr/dpo_qlora.yaml → 'dpo'."""
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    for stage in sorted(STAGES, key=len, reverse=True):
        if stem == stage or stem.startswith((stage + "_", stage + "-", stage + ".")):
            return stage
    return None


def is_accelerate_config(path: str) -> bool:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "distributed_type" in data


def check_accelerate_config(path: str) -> bool:
    """An accelerate config (recipes/accelerate/*.yaml) is read with accelerate's own loader."""
    from accelerate.commands.config.config_args import ClusterConfig

    try:
        config = ClusterConfig.from_yaml_file(path)
    except (ValueError, TypeError, KeyError) as e:
        print(f"FAIL {path}: not a valid accelerate config: {e}")
        return False
    from .launch import accelerate_config_problems, read_accelerate_config

    problems = accelerate_config_problems(read_accelerate_config(path))
    if problems:
        print(f"FAIL {path}: " + "; ".join(problems))
        return False
    zero = (config.deepspeed_config or {}).get("zero_stage")
    print(f"ok   {path}: accelerate {config.distributed_type.value}" + (f", ZeRO-{zero}" if zero else ""))
    return True


def check(argv: list[str]) -> int:
    """Validate recipes: parse, resolve every key, cross-field checks. Nothing is loaded or trained."""
    from .config import RecipeError

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
        module = importlib.import_module(STAGES[stage])
        try:
            recipe = module.SPEC.parse(["--config", path], for_check=True)
        except RecipeError as e:
            print(f"FAIL {path}: {e}")
            failed += 1
            continue
        notes = f" ({'; '.join(recipe.notes)})" if recipe.notes else ""
        print(f"ok   {path}: {stage}, {recipe.model.model_name_or_path}{notes}")
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "check":
        from .stage import run_cli

        return run_cli("check", check, rest)
    module = STAGES.get(command) or TOOLS.get(command)
    if module is None:
        import difflib

        close = difflib.get_close_matches(command, [*STAGES, *TOOLS, "check"], n=3)
        print(f"alignkit: unknown command '{command}'" + (f"; did you mean: {', '.join(close)}" if close else ""),
              file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    return importlib.import_module(module).main(rest)


if __name__ == "__main__":
    sys.exit(main())
