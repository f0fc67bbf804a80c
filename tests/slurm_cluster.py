"""A one-node Slurm cluster on this machine for tests: installs slurm-wlm and munge with apt when missing,
starts munged, slurmctld and slurmd in the foreground with private state, sockets and ports under a temporary
directory, and stops exactly the processes it started."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time


def installed() -> bool:
    return all(shutil.which(x) for x in ("sbatch", "slurmctld", "slurmd", "munged"))


def ensure_installed() -> None:
    """Under `make test` two pytest workers start their Slurm tests at once: on a machine without Slurm both ran
    apt-get, and the second died on dpkg's lock (CI of a fresh clone, 2026-12-06). One installs at a time (a file
    lock), the other finds it done; apt itself also waits for a lock another program holds."""
    import fcntl

    if installed():
        return
    if os.geteuid() != 0:
        raise RuntimeError("the Slurm test needs root to install slurm-wlm and munge (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", "DPkg::Lock::Timeout=600"]
    with open("/tmp/alignkit-tests-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed():
            return
        subprocess.run(["apt-get", *wait, "update", "-qq"], check=True, capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", *wait, "install", "-y", "-qq", "slurm-wlm", "munge"], check=True,
                       capture_output=True, env=env, timeout=900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_conf(path: str, root: str, *, name: str, controller: str, nodes: str, partition: str, socket: str,
               per_node: str = "") -> None:
    """slurm.conf with private state, sockets, pid and log files under `root`; `per_node` ("-%n") keeps the slurmd
    files of several nodes on one machine apart. cred_expire: a requeued job waits that long before it may start
    again (slurm.conf(5); default 120 s) — 10 s is ample for steps that start in well under a second here."""
    with open(path, "w") as f:
        f.write(f"""ClusterName={name}
SlurmctldHost={controller}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={socket},cred_expire=10
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
SlurmdSpoolDir={root}/spool{per_node}
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd{per_node}.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd{per_node}.log
{nodes}
PartitionName=debug Nodes={partition} Default=YES MaxTime=INFINITE State=UP
""")


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
        write_conf(self.conf, root, name="alignkit-test", controller=host, nodes=f"{node} State=UNKNOWN",
                   partition=host, socket=self.socket)
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


class TwoNodeCluster:
    """Two Slurm nodes on this one machine: network namespaces joined by a veth pair, each with its own address
    (10.77.0.1, 10.77.0.2 — only inside the namespaces made here), hostname (its own UTS namespace) and slurmd;
    slurmctld on the first. Name resolution inside the namespaces comes from /etc/netns/<ns>/hosts, which
    `ip netns exec` mounts over /etc/hosts. One munged (its socket is a file both namespaces see). Stops exactly
    the processes it started and deletes what it made."""

    NODES = {"node1": "10.77.0.1", "node2": "10.77.0.2"}
    IFACE = "akslurm0"  # the veth end's name in both namespaces (GLOO_SOCKET_IFNAME for jobs)

    def __init__(self, root: str):
        ensure_installed()
        self.root, self.procs, self.made = root, [], []
        tag = str(os.getpid())
        self.ns = {node: f"ak{tag}{node[-1]}" for node in self.NODES}
        self._network(tag)
        munge_dir = os.path.join(root, "munge")
        os.makedirs(munge_dir)
        os.chmod(root, 0o755)
        subprocess.run(["dd", "if=/dev/urandom", f"of={munge_dir}/munge.key", "bs=1", "count=1024"], check=True,
                       capture_output=True)
        subprocess.run(["chown", "-R", "munge:munge", munge_dir], check=True)
        os.chmod(os.path.join(munge_dir, "munge.key"), 0o400)
        self.socket = os.path.join(munge_dir, "munge.sock")
        self.conf = os.path.join(root, "slurm.conf")
        # each node declares this machine's CPU topology (slurmd refuses a node that differs from its hardware)
        hw = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        topology = " ".join(f for f in hw.split() if f.split("=")[0] in
                            ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"))
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} {topology} RealMemory=4000 State=UNKNOWN"
                          for n, a in self.NODES.items())
        for n in self.NODES:
            os.makedirs(os.path.join(root, f"spool-{n}"))
        write_conf(self.conf, root, name="alignkit-two-nodes", controller=f"node1({self.NODES['node1']})",
                   nodes=nodes, partition="node1,node2", socket=self.socket, per_node="-%n")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self._start(["runuser", "-u", "munge", "--", "munged", "-F", f"--socket={self.socket}",
                     f"--key-file={munge_dir}/munge.key", f"--pid-file={munge_dir}/munged.pid",
                     f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"], "munged")
        self._wait(lambda: os.path.exists(self.socket), "munged socket")
        self._start(self.on("node1", "slurmctld", "-D", "-i", "-f", self.conf), "slurmctld")
        for node in self.NODES:
            self._start(self.on(node, "slurmd", "-D", "-N", node, "-f", self.conf), f"slurmd-{node}")
        self._wait(self._idle, "both nodes to be idle in sinfo", timeout=90)

    def _network(self, tag: str) -> None:
        a, b = (self.ns[n] for n in self.NODES)
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            self.made.append(ns)
            hosts = os.path.join("/etc/netns", ns)
            os.makedirs(hosts, exist_ok=True)
            with open(os.path.join(hosts, "hosts"), "w") as f:
                f.write("127.0.0.1 localhost\n" + "".join(f"{addr} {n}\n" for n, addr in self.NODES.items()))
        ends = (f"akv{tag}a", f"akv{tag}b")
        subprocess.run(["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]], check=True)
        for ns, end, addr in zip((a, b), ends, self.NODES.values()):
            subprocess.run(["ip", "link", "set", end, "netns", ns], check=True)
            for cmd in (["link", "set", end, "name", self.IFACE], ["addr", "add", f"{addr}/24", "dev", self.IFACE],
                        ["link", "set", self.IFACE, "up"], ["link", "set", "lo", "up"]):
                subprocess.run(["ip", "-n", ns, *cmd], check=True)

    def on(self, node: str, *cmd: str) -> list[str]:
        """`cmd` on `node`: in its network namespace, with its own hostname and /etc/hosts. (Not `ip netns exec`:
        it remounts /sys for the namespace, hiding /sys/fs/cgroup, and slurmd then fails to start.)"""
        hosts = os.path.join("/etc/netns", self.ns[node], "hosts")
        return ["nsenter", f"--net=/run/netns/{self.ns[node]}", "unshare", "--uts", "--mount", "sh", "-c",
                f'mount --bind {hosts} /etc/hosts && hostname {node} && exec "$@"', "sh", *cmd]

    def _start(self, cmd, name):
        log = open(os.path.join(self.root, f"{name}.stdout"), "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-o", "%t %D"]).stdout.split()
        return out == ["idle", "2"]

    _wait = Cluster._wait

    def run(self, cmd: list[str], **kw):
        """A client command (sbatch, squeue, scontrol) on node1, where slurmctld listens."""
        return subprocess.run(self.on("node1", *cmd), capture_output=True, text=True,
                              env={**self.env, **kw.pop("env", {})}, **kw)

    def stop(self) -> None:
        Cluster.stop(self)
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(os.path.join("/etc/netns", ns), ignore_errors=True)
        self.made = []
