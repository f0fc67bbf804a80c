"""Scaling out: the checks before a run (`preflight`: recipe, GPUs, accelerate config), the memory and time plan
(`plan`), and `launch`, which starts a stage under accelerate on every GPU of a machine or a Slurm allocation."""
