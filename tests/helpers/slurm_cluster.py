"""A real single-node SLURM cluster for tests, from Debian's ``slurm-wlm`` and ``munge`` packages.

``start_cluster()`` installs the packages when they are missing (as root, with ``apt-get``, within
a time limit), starts a private ``munged`` (own socket; the key is ``/etc/munge/munge.key``),
writes a ``slurm.conf`` into a temporary directory (own ports, state and spool directories) and
starts ``slurmctld`` and ``slurmd`` in the foreground as children of this process, then waits
until ``sinfo`` shows the node idle. Whatever prevents that raises ``SlurmUnavailable`` with the
reason, for the caller to turn into a skip. ``SlurmCluster.stop()`` cancels the jobs and ends
exactly the daemons it started; nothing survives the test session. Recipe:
``slurm/README.md``.

Client commands must run with ``SlurmCluster.env`` (``SLURM_CONF`` points at the private
configuration; the ``SLURM_*``/``SBATCH_*`` variables of an enclosing job are removed).
Environment: ``SHINE_SLURM_INSTALL=0`` forbids the installation, ``SHINE_SLURM_INSTALL_TIMEOUT``
bounds it (seconds, default 180).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
MUNGE_KEY = Path("/etc/munge/munge.key")
PARTITION = "shinetest"
# job states after which a job never runs again (squeue -t all keeps them for MinJobAge seconds)
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (a skip reason)."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SBIN_PATH)


def _missing_commands() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS, "munge") if _which(name) is None]


def ensure_installed(timeout_s: float = 240.0) -> None:
    """Install ``slurm-wlm`` and ``munge`` with apt-get when a command is missing.

    Raises:
        SlurmUnavailable: not root, no apt-get, ``SHINE_SLURM_INSTALL=0``, or the installation
            failed or took longer than ``timeout_s`` (update and install together).
    """
    missing = _missing_commands()
    if not missing:
        return
    what = f"SLURM/munge commands missing ({', '.join(missing)})"
    if os.environ.get("SHINE_SLURM_INSTALL", "1") == "0":
        raise SlurmUnavailable(f"{what} and SHINE_SLURM_INSTALL=0 forbids installing them")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{what}; installing slurm-wlm and munge needs root")
    apt = _which("apt-get")
    if apt is None:
        raise SlurmUnavailable(f"{what} and there is no apt-get to install slurm-wlm and munge")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    deadline = time.monotonic() + timeout_s
    steps = [
        [apt, "-o", "DPkg::Lock::Timeout=60", "update", "-qq"],
        [
            apt,
            "-o",
            "DPkg::Lock::Timeout=60",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "slurm-wlm",
            "munge",
        ],
    ]
    for cmd in steps:
        left = deadline - time.monotonic()
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=max(left, 1.0)
            )
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(
                f"{what}; `{' '.join(cmd)}` did not finish within the {timeout_s:.0f} s allowed"
            ) from None
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip()[-1500:]
            raise SlurmUnavailable(f"{what}; `{' '.join(cmd)}` failed:\n{tail}")
    missing = _missing_commands()
    if missing:
        raise SlurmUnavailable(f"apt-get installed slurm-wlm and munge but {missing} are missing")


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(lines[-n:])


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` without the variables of an enclosing SLURM job, with sbin on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SUBMITIT_"))
    }
    env["PATH"] = env.get("PATH", "") + os.pathsep + SBIN_PATH
    env.update(extra or {})
    return env


@dataclass
class SlurmCluster:
    """A running single-node cluster; its client commands need ``env``.

    Attributes:
        root: private directory of the cluster (configuration, state, spool, logs, munge socket).
        conf: the ``slurm.conf`` (``SLURM_CONF`` in ``env``).
        node: the node name (this machine's short host name).
        partition: the default (and only) partition.
        env: environment for client commands and for commands that submit jobs.
    """

    root: Path
    conf: Path
    node: str
    partition: str
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(
        self, *cmd: str, timeout: float = 30.0, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        """Run a client command (``sinfo``, ``squeue``...) against this cluster."""
        proc = subprocess.run(
            list(cmd), env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def sbatch(
        self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> str:
        """Submit with ``sbatch --parsable ARGS`` and return the job id.

        ``env`` adds variables to the submission environment, which the job inherits.
        """
        cmd = ["sbatch", "--parsable", *args]
        proc = subprocess.run(
            cmd,
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def node_state(self) -> str | None:
        """The node's state in ``sinfo`` (``idle``, ``mixed``, ``completing``...) or None."""
        proc = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False, timeout=10)
        state = proc.stdout.strip().rstrip("*")
        return state if proc.returncode == 0 and state else None

    def job_state(self, job_id: str) -> str | None:
        """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``...), None once forgotten."""
        proc = self.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T", check=False)
        states = proc.stdout.split()
        return states[0] if proc.returncode == 0 and states else None

    def wait_job(self, job_id: str, timeout: float = 90.0, poll_s: float = 0.5) -> str:
        """Poll ``squeue`` until the job reaches a final state; return it (None: forgotten).

        Raises:
            TimeoutError: still not finished after ``timeout`` seconds (the job is cancelled).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state is None or state in FINAL_STATES:
                return state or "GONE"
            time.sleep(poll_s)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(
            f"job {job_id} not finished after {timeout:.0f} s\n{self.diagnostics()}"
        )

    def diagnostics(self) -> str:
        """Queue, node state and the tails of the daemon logs, for failure messages."""
        parts = []
        for cmd in (("squeue", "-t", "all"), ("sinfo", "-N", "-l")):
            try:
                proc = self.run(*cmd, check=False, timeout=10)
                parts.append(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
            except (OSError, subprocess.TimeoutExpired) as exc:
                parts.append(f"$ {' '.join(cmd)}: {exc}")
        for name in ("slurmctld.log", "slurmd.log"):
            parts.append(f"--- {name}\n{_tail(self.root / 'log' / name)}")
        return "\n".join(parts)

    def cancel_all(self, timeout: float = 20.0) -> None:
        """Cancel every job of the cluster and wait until none is running."""
        proc = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
        job_ids = proc.stdout.split()
        if not job_ids:
            return
        self.run("scancel", *job_ids, check=False, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel the jobs, end the daemons this object started and remove its directory."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            try:
                self.cancel_all()
            except (OSError, subprocess.TimeoutExpired):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.pop(name, None)
            if proc is not None:
                _terminate(proc)
        shutil.rmtree(self.root, ignore_errors=True)


def _terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _ensure_munge_key() -> None:
    """Create ``/etc/munge/munge.key`` (owned by munge, mode 0400) unless a usable one exists."""
    try:
        munge = pwd.getpwnam("munge")
    except KeyError:
        raise SlurmUnavailable("the munge package created no `munge` user") from None
    MUNGE_KEY.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(MUNGE_KEY.parent, munge.pw_uid, munge.pw_gid)
    if not MUNGE_KEY.exists() or MUNGE_KEY.stat().st_size < 32:
        fd = os.open(MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
    st = MUNGE_KEY.stat()
    if st.st_uid != munge.pw_uid or st.st_gid != munge.pw_gid:
        os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
    if st.st_mode & 0o077:
        # munged refuses a key that others can read
        os.chmod(MUNGE_KEY, 0o400)


def _node_line(node: str) -> str:
    """The ``NodeName`` line for this machine, from ``slurmd -C`` (CPUs, sockets, memory)."""
    proc = subprocess.run(
        [_which("slurmd") or "slurmd", "-C"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("NodeName=")), None)
    if line is None:
        cpus = os.cpu_count() or 1
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        line = f"NodeName={node} CPUs={cpus} RealMemory={mem_mb}"
    fields = [f for f in line.split() if not f.startswith(("NodeName=", "UpTime="))]
    return " ".join([f"NodeName={node}", "NodeAddr=127.0.0.1", *fields, "State=UNKNOWN"])


def _slurm_conf(root: Path, node: str, partition: str, munge_socket: Path) -> str:
    ctld_port, slurmd_port = _free_ports(2)
    return "\n".join(
        [
            "# written by tests/helpers/slurm_cluster.py: a private single-node test cluster",
            "ClusterName=shinetest",
            f"SlurmctldHost={node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            f"AuthInfo=socket={munge_socket}",
            "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SlurmUser=root",
            "SlurmdUser=root",
            "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            # kill a cancelled or requeued job 5 s after SIGTERM (default 30 s)
            "KillWait=5",
            # finished jobs stay visible to `squeue -t all` for 10 minutes (no sacct here)
            "MinJobAge=600",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            _node_line(node),
            f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _start(
    name: str, cmd: Sequence[str], root: Path, env: dict[str, str], **kwargs
) -> subprocess.Popen:
    log = open(root / "log" / f"{name}.stdout", "wb")
    try:
        return subprocess.Popen(
            list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root, **kwargs
        )
    except OSError as exc:
        raise SlurmUnavailable(f"cannot start {name}: {exc}") from None
    finally:
        log.close()


def _wait(
    what: str, ready, procs: dict[str, subprocess.Popen], root: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                logs = "\n".join(
                    f"--- {p.name}\n{_tail(p)}" for p in sorted((root / "log").glob(f"{name}*"))
                )
                raise SlurmUnavailable(f"{name} exited with {proc.returncode}:\n{logs}")
        if ready():
            return
        time.sleep(0.25)
    logs = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted((root / "log").iterdir()))
    raise SlurmUnavailable(f"{what} not reached within {timeout:.0f} s:\n{logs}")


def start_cluster(
    install_timeout_s: float | None = None, start_timeout_s: float = 60.0
) -> SlurmCluster:
    """Install SLURM if needed and start a private single-node cluster; see the module doc.

    Raises:
        SlurmUnavailable: SLURM cannot be installed or its daemons do not come up (the message
            is the reason); nothing that this call started is left running.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting SLURM and munge daemons needs root")
    if install_timeout_s is None:
        install_timeout_s = float(os.environ.get("SHINE_SLURM_INSTALL_TIMEOUT", "180"))
    ensure_installed(install_timeout_s)
    _ensure_munge_key()
    munge = pwd.getpwnam("munge")
    node = socket.gethostname().split(".")[0]
    # in /tmp, not in pytest's 0700 tree: the munge user must reach its socket directory
    root = Path(tempfile.mkdtemp(prefix="shine-slurm-", dir="/tmp"))
    root.chmod(0o755)
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir()
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755)
    os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
    munge_socket = munge_dir / "munge.socket"
    munge_log = root / "log" / "munged.log"
    munge_log.touch(mode=0o640)
    os.chown(munge_log, munge.pw_uid, munge.pw_gid)
    conf = root / "slurm.conf"
    env = clean_env({"SLURM_CONF": str(conf)})
    cluster = SlurmCluster(root=root, conf=conf, node=node, partition=PARTITION, env=env)
    try:
        conf.write_text(_slurm_conf(root, node, PARTITION, munge_socket))
        cluster.processes["munged"] = _start(
            "munged",
            [
                _which("munged") or "munged",
                "--foreground",
                f"--socket={munge_socket}",
                f"--key-file={MUNGE_KEY}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_log}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
            root,
            env,
            user=munge.pw_uid,
            group=munge.pw_gid,
            extra_groups=[],
        )

        def munge_works() -> bool:
            if not munge_socket.exists():
                return False
            cmd = [_which("munge") or "munge", "-n", f"--socket={munge_socket}"]
            return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0

        _wait("a working munged", munge_works, cluster.processes, root, start_timeout_s)
        cluster.processes["slurmctld"] = _start(
            "slurmctld",
            [_which("slurmctld") or "slurmctld", "-D", "-i", "-f", str(conf)],
            root,
            env,
        )
        cluster.processes["slurmd"] = _start(
            "slurmd",
            [_which("slurmd") or "slurmd", "-D", "-f", str(conf), "-N", node],
            root,
            env,
        )

        _wait(
            f"node {node} idle in `sinfo`",
            lambda: cluster.node_state() == "idle",
            cluster.processes,
            root,
            start_timeout_s,
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster
