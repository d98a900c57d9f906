"""Distributed bootstrap: who am I (torchrun, SLURM or MPI), the device, the process group, Megatron's
parallel state, and the explicit collection of process groups that library code receives.

The device is decided here, once (:func:`decide_device`), beside the process group whose collectives
need it (NCCL reduces CUDA tensors only, gloo CPU tensors), and passed as a ``torch.device`` to
everything that creates tensors or moves batches. This module and ``compat/`` are the only places that
ask whether CUDA is there; :func:`process_group_device` recovers the decision from an initialized
process group for callers that set one up themselves (tests, tools).

Library code never reads ``os.environ``: the entry point passes the environment mapping in.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
import subprocess
from collections.abc import Mapping

import torch
import torch.distributed as dist

from hyperp_megatron.config import ParallelConfig
from hyperp_megatron.hardware import GpuInfo


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, and how to reach rank 0."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm", "mpi" or "single"


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list (``n[1-4],m2`` -> ``n1``), via scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def _port_from_job(job_id: str) -> int:
    """A port every task of one SLURM job derives identically (10000-19999)."""
    return 10000 + int(hashlib.sha1(job_id.encode()).hexdigest(), 16) % 10000


def _mpi_env(environ: Mapping[str, str]) -> LaunchEnv:
    from mpi4py import MPI  # imported only under an MPI launcher

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr = comm.bcast(environ.get("MASTER_ADDR") or MPI.Get_processor_name() if rank == 0 else None, root=0)
    port = comm.bcast(_port(environ, None) or _free_port() if rank == 0 else None, root=0)
    return LaunchEnv(rank, size, local.Get_rank(), local.Get_size(), addr, port, "mpi")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None, minimum: int = 0) -> int:
    """``environ[name]`` as an integer >= ``minimum`` (``default`` when unset); ValueError (one line) otherwise."""
    value = environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"{name} is not set (the launcher sets it)")
        return default
    if not re.fullmatch(r"\s*[+-]?\d+\s*", value) or int(value) < minimum:
        raise ValueError(f"{name}={value!r} is not an integer >= {minimum}: check the launcher's environment")
    return int(value)


def _port(environ: Mapping[str, str], default: int | None) -> int | None:
    """MASTER_PORT (1-65535; empty or unset: ``default``)."""
    if not environ.get("MASTER_PORT", "").strip():
        return default
    port = _env_int(environ, "MASTER_PORT", minimum=1)
    if port > 65535:
        raise ValueError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return port


def _tasks_on_first_node(value: str) -> int:
    """SLURM's tasks-per-node list (``2(x3),1``): the first node's count."""
    first = value.split(",")[0].split("(")[0]
    if not re.fullmatch(r"\d+(\(x\d+\))?(,\d+(\(x\d+\))?)*", value.strip()) or int(first) < 1:
        raise ValueError(f"SLURM_TASKS_PER_NODE={value!r} is not a SLURM task count list such as '4' or '2(x3),1'")
    return int(first)


def _check_ranks(env: LaunchEnv, names: tuple[str, str, str, str], local: bool = True) -> LaunchEnv:
    """Rank < world size and (``local``) local rank < local world size: a mismatch would wait for ranks that
    never come (for parallel.timeout_minutes) instead of failing."""
    rank, world, local_rank, local_world = names
    if env.rank >= env.world_size:
        raise ValueError(f"{rank}={env.rank} is not below {world}={env.world_size}: check the launcher's environment")
    if not local:
        return env
    if env.local_rank >= env.local_world_size:
        raise ValueError(f"{local_rank}={env.local_rank} is not below {local_world}={env.local_world_size}: check the "
                         "launcher's environment")
    if env.local_world_size > env.world_size:
        raise ValueError(f"{local_world}={env.local_world_size} exceeds {world}={env.world_size}")
    return env


def discover_launch_env(environ: Mapping[str, str]) -> LaunchEnv:
    """Rank, world size and master address from torchrun, SLURM (srun tasks) or MPI variables; ValueError (one
    line) for a variable that is not a valid number or ranks that do not fit the world size."""
    if "RANK" in environ and "WORLD_SIZE" in environ:  # torchrun (also torchrun under SLURM)
        env = LaunchEnv(
            rank=_env_int(environ, "RANK"), world_size=_env_int(environ, "WORLD_SIZE", minimum=1),
            local_rank=_env_int(environ, "LOCAL_RANK", 0),
            local_world_size=_env_int(environ, "LOCAL_WORLD_SIZE", 1, minimum=1),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_port(environ, 29500), launcher="torchrun",
        )
        return _check_ranks(env, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    # MPI before SLURM: mpiexec inside an allocation starts its proxies with srun, so SLURM_PROCID is
    # the proxy's, not the rank's. Under srun --mpi=pmi2/pmix both agree.
    mpi_markers = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")
    if any(key in environ for key in mpi_markers):
        return _mpi_env(environ)
    # SLURM_STEP_ID: only a task started by srun is a rank (the batch script itself has SLURM_PROCID=0).
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ and _env_int(environ, "SLURM_NTASKS", 1, 1) > 1:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "localhost")
        tasks_per_node = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "1")
        env = LaunchEnv(
            rank=_env_int(environ, "SLURM_PROCID"), world_size=_env_int(environ, "SLURM_NTASKS", minimum=1),
            local_rank=_env_int(environ, "SLURM_LOCALID", 0),
            local_world_size=_tasks_on_first_node(tasks_per_node),
            master_addr=environ.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            master_port=_port(environ, None) or _port_from_job(environ.get("SLURM_JOB_ID", "0")),
            launcher="slurm",
        )
        # Local ranks are not checked: the tasks per node may differ from node to node ('2,1').
        return _check_ranks(env, ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_TASKS_PER_NODE"), local=False)
    return LaunchEnv(0, 1, 0, 1, "127.0.0.1", _port(environ, None) or _free_port(), "single")


def decide_device(cfg: ParallelConfig, local_rank: int) -> torch.device:
    """The device of this process: ``cuda:<local_rank % visible GPUs>`` for NCCL, the CPU for gloo.

    ``parallel.backend`` 'auto' means NCCL when CUDA is available. The modulo covers launchers that
    give each task only its own GPU (SLURM ``--gpus-per-task``: one visible device, local rank up to 7).
    """
    has_cuda = torch.cuda.is_available()
    if cfg.backend == "nccl" and not has_cuda:
        raise ValueError("parallel.backend is 'nccl' but CUDA is unavailable on this machine; "
                         "use 'auto' or 'gloo' to train on the CPU")
    if cfg.backend == "gloo" or not has_cuda:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def backend_for(device: torch.device) -> str:
    """The collective backend for tensors on ``device``."""
    return "nccl" if device.type == "cuda" else "gloo"


def describe_gpu(device: torch.device) -> GpuInfo | None:
    """Name, memory and compute capability of ``device`` (None for the CPU): what MFU and the memory check use."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return GpuInfo(props.name, props.total_memory / 2**30, (props.major, props.minor))


