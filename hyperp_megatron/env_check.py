"""``hyperp-env``: what this environment has and what a run would use or refuse here, before any job is queued.

Usage (``python -m hyperp_megatron.env_check`` is the same command)::

    hyperp-env                                              # versions, GPUs, the default config's choices
    hyperp-env --config configs/hyperp/dense_d8.yaml        # that run's choices on this machine
    hyperp-env --config configs/hyperp/moe_d8.yaml --train.fp8 hybrid --format json

Prints the versions of Python, torch (its CUDA and cuDNN build), NCCL, Transformer Engine, apex,
megatron-core, mpi4py and triton; every visible GPU (name, memory, compute capability, the bf16 peak MFU uses);
then, for the config (local rank 0's device), each decision the trainer takes at start-up with the same
functions: device and backend, layers (``model.transformer_impl``), FP8, core attention, routed-expert GEMMs,
Newton-Schulz dtype, fused kernels, MFU peak and the memory check. A decision the trainer would refuse is
printed with the trainer's one-line message, and the exit status is then 2 (0 otherwise).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata

PACKAGES = (("torch", "torch"), ("megatron-core", "megatron.core"), ("transformer-engine", "transformer_engine"),
            ("apex", "apex"), ("mpi4py", "mpi4py"), ("triton", "triton"))
"""(distribution name, import name): versions come from the distribution, else from the module's __version__."""


def _version(distribution: str, module: str) -> str | None:
    for name in (distribution, distribution.replace("-", "_")):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    from hyperp_megatron.compat.without_te import module_available

    if not module_available(module):
        return None
    # e.g. apex built from source in the NGC container registers no distribution metadata
    return str(getattr(__import__(module), "__version__", "installed (no version)"))


