"""`launch`: run a training stage on every GPU of this machine (or of a Slurm allocation) with accelerate.

    alignkit launch dpo --config recipes/zephyr-7b-beta/dpo.yaml --accelerate_config recipes/accelerate/zero3.yaml
    alignkit launch --preflight recipes/zephyr-7b-beta/sft.yaml recipes/zephyr-7b-beta/dpo.yaml

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
import os
import signal
import subprocess
import sys

from alignkit.architecture import architecture
from alignkit.command import run_cli
from alignkit.errors import REQUEUE_EXIT, RecipeError, UsageError
from alignkit.launch.plan import estimate
from alignkit.launch.preflight import (
    check_launch,
    default_accelerate_config,
    gpu_gib,
    gpus_here,
    preflight,
    read_accelerate_config,
    zero_stage,
)
from alignkit.train import stage_module, stage_of


def check_fits(stage: str, recipe, recipe_path: str, *, world: int, accelerate_config: str | None,
               device_gib: float, force: bool) -> dict:
    """Refuse a run that `alignkit plan` predicts will not fit in `device_gib` per GPU, unless forced."""
    zero, fsdp = zero_stage(accelerate_config)
    est = estimate(recipe, stage, architecture(recipe.model.model_name_or_path, recipe.alignkit.gguf_file, recipe_path),
                   world=world, device="cuda", zero=zero, fsdp=bool(fsdp))
    if est["peak_gib"] > device_gib * 0.95 and not force:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in est["parts_gib"].items() if v)
        raise RecipeError(f"{recipe_path}: predicted peak {est['peak_gib']:.1f} GiB per GPU does not fit in "
                          f"{device_gib:.0f} GiB ({parts} GiB; `alignkit plan` for details). Use a ZeRO-3 "
                          "accelerate config, a smaller per_device_train_batch_size or max_length, or --force")
    return est


def accelerate_command(stage: str, recipe_path: str, overrides: list[str], *, config: str, world: int,
                       machines: int, rank: int, address: str | None, port: int) -> list[str]:
    # `accelerate launch` of this interpreter's environment, whether or not its bin/ is on PATH
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", str(world),
           "--num_machines", str(machines), "--machine_rank", str(rank)]
    if machines > 1:
        cmd += ["--main_process_ip", address or "127.0.0.1", "--main_process_port", str(port)]
    return cmd + ["-m", "alignkit", stage, "--config", recipe_path, *overrides]


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
        return stage_module(args.stage).main(["--config", args.config, *overrides])
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
