"""A real SLURM cluster on this machine, brought up and torn down by the tests themselves.

Debian's slurm-wlm 22.05 is built with MULTIPLE_SLURMD, so one host runs slurmctld plus one slurmd per
emulated node (``n1``, ``n2``, ... each on its own port). Everything lives in a fresh state directory
under /tmp: its own munge key and munged, a generated slurm.conf, pid/log/spool/TmpFS dirs. The
daemons are started directly (no systemd) and stopped by their pid files. How the tests use it:
docs/testing.md. Needs root (apt install, daemons running as root).

Use either the context manager or the session fixture::

    with local_slurm_cluster(num_nodes=2) as cluster:
        job_id, rc = cluster.sbatch(["launch/slurm_per_task.sbatch", "--train.steps", "2"], wait=True)

    def test_x(slurm_cluster):          # from cluster.slurm import slurm_cluster
        slurm_cluster.run(["sinfo"])

For manual experiments: ``python tests/cluster/slurm.py -- bash`` runs a command (a shell) with
SLURM_CONF pointing at a fresh 2-node cluster, and tears it down when the command exits.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

INSTALL_SCRIPT = Path(__file__).with_name("install_slurm.sh")
REQUIRED_BINARIES = ("slurmctld", "slurmd", "sinfo", "sbatch", "munged", "mungekey")
SKIP_ENV_VAR = "HYPERP_SKIP_SLURM"
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE")

SLURM_CONF_TEMPLATE = """\
ClusterName=hyperp-test
# "localhost" is special-cased (ControlAddr=localhost), so it needs no /etc/hosts entry.
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job is held (BeginTime) for 11 s instead of 121 s.
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
# Per-node TmpFS: PMIx steps of two slurmd on one host otherwise collide in /tmp.
TmpFS={root}/tmpfs/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
# No cgroups here: the cgroup plugins make every step fail with "Plugin initialization failed".
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
# The emulated nodes claim more than the host has; config_overrides keeps them from being drained.
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
{gres_types}
"""

NODE_TEMPLATE = (
    "NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} Sockets=1 "
    "CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={memory_mb}"
)


class SlurmUnavailable(RuntimeError):
    """The local cluster could not be installed or brought up (the message says why)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_master_port(low: int = 22000, high: int = 32000) -> int:
    """A free port for a job's MASTER_PORT that stays ours across its requeued runs: below Linux's ephemeral
    range (so no outgoing connection takes it meanwhile) and random. The scripts' defaults derive it from the
    job id, and every test cluster numbers its jobs from 1: two test sessions on one machine would collide."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in [{low}, {high})")


@dataclass(frozen=True)
class SlurmCluster:
    """Handle on a running local cluster: run clients against it, submit and inspect jobs."""

    root: Path
    conf_path: Path
    node_names: tuple[str, ...]

    @property
    def env(self) -> dict[str, str]:
        """This process's environment plus SLURM_CONF (sbatch forwards it into the jobs)."""
        return {**os.environ, "SLURM_CONF": str(self.conf_path)}

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float = 60, env=None, **kwargs):
        """Run a command with SLURM_CONF set; returns the CompletedProcess (text, captured)."""
        return subprocess.run(
            list(args), env={**self.env, **(env or {})}, check=check, timeout=timeout,
            capture_output=True, text=True, **kwargs,
        )

    def sbatch(self, command: Sequence[str] = (), *, sbatch_args: Sequence[str] = (), wait=False,
               env=None, cwd=None, timeout: float = 180) -> tuple[int, int]:
        """Submit ``command`` (script and its arguments; empty with ``--wrap=...`` in ``sbatch_args``).

        Returns (job id, sbatch's exit code: with wait=True the job's). ``sbatch --wait`` polls the job
        2, 10 and 42 s after submitting (measured): for quick jobs :meth:`wait_for_job` is sooner.
        """
        cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *sbatch_args, *map(str, command)]
        proc = self.run(cmd, check=False, timeout=timeout, env=env, cwd=cwd)
        first_line = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
        if not first_line.split(";")[0].isdigit():
            raise RuntimeError(f"sbatch failed (rc {proc.returncode}): {proc.stdout}\n{proc.stderr}")
        return int(first_line.split(";")[0]), proc.returncode

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def describe(self) -> str:
        """Node and queue state plus the daemons' log tails, for test failure messages."""
        parts = [self.run(cmd, check=False).stdout for cmd in (["sinfo", "-N", "-l"], ["squeue", "-l"])]
        return "\n".join(parts) + _log_tails(self.root)

    def wait_for_restart(self, job_id: int, restarts: int, log: Path, *, timeout: float = 300) -> dict:
        """Wait until the job's ``restarts``-th requeued run has really started: ``Restarts>=restarts`` and
        RUNNING, or the launch scripts' "job J restart R on" line in ``log`` (a run too short to be seen
        RUNNING). Fails at once when the job ends before that (a refused launch, a requeue that failed).

        A requeued job is held (``Reason=BeginTime``) for cred_expire + 1 s: slurmd refuses a launch credential
        no newer than its revocation of the previous run's, and slurmctld then ends the job FAILED
        (``ExitCode=1:0``, "Killing non-startable batch job: Job credential revoked"). So never skip the hold
        with ``scontrol update StartTime=now``.
        """
        deadline = time.monotonic() + timeout
        started_line = f"job {job_id} restart {restarts} on"
        while True:
            info = self.job_info(job_id)
            if int(info.get("Restarts", 0)) >= restarts and info.get("JobState") == "RUNNING":
                return info
            if log.exists() and started_line in log.read_text():
                return info
            if info.get("JobState") in TERMINAL_STATES:
                raise AssertionError(f"job {job_id} ended before restart {restarts} ran: {info}\n"
                                     f"{log.read_text()[-3000:] if log.exists() else ''}\n{self.describe()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: restart {restarts} not running after {timeout} s: {info}")
            time.sleep(0.5)

    def wait_for_job(self, job_id: int, states: Sequence[str], *, timeout: float = 60, **where) -> dict:
        """Poll until the job is in one of ``states`` (and every ``Key=value`` in ``where`` holds)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") in states and all(info.get(k) == str(v) for k, v in where.items()):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {states} {where} after {timeout} s: {info}")
            time.sleep(0.5)


def _require_root_and_packages() -> None:
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM binaries {missing} missing and not root to install them")
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600)
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if proc.returncode != 0 or missing:
        raise SlurmUnavailable(
            f"{INSTALL_SCRIPT} failed (rc {proc.returncode}, still missing {missing}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )


def _ensure_node_names_resolve(node_names: Sequence[str]) -> None:
    """Emulated node names do not resolve; anything building MASTER_ADDR from the node list needs them."""
    unresolved = []
    for name in node_names:
        try:
            socket.gethostbyname(name)
        except OSError:
            unresolved.append(name)
    if unresolved:
        with open("/etc/hosts", "a+") as hosts:
            hosts.seek(0)
            if not hosts.read().endswith("\n"):
                hosts.write("\n")
            hosts.write(f"127.0.0.1 {' '.join(unresolved)}  # hyperp tests/cluster/slurm.py\n")


def _make_fake_gpus(root: Path, gpus_per_node: int) -> str:
    """Character devices cloning /dev/null: Slurm drops count-only and regular-file GPUs (and drains the
    node). Needs CAP_MKNOD. Returns the gres.conf text; jobs then get CUDA_VISIBLE_DEVICES."""
    (root / "dev").mkdir()
    for index in range(gpus_per_node):
        os.mknod(root / "dev" / f"nvidia{index}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return f"AutoDetect=off\nName=gpu File={root}/dev/nvidia[0-{gpus_per_node - 1}]\n"


def _write_config(root: Path, node_names: Sequence[str], cpus_per_node: int, memory_mb: int,
                  gpus_per_node: int) -> Path:
    gres = f" Gres=gpu:{gpus_per_node}" if gpus_per_node else ""
    nodes = "\n".join(
        NODE_TEMPLATE.format(name=name, port=free_port(), cpus=cpus_per_node, memory_mb=memory_mb) + gres
        for name in node_names
    )
    if gpus_per_node:
        (root / "etc" / "gres.conf").write_text(_make_fake_gpus(root, gpus_per_node))
    conf = root / "etc" / "slurm.conf"
    conf.write_text(SLURM_CONF_TEMPLATE.format(root=root, ctld_port=free_port(), nodes=nodes,
                                               gres_types="GresTypes=gpu" if gpus_per_node else ""))
    return conf


def _start_munge(root: Path) -> None:
    munge = root / "munge"
    munge.chmod(0o755)  # munged refuses a socket dir without execute permission for all
    key = munge / "munge.key"
    subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
    key.chmod(0o400)  # ... and a key readable by group/other
    subprocess.run(
        ["munged", f"--key-file={key}", f"--socket={munge / 'munge.socket'}",
         f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
         f"--seed-file={munge / 'munged.seed'}"],
        check=True, capture_output=True,
    )


def _log_tails(root: Path, num_chars: int = 1500) -> str:
    logs = sorted((root / "log").glob("*.log")) + [root / "munge" / "munged.log"]
    return "\n".join(f"--- {log}\n{log.read_text()[-num_chars:]}" for log in logs if log.exists())


def _wait_until_idle(cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        proc = cluster.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
        states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
        if all(states.get(name) == "idle" for name in cluster.node_names):
            return
        time.sleep(0.3)
    raise SlurmUnavailable(f"nodes not idle after {timeout} s: {states}\n{_log_tails(cluster.root)}")


def _bring_up(root: Path, node_names: Sequence[str], cpus_per_node: int, memory_mb: int,
              gpus_per_node: int) -> SlurmCluster:
    for sub in ("etc", "state", "run", "log", "munge"):
        (root / sub).mkdir(parents=True)
    for name in node_names:  # created up front: slurmd does not create its spool dir
        (root / "spool" / name).mkdir(parents=True)
        (root / "tmpfs" / name).mkdir(parents=True)
    cluster = SlurmCluster(root=root, conf_path=root / "etc" / "slurm.conf", node_names=tuple(node_names))
    try:
        conf = _write_config(root, node_names, cpus_per_node, memory_mb, gpus_per_node)
        _start_munge(root)
        cluster.run(["slurmctld", "-f", str(conf)])  # daemonizes once it has written its pid file
        for name in node_names:
            # Always name the node: without -N, slurmd picks the first node that resolves to this
            # host and kills the slurmd already serving it.
            cluster.run(["slurmd", "-f", str(conf), "-N", name])
    except subprocess.CalledProcessError as exc:
        raise SlurmUnavailable(f"{exc.cmd} failed: {exc.stderr}\n{_log_tails(root)}") from exc
    except OSError as exc:  # e.g. mknod without CAP_MKNOD
        raise SlurmUnavailable(f"cannot set up {root}: {exc}") from exc
    _wait_until_idle(cluster, timeout=30)
    return cluster


def _is_gone(pid: int) -> bool:
    """Dead or a zombie: the double-forked daemons are reaped by PID 1 only a few seconds later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _stop_daemon(pid_file: Path, timeout: float = 15) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while not _is_gone(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.1)