def versions() -> dict:
    """Python, the packages of ``PACKAGES`` (None: not installed), torch's CUDA / cuDNN build and NCCL."""
    import torch

    out = {"python": platform.python_version()}
    out.update({distribution: _version(distribution, module) for distribution, module in PACKAGES})
    out["cuda (torch build)"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    nccl = torch.cuda.nccl.version() if torch.version.cuda and torch.distributed.is_nccl_available() else None
    out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
    return out


def _decide(fn):
    """(value, None) or (None, the trainer's one-line refusal)."""
    try:
        return fn(), None
    except ValueError as exc:
        return None, str(exc)


def decisions(cfg, world_size: int = 1) -> list[dict]:
    """Each start-up decision of a run of ``cfg`` on this machine (local rank 0): ``{"what", "use", "refused"}``
    (``refused`` None, or the message the trainer stops with)."""
    import torch

    from hyperp_megatron.compat.without_te import fused_kernel_flags
    from hyperp_megatron.hardware import mfu_peak
    from hyperp_megatron.model.fp8 import check_fp8
    from hyperp_megatron.model.moe import experts_impl
    from hyperp_megatron.model.sdpa_attention import core_attention_impl
    from hyperp_megatron.model.spec import HAVE_TE, use_transformer_engine
    from hyperp_megatron.optim.builder import ns_compute_dtype
    from hyperp_megatron.parallel import backend_for, decide_device, describe_gpu

    rows = []

    def add(what, use, refused=None):
        rows.append({"what": what, "use": use, "refused": refused})

    device, refused = _decide(lambda: decide_device(cfg.parallel, 0))
    add("device", f"{device} ({backend_for(device)})" if device else None, refused)
    device = device or torch.device("cpu")
    gpu = describe_gpu(device)
    use_te, refused = _decide(lambda: use_transformer_engine(cfg.model.transformer_impl, device))
    add("layers (model.transformer_impl)", (f"{cfg.model.transformer_impl}: " + (
        "Transformer Engine" if use_te else "Megatron local (torch norms and linears)")) if not refused else None,
        refused)
    _, refused = _decide(lambda: check_fp8(cfg.train, bool(use_te), HAVE_TE, device))
    add("fp8 (train.fp8)", "off" if cfg.train.fp8 is None else (
        None if refused else f"{cfg.train.fp8}, recipe {cfg.train.fp8_recipe}"), refused)
    attention, refused = _decide(lambda: core_attention_impl(cfg.model.attention_backend, bool(use_te)))
    add("core attention (model.attention_backend)", attention and {
        "te": "Transformer Engine fused attention", "sdpa": "torch scaled_dot_product_attention",
        "megatron_local": "Megatron DotProductAttention (keeps s x s scores)"}[attention], refused)
    if cfg.model.moe.enabled:
        experts = experts_impl(cfg.model.moe, device)
        add("routed experts (model.moe.grouped_gemm)", {
            "te_grouped": "Transformer Engine TEGroupedMLP",
            "torch_grouped": "torch._grouped_mm per expert GEMM (bf16, compute capability >= 9.0; "
                             "else a per-expert loop)",
            "sequential": "Megatron SequentialMLP (a loop over experts)"}[experts])
    else:
        add("routed experts (model.moe.grouped_gemm)", "dense model: no experts")
    if cfg.optim.name != "adamw":
        add("Newton-Schulz dtype (optim.ns_dtype)", f"{cfg.optim.ns_dtype}: "
            f"{str(ns_compute_dtype(cfg.optim.ns_dtype, device)).removeprefix('torch.')}")
    flags = fused_kernel_flags(device)
    add("fused kernels", ", ".join(flag for flag, on in flags.items() if on) or "none (unfused torch ops)")
    add("MFU", mfu_peak(gpu)[1])
    rows.append(_memory_row(cfg, world_size, gpu))
    return rows


def _memory_row(cfg, world_size: int, gpu) -> dict:
    from hyperp_megatron.derived import derive
    from hyperp_megatron.memory_fit import does_not_fit_line, usable_gib

    what = "memory (train.memory_check)"
    try:
        run = derive(cfg, world_size)
    except ValueError as exc:
        return {"what": what, "use": None, "refused": str(exc)}
    estimate = f"~{run.memory.total:.1f} GiB per GPU at world size {world_size}"
    if gpu is None:
        return {"what": what, "use": f"{estimate}; not checked on the CPU", "refused": None}
    line = does_not_fit_line(cfg, run, gpu.memory_gib, gpu.name, world_size) if cfg.train.memory_check else None
    return {"what": what, "use": None if line else f"{estimate} (fits: <= {usable_gib(gpu.memory_gib):.1f} GiB)",
            "refused": line}


def report(cfg, world_size: int = 1) -> dict:
    from hyperp_megatron.parallel import visible_gpus

    gpus = [{"name": g.name, "memory_gib": round(g.memory_gib, 1),
             "compute_capability": f"{g.compute_capability[0]}.{g.compute_capability[1]}",
             "bf16_peak_tflops": g.peak_tflops} for g in visible_gpus()]
    return {"versions": versions(), "gpus": gpus, "run": decisions(cfg, world_size)}


def render(data: dict) -> str:
    lines = ["versions:"] + [f"  {k}: {v if v is not None else 'not installed'}" for k, v in data["versions"].items()]
    lines.append(f"GPUs: {len(data['gpus'])}" + ("" if data["gpus"] else " (CUDA unavailable)"))
    lines += [f"  {i}: {g['name']}, {g['memory_gib']} GiB, compute capability {g['compute_capability']}, "
              f"bf16 peak {g['bf16_peak_tflops'] or 'unknown'} TFLOP/s" for i, g in enumerate(data["gpus"])]
    lines.append("a run here would use:")
    lines += [f"  {row['what']}: " + (f"REFUSED: {row['refused']}" if row["refused"] else row["use"])
              for row in data["run"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``hyperp-env``: exit 0, or 2 when the config is invalid or the run would be refused here."""
    from hyperp_megatron.cli import quiet_megatron_import_warnings, split_config_arg

    quiet_megatron_import_warnings()
    parser = argparse.ArgumentParser(prog="hyperp-env", description=__doc__.split("\n")[0])
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--world-size", type=int, default=1, help="processes of the planned run (default 1)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from hyperp_megatron.config import load_config

    try:
        config_path, overrides = split_config_arg(rest)
        cfg = load_config(config_path, overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    data = report(cfg, args.world_size)
    print(json.dumps(data, indent=1) if args.format == "json" else render(data), flush=True)
    return 2 if any(row["refused"] for row in data["run"]) else 0


if __name__ == "__main__":
    sys.exit(main())
