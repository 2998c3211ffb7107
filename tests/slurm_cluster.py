"""A real SLURM cluster on this machine for the tests: munged, slurmctld and two slurmd (nodes n1
and n2, both this host, one partition) with a private slurm.conf and munge key in a directory.

Every daemon runs in the foreground as a child of the test process: stopping it is a signal to a
pid this module started, and it gets SIGTERM by itself if the test process dies.
"""

import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = ("n1", "n2")
PARTITION = "cpu"
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
SBIN = ("/usr/sbin", "/sbin")  # the daemons' directories, often not on a user's PATH
HOSTS = Path("/etc/hosts")
CRED_EXPIRE_S = 5
"""Job credential lifetime; SLURM holds a requeued job for this + 1 s (default 120 s)."""
SCHED_INTERVAL_S = 1
"""Between full passes of the scheduler (default 60 s), which start a requeued job once it is
no longer held (nothing else wakes the scheduler then)."""
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60


def which(command: str) -> str | None:
    return shutil.which(command, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def resolvable(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def unavailable() -> str | None:
    """Why no cluster can be started here, or None."""
    missing = [command for command in COMMANDS if which(command) is None]
    if missing:
        return (
            f"SLURM is not installed ({', '.join(missing)} not found): as root, "
            f"`apt-get install slurm-wlm munge` (scripts/setup.sh does it)"
        )
    if os.geteuid() != 0 and not all(map(resolvable, NODES)):
        return f"the test nodes {' and '.join(NODES)} do not resolve: add `127.0.0.1 {' '.join(NODES)}` to {HOSTS}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class SlurmCluster:
    """``start()`` it, run SLURM commands against it with ``env`` (or ``command``), ``stop()`` it."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons: list[tuple[str, subprocess.Popen]] = []

    def start(self) -> None:
        self._add_nodes_to_hosts()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        socket_path = self.root / "munge.socket"
        self._start(
            "munged",
            "munged",
            "--foreground",
            "--force",
            f"--socket={socket_path}",
            f"--key-file={key}",
            f"--pid-file={self.root / 'munged.pid'}",
            f"--seed-file={self.root / 'munged.seed'}",
        )
        self._wait("munged to listen", socket_path.exists)
        self.conf.write_text(self._slurm_conf(socket_path))
        self._start("slurmctld", "slurmctld", "-D", "-f", str(self.conf))
        for node in NODES:
            (self.root / node).mkdir()  # its spool directory
            self._start(f"slurmd-{node}", "slurmd", "-D", "-N", node, "-f", str(self.conf))
        self._wait(
            f"nodes {', '.join(NODES)} to be idle",
            lambda: (
                self.command("sinfo", "--noheader", "--Node", "--format=%N %T", check=False).split()
                == [NODES[0], "idle", NODES[1], "idle"]
            ),
        )

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then stop the daemons, last started first."""
        try:
            if any(name == "slurmctld" and process.poll() is None for name, process in self.daemons):
                jobs = self.command("squeue", "--noheader", "--format=%i", check=False).split()
                if jobs:
                    self.command("scancel", *jobs, check=False)
                    self.wait_until_no_jobs(STOP_TIMEOUT_S)
        finally:
            for _, process in reversed(self.daemons):
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def command(self, *argv: str, check: bool = True) -> str:
        """A SLURM client command's standard output."""
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def jobs(self, job_id: str = "") -> list[dict[str, str]]:
        """``scontrol show job``'s fields (JobName, JobState, Restarts, StartTime, ...) of the jobs
        slurmctld still knows (finished ones for MinJobAge, 5 minutes), in submission order."""
        lines = self.command("scontrol", "--oneliner", "show", "job", *([job_id] if job_id else [])).splitlines()
        jobs = [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in lines]
        return sorted(jobs, key=lambda job: int(job["JobId"]))

    def job(self, job_id: str) -> dict[str, str]:
        return self.jobs(job_id)[0]

    def wait_until_no_jobs(self, timeout_s: float) -> None:
        self._wait("every job to end", lambda: not self.command("squeue", "--noheader", check=False).strip(), timeout_s)

    def logs(self) -> str:
        """The tail of every daemon's log and output, for failure messages."""
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}"
            for path in sorted([*self.root.glob("*.log"), *self.root.glob("*.out")])
        )

    def _start(self, name: str, command: str, *argv: str) -> None:
        """Start a daemon in the foreground; what it prints goes to <root>/<name>.out."""
        with open(self.root / f"{name}.out", "ab") as log:
            self.daemons.append(
                (
                    name,
                    subprocess.Popen(
                        [which(command), *argv],
                        env=self.env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        preexec_fn=_die_with_parent,
                    ),
                )
            )

    def _wait(self, what: str, ready, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [name for name, process in self.daemons if process.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"test SLURM cluster: gave up waiting for {what}"
                    f"{' (' + ', '.join(dead) + ' exited)' if dead else ''}\n{self.logs()}"
                )
            time.sleep(0.2)

    def _slurm_conf(self, munge_socket: Path) -> str:
        # The hardware slurmd sees (CPUs, RealMemory, ...), claimed by both nodes: they share it.
        probe = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        hardware = " ".join(word for word in probe.split() if not word.startswith(("NodeName=", "UpTime=")))
        user = getpass.getuser()
        root = self.root
        nodes = "\n".join(
            f"NodeName={node} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={free_port()} {hardware}"
            for node in NODES
        )
        return f"""\
ClusterName=bigpt-tests
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={root}/slurmctld.log
# Two slurmd on one host: each node its own spool, pid and log (%n = node name).
SlurmdSpoolDir={root}/%n
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdLogFile={root}/slurmd-%n.log
# No cgroups needed: processes tracked by parent pid, no CPU binding, memory not a resource.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval={SCHED_INTERVAL_S}
# A job whose dependency failed is cancelled, not left pending for ever (chained curation jobs).
DependencyParameters=kill_invalid_depend
{nodes}
PartitionName={PARTITION} Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""

    @staticmethod
    def _add_nodes_to_hosts() -> None:
        """The nodes' names must resolve (job scripts and torchrun's rendezvous use them)."""
        if not all(map(resolvable, NODES)):
            with HOSTS.open("a") as hosts:
                hosts.write(f"127.0.0.1 {' '.join(NODES)}  # bigpt tests: SLURM nodes on this machine\n")