def _tear_down(cluster: SlurmCluster) -> None:
    root = cluster.root
    if cluster.conf_path.exists() and (root / "run" / "slurmctld.pid").exists():
        cluster.run(["scancel", "--user=root"], check=False, timeout=30)
        deadline = time.monotonic() + 30  # KillWait=10: tasks ignoring SIGTERM get SIGKILL after 10 s
        while time.monotonic() < deadline:
            proc = cluster.run(["squeue", "-h"], check=False, timeout=10)
            if proc.returncode != 0 or not proc.stdout.strip():
                break
            time.sleep(0.5)
    # slurmd before slurmctld (which takes its child slurmscriptd along); munged last.
    for pid_file in sorted((root / "run").glob("slurmd-*.pid")):
        _stop_daemon(pid_file)
    _stop_daemon(root / "run" / "slurmctld.pid")
    _stop_daemon(root / "munge" / "munged.pid")
    shutil.rmtree(root, ignore_errors=True)


def _raise_keyboard_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM (``timeout``, a CI runner giving up) into KeyboardInterrupt while the cluster is up:
    with the default action the process dies without tearing down and leaves the daemons running.
    pytest runs fixture teardown after a KeyboardInterrupt."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or \
            previous not in (signal.SIG_DFL, _raise_keyboard_interrupt):
        yield  # someone else handles SIGTERM (or signals cannot be set from this thread)
        return
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def local_slurm_cluster(num_nodes: int = 2, cpus_per_node: int = 2, memory_mb: int = 4096,
                        gpus_per_node: int = 0, set_environ: bool = True) -> Iterator[SlurmCluster]:
    """Bring up slurmctld + ``num_nodes`` slurmd (n1, n2, ...), yield once all are idle, tear down.

    ``gpus_per_node`` > 0 gives every node that many fake GPUs (``--gpus-per-node`` works, jobs see
    CUDA_VISIBLE_DEVICES; nothing can run on them).

    Raises :class:`SlurmUnavailable` if the packages cannot be installed or the daemons do not come up.
    With ``set_environ`` SLURM_CONF is exported to this process (and its children) while it runs.
    """
    _require_root_and_packages()
    node_names = [f"n{i + 1}" for i in range(num_nodes)]
    _ensure_node_names_resolve(node_names)
    root = Path(tempfile.mkdtemp(prefix="hyperp-slurm-", dir="/tmp"))
    root.chmod(0o755)  # mkdtemp makes it 0700; munged wants execute permission for all on the socket path
    cluster = SlurmCluster(root=root, conf_path=root / "etc" / "slurm.conf", node_names=tuple(node_names))
    saved_conf = os.environ.get("SLURM_CONF")
    with _sigterm_interrupts():
        try:
            cluster = _bring_up(root, node_names, cpus_per_node, memory_mb, gpus_per_node)
            if set_environ:
                os.environ["SLURM_CONF"] = str(cluster.conf_path)
            yield cluster
        finally:
            if set_environ:
                if saved_conf is None:
                    os.environ.pop("SLURM_CONF", None)
                else:
                    os.environ["SLURM_CONF"] = saved_conf
            _tear_down(cluster)


