"""A one-node Slurm cluster on this machine for tests: installs slurm-wlm and munge with apt when missing,
starts munged, slurmctld and slurmd in the foreground with private state, sockets and ports under a temporary
directory, and stops exactly the processes it started."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time


def ensure_installed() -> None:
    if all(shutil.which(x) for x in ("sbatch", "slurmctld", "slurmd", "munged")):
        return
    if os.geteuid() != 0:
        raise RuntimeError("the Slurm test needs root to install slurm-wlm and munge (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True, capture_output=True,
                   env=env, timeout=900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: str):
        ensure_installed()
        self.root, self.procs = root, []
        host = socket.gethostname().split(".")[0]
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        node = " ".join(f for f in node.split() if not f.startswith("UpTime"))
        munge_dir = os.path.join(root, "munge")
        os.makedirs(munge_dir)
        os.chmod(root, 0o755)
        shutil.copy("/etc/munge/munge.key", os.path.join(munge_dir, "munge.key")) if os.path.exists(
            "/etc/munge/munge.key") else subprocess.run(
            ["dd", "if=/dev/urandom", f"of={munge_dir}/munge.key", "bs=1", "count=1024"], check=True,
            capture_output=True)
        subprocess.run(["chown", "-R", "munge:munge", munge_dir], check=True)
        os.chmod(os.path.join(munge_dir, "munge.key"), 0o400)
        self.socket = os.path.join(munge_dir, "munge.sock")
        self.conf = os.path.join(root, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=alignkit-test
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmUser=root
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
{node} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self._start(["runuser", "-u", "munge", "--", "munged", "-F", f"--socket={self.socket}",
                     f"--key-file={munge_dir}/munge.key", f"--pid-file={munge_dir}/munged.pid",
                     f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"], "munged")
        self._wait(lambda: os.path.exists(self.socket), "munged socket")
        self._start(["slurmctld", "-D", "-i", "-f", self.conf], "slurmctld")
        self._start(["slurmd", "-D", "-f", self.conf], "slurmd")
        self._wait(self._idle, "the node to be idle in sinfo", timeout=60)

    def _start(self, cmd, name):
        log = open(os.path.join(self.root, f"{name}.stdout"), "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env).stdout
        return out.strip() == "idle"

    def _wait(self, ready, what, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        logs = "".join(open(os.path.join(self.root, f)).read()[-1500:] for f in sorted(os.listdir(self.root))
                       if f.endswith((".log", ".stdout")))
        self.stop()
        raise RuntimeError(f"Slurm test cluster: gave up waiting for {what}\n{logs}")

    def run(self, cmd: list[str], **kw):
        return subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **kw.pop("env", {})}, **kw)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.procs = []