def visible_gpus() -> list[GpuInfo]:
    """Every GPU this process sees (empty without CUDA): for the tools that report on the machine."""
    if not torch.cuda.is_available():
        return []
    return [describe_gpu(torch.device("cuda", index)) for index in range(torch.cuda.device_count())]


def process_group_device() -> torch.device:
    """The device of an initialized process group: the current CUDA device under NCCL, else the CPU.

    For callers that initialized torch.distributed themselves; :func:`init_process_group` returns it."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(env: LaunchEnv, cfg: ParallelConfig, device: torch.device | None = None) -> torch.device:
    """Initialize torch.distributed for ``device`` (decided from ``cfg`` when None): NCCL with
    ``cuda:<n>`` made the current device, gloo on the CPU. Returns the device."""
    device = decide_device(cfg, env.local_rank) if device is None else torch.device(device)
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    return device


def init_model_parallel(cfg: ParallelConfig, seed: int, device: torch.device | None = None):
    """Megatron parallel state for TP/PP/EP/DP; returns the ProcessGroupCollection library code receives.

    Applies the megatron-core compatibility patches ``device`` needs first (:mod:`hyperp_megatron.compat`;
    idempotent). ``device`` defaults to the initialized process group's (:func:`process_group_device`).
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from hyperp_megatron.compat import apply_patches

    device = process_group_device() if device is None else torch.device(device)
    apply_patches(device)

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor,
            pipeline_model_parallel_size=cfg.pipeline,
            expert_model_parallel_size=cfg.expert,
            expert_tensor_parallel_size=cfg.expert_tensor_size,
            distributed_timeout_minutes=cfg.timeout_minutes,
            create_gloo_process_groups=device.type != "cuda",
        )
    # Seeds Megatron's RNG tracker (CUDA generators; on the CPU, through compat, the CPU generator).
    model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def layout_key(pg_collection, device: torch.device) -> dict:
    """What per-rank state (RNG streams) depends on: the parallel layout and the device type.

    A checkpoint's per-rank RNG states are restored only into the same key (see ``checkpoint.py``).
    """
    groups = {"tp": pg_collection.tp, "pp": pg_collection.pp, "dp": pg_collection.dp, "cp": pg_collection.cp,
              "ep": pg_collection.ep, "etp": pg_collection.expt_tp}
    return {"world_size": dist.get_world_size(), **{name: group.size() for name, group in groups.items()},
            "device": torch.device(device).type}


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