try:
    import pytest
except ImportError:  # the context manager works without pytest
    pytest = None

def _cluster_or_fail(**cluster_kwargs) -> Iterator[SlurmCluster]:
    """Fixture body: a cluster, or a clear failure (a skip with HYPERP_SKIP_SLURM=1) when there is none."""
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(local_slurm_cluster(**cluster_kwargs))
            reason = ""
        except SlurmUnavailable as exc:
            reason = f"local SLURM cluster unavailable: {exc}"
        if reason and os.environ.get(SKIP_ENV_VAR) == "1":
            pytest.skip(f"{reason} ({SKIP_ENV_VAR}=1)")
        if reason:
            pytest.fail(f"{reason}\n(set {SKIP_ENV_VAR}=1 to skip the SLURM tests instead)", pytrace=False)
        yield cluster


if pytest is not None:

    @pytest.fixture(scope="session")
    def slurm_cluster() -> Iterator[SlurmCluster]:
        """2 nodes x 2 CPUs for the whole session, SLURM_CONF exported. Fails (never silently skips) when
        SLURM cannot be brought up, unless HYPERP_SKIP_SLURM=1, which turns that failure into a skip."""
        yield from _cluster_or_fail(num_nodes=2)

    @pytest.fixture(scope="module")
    def slurm_gpu_cluster() -> Iterator[SlurmCluster]:
        """Like ``slurm_cluster`` plus 2 fake GPUs per node (needs CAP_MKNOD); SLURM_CONF not exported,
        use ``cluster.env``/``cluster.run``."""
        yield from _cluster_or_fail(num_nodes=2, gpus_per_node=2, set_environ=False)


def main(argv: Sequence[str]) -> int:
    """``python tests/cluster/slurm.py [--gpus K] [-- CMD ...]``: run CMD (default: sinfo) in a fresh cluster."""
    options, command = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    gpus_per_node = int(options[options.index("--gpus") + 1]) if "--gpus" in options else 0
    with local_slurm_cluster(gpus_per_node=gpus_per_node) as cluster:
        print(f"SLURM_CONF={cluster.conf_path}", file=sys.stderr)
        return subprocess.run(command or ["sinfo"], env=cluster.env).returncode


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the cluster is already torn down
        sys.exit(130)
