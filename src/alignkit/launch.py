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
import os
import shutil
import subprocess
import sys

from .stage import UsageError, run_cli


def gpus_here() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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


def accelerate_command(stage: str, recipe_path: str, overrides: list[str], *, config: str, world: int,
                       machines: int, rank: int, address: str | None, port: int) -> list[str]:
    exe = shutil.which("accelerate") or "accelerate"
    cmd = [exe, "launch", "--config_file", config, "--num_processes", str(world), "--num_machines", str(machines),
           "--machine_rank", str(rank)]
    if machines > 1:
        cmd += ["--main_process_ip", address or "127.0.0.1", "--main_process_port", str(port)]
    return cmd + ["-m", f"alignkit.{stage}", "--config", recipe_path, *overrides]


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit launch", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", nargs="?", help="cpt, sft, dpo, orpo, cpo, kto or reward")
    p.add_argument("--config", help="the stage's recipe")
    p.add_argument("--accelerate_config", default="recipes/accelerate/ddp.yaml")
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
    world = args.num_machines * max(gpus, 1)
    recipe = preflight(args.stage, args.config, overrides, world=world, gpus=gpus)
    if gpus:
        import torch

        check_fits(args.stage, recipe, args.config, world=world, accelerate_config=args.accelerate_config,
                   device_gib=torch.cuda.get_device_properties(0).total_memory / 2**30, force=args.force)
    if gpus == 0:  # a CPU twin: one process, no launcher
        import importlib

        from .cli import STAGES

        return importlib.import_module(STAGES[args.stage]).main(["--config", args.config, *overrides])
    if not os.path.isfile(args.accelerate_config):
        raise FileNotFoundError(f"accelerate config not found: {args.accelerate_config}")
    cmd = accelerate_command(args.stage, args.config, overrides, config=args.accelerate_config, world=world,
                             machines=args.num_machines, rank=args.machine_rank, address=args.main_process_ip,
                             port=args.main_process_port)
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    return run_forwarding_signals(cmd)


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run the launcher; SIGUSR1/SIGTERM (Slurm's warning before preemption or the time limit) go on to it."""
    import signal

    from .reliability import REQUEUE_EXIT

    child, received = subprocess.Popen(cmd), []

    def forward(signum, frame):
        received.append(signum)
        child.send_signal(signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)
    status = child.wait()
    # accelerate reports a worker's exit 75 (checkpointed after the signal) as a generic failure
    return REQUEUE_EXIT if received and status != 0 else status


def main(argv=None) -> int:
    return run_cli("launch", run, argv)


if __name__ == "__main__":
    sys.exit(main())
