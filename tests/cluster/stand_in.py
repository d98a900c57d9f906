"""Stand-in for ``python -m hyperp_megatron.train`` in launcher tests: same arguments, same rank discovery.

    python tests/cluster/stand_in.py --config configs/tiny.yaml --logging.run_dir DIR [--a.b value ...]

Finds rank / world size / master the way the trainer does, in this order:
  1. torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
  2. an MPI launcher (mpiexec, or srun --mpi=pmi2/pmix): PMI_RANK / OMPI_COMM_WORLD_RANK / PMIX_RANK set;
     rank and size from mpi4py's COMM_WORLD, master address and port broadcast from rank 0. Checked
     before SLURM: under mpiexec inside an allocation, hydra's proxies are srun tasks, so
     SLURM_PROCID is the node index, not the rank;
  3. a SLURM step (SLURM_STEP_ID set, i.e. under srun; the batch step alone also has SLURM_PROCID=0):
     SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; master = first host of
     ``scontrol show hostnames $SLURM_JOB_NODELIST``; port = MASTER_PORT or derived from SLURM_JOB_ID.
Then it initializes gloo, all-reduces ``rank + 1`` and writes ``<run_dir>/rank<R>-run<RESTART>.json``
with what it found. Knobs (read here only): ``--stand_in.hold_s S`` keeps it alive S seconds after
the all-reduce so tests can signal it; ``--stand_in.exit_code_on_signal C`` is its exit code after a
SIGTERM/SIGUSR1, whose handler writes ``<run_dir>/signal-rank<R>-run<RESTART>.txt``;
``--stand_in.exit_code C`` is its exit code otherwise; ``--stand_in.exit_early C`` exits with C before
importing torch (a quick job for exit-code tests); ``--stand_in.marker_in_run R``: after a signal in run
(SLURM restart) R, rank 0 leaves the trainer's preemption marker ``<run_dir>/preempted.json`` (step 0).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv: list[str]) -> dict[str, str]:
    """``--config X --a.b v ...`` -> {"config": X, "a.b": v}; the trainer's argument shape."""
    if len(argv) % 2:
        raise ValueError(f"expected --key value pairs, got {argv}")
    pairs = dict(zip(argv[::2], argv[1::2]))
    if not all(key.startswith("--") for key in pairs):
        raise ValueError(f"expected --key value pairs, got {argv}")
    return {key[2:]: value for key, value in pairs.items()}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def discover() -> dict:
    """Rank, world size, local rank, master address/port and which launcher provided them."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return dict(source="torchrun", rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                    local_rank=int(env.get("LOCAL_RANK", 0)), master_addr=env["MASTER_ADDR"],
                    master_port=int(env["MASTER_PORT"]))
    if any(var in env for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        master = (socket.gethostname(), free_port()) if comm.Get_rank() == 0 else None
        master_addr, master_port = comm.bcast(master, root=0)
        return dict(source="mpi", rank=comm.Get_rank(), world_size=comm.Get_size(), local_rank=local_rank,
                    master_addr=master_addr, master_port=master_port)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                               check=True, capture_output=True, text=True).stdout.split()
        port = int(env.get("MASTER_PORT", 20000 + int(env["SLURM_JOB_ID"]) % 20000))
        return dict(source="slurm", rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                    local_rank=int(env["SLURM_LOCALID"]), master_addr=hosts[0], master_port=port)
    return dict(source="single", rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                master_port=free_port())


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    run_dir = Path(args.get("logging.run_dir", "runs/stand_in"))
    run_dir.mkdir(parents=True, exist_ok=True)
    hold_s = float(args.get("stand_in.hold_s", 0))
    exit_code_on_signal = int(args.get("stand_in.exit_code_on_signal", 0))
    exit_code = int(args.get("stand_in.exit_code", 0))
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    found = discover()
    if "stand_in.exit_early" in args:
        return int(args["stand_in.exit_early"])
    tag = f"rank{found['rank']}-run{restart}"

    signalled = []

    def on_signal(signum, _frame):
        (run_dir / f"signal-{tag}.txt").write_text(f"{signal.Signals(signum).name} pid={os.getpid()}\n")
        signalled.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{found['master_addr']}:{found['master_port']}",
                            rank=found["rank"], world_size=found["world_size"])
    value = torch.tensor([float(found["rank"] + 1)])
    dist.all_reduce(value)
    dist.destroy_process_group()

    result = dict(found, allreduce=value.item(), argv=argv, args=args, restart_count=restart,
                  job_id=os.environ.get("SLURM_JOB_ID"), node=os.environ.get("SLURMD_NODENAME"),
                  hostname=socket.gethostname(), pid=os.getpid(),
                  cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    (run_dir / f"{tag}.json").write_text(json.dumps(result, indent=1))
    print(f"stand_in {tag}: {found['source']} rank {found['rank']}/{found['world_size']} "
          f"allreduce={value.item()}", flush=True)

    deadline = time.monotonic() + hold_s
    while not signalled and time.monotonic() < deadline:
        time.sleep(0.1)
    if signalled and found["rank"] == 0 and args.get("stand_in.marker_in_run") == str(restart):
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (not installed)
        from hyperp_megatron import requeue

        requeue.write_marker(run_dir, 0, "none (stand-in)", signal.Signals(signalled[0]).name,
                             requeue.slurm_run_id(os.environ))
    return exit_code_on_signal if signalled else exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
