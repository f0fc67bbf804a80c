"""`launch`: run a training stage on every GPU of this machine (or of a Slurm allocation) with accelerate.

    python -m alignkit.launch dpo --config recipes/zephyr-7b-beta/dpo.yaml --accelerate_config recipes/accelerate/zero3.yaml
    python -m alignkit.launch --preflight recipes/zephyr-7b-beta/sft.yaml recipes/zephyr-7b-beta/dpo.yaml

Before anything is loaded: the recipe is validated, the GPUs are counted (a GPU recipe on a machine without
them is refused), and the recipe's `global_batch_size` is checked against world size × per-device batch, so
an impossible run fails in a second rather than after the queue wait and the model load. Then:
  - GPUs present: `accelerate launch --config_file CONFIG --num_processes WORLD ...` with the machine rank and
    rendezvous address of a multi-node job (`--num_machines`, `--machine_rank`, `--main_process_ip/port`, which
    slurm/*.sh fill from SLURM_NNODES, SLURM_NODEID and the first node of the allocation);
  - no GPU and a recipe that allows that (the CPU twins): the stage runs in this process.
`--preflight` only does the checks (what `make train-*` runs before `dvc repro`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

from .stage import UsageError, run_cli


def gpus_here() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30


def preflight(stage: str, recipe_path: str, overrides: list[str], *, world: int, gpus: int):
    """Validate `recipe_path` for a run of `world` processes on machines with `gpus` GPUs each; return the
    recipe (with gradient accumulation derived for that world size)."""
    import importlib

    from .cli import STAGES
    from .config import RecipeError, derive_accumulation, needs_gpu

    if stage not in STAGES:
        raise UsageError(f"unknown stage '{stage}' (one of: {', '.join(STAGES)})")
    recipe = importlib.import_module(STAGES[stage]).SPEC.parse(["--config", recipe_path, *overrides], for_check=True)
    if needs_gpu(recipe) and gpus == 0:
        raise RecipeError(f"{recipe_path}: this recipe needs CUDA GPUs and this machine has none; nothing was "
                          "loaded. Run it on a GPU host (make train-*, sbatch slurm/<stage>.sh, docker run --gpus all)")
    if recipe.extras.global_batch_size is not None:
        def fail(msg):
            raise RecipeError(f"{recipe_path}: {msg}")

        derive_accumulation(recipe, world, fail)
    return recipe


def check_fits(stage: str, recipe, recipe_path: str, *, world: int, accelerate_config: str | None,
               device_gib: float, force: bool) -> dict:
    """Refuse a run that `alignkit plan` predicts will not fit in `device_gib` per GPU, unless forced."""
    from .config import RecipeError
    from .plan import architecture, estimate, zero_stage

    zero, fsdp = zero_stage(accelerate_config)
    est = estimate(recipe, stage, architecture(recipe.model.model_name_or_path, recipe.extras.gguf_file, recipe_path),
                   world=world, device="cuda", zero=zero, fsdp=bool(fsdp))
    if est["peak_gib"] > device_gib * 0.95 and not force:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in est["parts_gib"].items() if v)
        raise RecipeError(f"{recipe_path}: predicted peak {est['peak_gib']:.1f} GiB per GPU does not fit in "
                          f"{device_gib:.0f} GiB ({parts} GiB; `alignkit plan` for details). Use a ZeRO-3 "
                          "accelerate config, a smaller per_device_train_batch_size or max_length, or --force")
    return est


ACCELERATE_CONFIGS = "recipes/accelerate"


def default_accelerate_config(recipe, gpus: int) -> str:
    """The accelerate config a recipe runs under unless one is named: data parallel for LoRA and QLoRA (the frozen
    base fits each GPU; 4-bit weights cannot be sharded here), ZeRO-3 for full-parameter training (a 7B model's
    fp32 masters, gradients and Adam states do not fit one GPU). On a machine without GPUs, the same on 2 CPU
    processes (ddp-cpu.yaml, zero3-cpu.yaml): the CPU twins run the multi-process path GPU users take."""
    lora = recipe.model.use_peft or recipe.extras.adapter_path
    return os.path.join(ACCELERATE_CONFIGS, ("ddp" if lora else "zero3") + ("" if gpus else "-cpu") + ".yaml")


def read_accelerate_config(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"accelerate config not found: {path}")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict) or "distributed_type" not in config:
        raise UsageError(f"{path}: not an accelerate config (no distributed_type)")
    return config


def accelerate_config_problems(config: dict) -> list[str]:
    """What in an accelerate config makes the final save write no (or empty) weights."""
    problems = []
    kind = config.get("distributed_type")
    fsdp, ds = config.get("fsdp_config") or {}, config.get("deepspeed_config") or {}
    if kind == "FSDP" and fsdp.get("fsdp_state_dict_type", "FULL_STATE_DICT") != "FULL_STATE_DICT":
        problems.append(f"fsdp_state_dict_type {fsdp['fsdp_state_dict_type']}: Trainer.save_model writes no weights "
                        "with it; use FULL_STATE_DICT")
    if kind == "DEEPSPEED" and ds.get("deepspeed_config_file"):
        from .plan import zero_stage_of

        with open(ds["deepspeed_config_file"]) as f:
            zero = json.load(f).get("zero_optimization", {})
        if zero_stage_of(config)[0] == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
            problems.append(f"{ds['deepspeed_config_file']}: ZeRO-3 without stage3_gather_16bit_weights_on_model_save: "
                            "true: the final save holds no gathered weights")
    elif kind == "DEEPSPEED" and int(ds.get("zero_stage", 0)) == 3 and not ds.get("zero3_save_16bit_model"):
        problems.append("ZeRO-3 without zero3_save_16bit_model: true: the final save holds no gathered weights")
    return problems


def check_launch(recipe, recipe_path: str, config_path: str, config: dict) -> None:
    """Refuse a recipe/accelerate-config pair that cannot work, before anything loads."""
    from .config import RecipeError

    from .plan import zero_stage_of

    problems = accelerate_config_problems(config)
    sharded = zero_stage_of(config)[0] == 3  # ZeRO-3, or FSDP full shard
    if sharded and (recipe.model.load_in_4bit or recipe.model.load_in_8bit):
        problems.append("QLoRA (load_in_4bit/8bit) under ZeRO-3 or FSDP: 4-bit weights cannot be sharded without "
                        "bnb_4bit_quant_storage, which alignkit does not set; use recipes/accelerate/ddp.yaml or "
                        "zero2.yaml")
    if problems:
        raise RecipeError(f"{recipe_path} with {config_path}: " + "; ".join(problems))


def accelerate_command(stage: str, recipe_path: str, overrides: list[str], *, config: str, world: int,
                       machines: int, rank: int, address: str | None, port: int) -> list[str]:
    # `accelerate launch` of this interpreter's environment, whether or not its bin/ is on PATH
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", str(world), "--num_machines", str(machines),
           "--machine_rank", str(rank)]
    if machines > 1:
        cmd += ["--main_process_ip", address or "127.0.0.1", "--main_process_port", str(port)]
    return cmd + ["-m", f"alignkit.{stage}", "--config", recipe_path, *overrides]


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit launch", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", nargs="?", help="cpt, sft, dpo, orpo, cpo, kto or reward")
    p.add_argument("--config", help="the stage's recipe")
    p.add_argument("--accelerate_config", default="auto",
                   help="an accelerate config; auto (default): ddp.yaml for LoRA/QLoRA, zero3.yaml for full training "
                        "(without GPUs: their 2-process CPU twins ddp-cpu.yaml, zero3-cpu.yaml)")
    p.add_argument("--num_machines", type=int, default=int(os.environ.get("SLURM_NNODES", "1")))
    p.add_argument("--machine_rank", type=int, default=int(os.environ.get("SLURM_NODEID", "0")))
    p.add_argument("--main_process_ip", default=os.environ.get("MASTER_ADDR"))
    p.add_argument("--main_process_port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
    p.add_argument("--preflight", nargs="*", metavar="RECIPE", help="only check these recipes (stage from file name)")
    p.add_argument("--dry_run", action="store_true", help="print the launch command instead of running it")
    p.add_argument("--force", action="store_true", help="launch even when alignkit plan predicts it will not fit")
    args, overrides = p.parse_known_args(argv)

    gpus = gpus_here()
    if args.preflight is not None:
        from .cli import stage_of

        for path in args.preflight:
            stage = stage_of(path)
            recipe = preflight(stage, path, [], world=args.num_machines * max(gpus, 1), gpus=gpus)
            print(f"ok   {path}: {stage} on {args.num_machines} machine(s) x {gpus} GPU(s), "
                  f"gradient_accumulation_steps {recipe.train.gradient_accumulation_steps}")
        return 0
    if not args.stage or not args.config:
        raise UsageError("alignkit launch STAGE --config RECIPE [--accelerate_config CONFIG] [--key value ...]")
    config_path = args.accelerate_config
    if config_path == "auto":
        config_path = default_accelerate_config(preflight(args.stage, args.config, overrides, world=1, gpus=gpus),
                                                gpus)
    config = read_accelerate_config(config_path)
    # On CPU, a config that says use_cpu with several processes (the CPU twins of multi-GPU runs) is launched as it
    # is; any other runs the stage in this process.
    per_machine = gpus or (int(config.get("num_processes", 1)) if config.get("use_cpu") else 1)
    world = args.num_machines * per_machine
    recipe = preflight(args.stage, args.config, overrides, world=world, gpus=gpus)
    check_launch(recipe, args.config, config_path, config)
    if gpus:
        check_fits(args.stage, recipe, args.config, world=world, accelerate_config=config_path,
                   device_gib=gpu_gib(), force=args.force)
    elif world == 1:  # a CPU twin on one process: no launcher
        import importlib

        from .cli import STAGES

        return importlib.import_module(STAGES[args.stage]).main(["--config", args.config, *overrides])
    cmd = accelerate_command(args.stage, args.config, overrides, config=config_path, world=world,
                             machines=args.num_machines, rank=args.machine_rank, address=args.main_process_ip,
                             port=args.main_process_port)
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    return run_forwarding_signals(cmd)


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run the launcher. SIGUSR1/SIGTERM (Slurm's warning before preemption or the time limit) go to the training
    workers themselves, not to `accelerate launch`: its in-process elastic agent handles only TERM/INT/HUP/QUIT —
    USR1 kills it and orphans the workers — and on TERM it SIGKILLs the workers 30 s later, too soon for a 7B
    checkpoint. The workers checkpoint after the current step and exit 75; the agent, never signalled, waits for
    them, and this process then exits 75 (requeue) instead of the agent's generic failure."""
    import signal

    from .reliability import REQUEUE_EXIT

    child, received = subprocess.Popen(cmd), []

    def forward(signum, frame):
        received.append(signum)
        workers = worker_pids(child.pid)
        print(f"alignkit launch: {signal.Signals(signum).name} → {len(workers)} training process(es) "
              f"{workers}: checkpoint, then exit {REQUEUE_EXIT}", file=sys.stderr, flush=True)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)
    status = child.wait()
    return REQUEUE_EXIT if received and status != 0 else status


def worker_pids(launcher_pid: int) -> list[int]:
    """The training processes of `accelerate launch`: its direct children (their own children — data loader
    workers — are not told: a signal they do not handle would kill them)."""
    import psutil  # accelerate's own dependency

    with contextlib.suppress(psutil.NoSuchProcess):
        return sorted(p.pid for p in psutil.Process(launcher_pid).children())
    return []


def main(argv=None) -> int:
    return run_cli("launch", run, argv)


if __name__ == "__main__":
    sys.exit(main())
