"""Core attention (torch SDPA vs Megatron's unfused local attention) and routed experts (torch grouped GEMM
vs a per-expert loop vs Megatron's SequentialMLP), side by side on one device.

Usage (from the repository root)::

    python bench/attention_experts_bench.py --device cuda       # d8 shapes, bf16 -> bench/results/gpu/
    python bench/attention_experts_bench.py --device cpu --small --dtype fp32 \
        --out bench/results/attention_experts_cpu_smoke.json

From another script (a part of ``bench/gpu_check.py``), in a process where Megatron's parallel state is
absent or a TP = PP = EP = 1 layout; what ``run`` initializes (a gloo world of one if torch.distributed is
not initialized, Megatron's parallel state) it tears down again::

    sys.path.insert(0, str(REPO / "bench")); from attention_experts_bench import run
    result = run("cuda")   # {"device", "dtype", "shape", "torch", "parts": {...}, "metrics": {...}}

About 1 minute on one H200 including imports (10 timed repeats per variant).

Parts (forward + backward, median wall time over ``repeats`` after 2 warm-ups, CUDA synchronized):

- ``attention_s<seq>``: q [s, b, 16, 128], k/v [s, b, 4, 128] (GQA 4), HyperP scale sqrt(128)/128, causal.
  ``SDPACoreAttention`` vs Megatron ``DotProductAttention`` (torch softmax, no apex kernel): ms, peak extra
  memory (CUDA), relative output / input-gradient difference.
- ``experts``: the d8 MoE expert shape (63 experts of SwiGLU width 512 on C = 1024; b s top-7 routed tokens,
  counts from a balanced multinomial): ``TorchGroupedMLP`` with ``kernel='grouped_mm'`` (one
  ``torch._grouped_mm`` per GEMM), with ``kernel='loop'``, and Megatron's ``SequentialMLP`` on the same
  weights: ms, which kernel 'auto' picks, relative output / weight-gradient differences.

``metrics``: ``sdpa_vs_local_attention_speedup_s<seq>``, ``sdpa_attention_mem_saving_gib_s<seq>``,
``grouped_vs_sequential_experts_speedup``, ``grouped_vs_loop_experts_speedup``, ``*_max_rel_diff``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

D8 = dict(batch=8, seqs=(2048, 4096), heads=16, groups=4, head_dim=128, hidden=1024, experts=63, topk=7,
          expert_ffn=512, expert_tokens=8 * 2048)
SMALL = dict(batch=2, seqs=(128,), heads=4, groups=2, head_dim=32, hidden=64, experts=8, topk=2, expert_ffn=32,
             expert_tokens=256)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _ensure_parallel_state(device: torch.device) -> tuple:
    """A ProcessGroupCollection of a TP = EP = 1 Megatron parallel state on ``device`` (a gloo world of one
    when torch.distributed is not initialized), and what was created here (for :func:`_release`)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hyperp_megatron.config import ParallelConfig
    from hyperp_megatron.parallel import init_model_parallel

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    created = (not dist.is_initialized(), not parallel_state.model_parallel_is_initialized())
    if created[0]:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    # Applies the megatron-core patches the device needs (hyperp_megatron.compat) and seeds the RNG tracker.
    return init_model_parallel(ParallelConfig(), seed=1234, device=device), created


def _release(created: tuple) -> None:
    """Leave torch.distributed and Megatron's parallel state as :func:`_ensure_parallel_state` found them."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if created[1]:
        parallel_state.destroy_model_parallel()
    if created[0]:
        dist.destroy_process_group()


def _config(shape: dict, device: torch.device, dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        num_query_groups=shape["groups"], kv_channels=shape["head_dim"], ffn_hidden_size=4 * shape["hidden"],
        num_moe_experts=shape["experts"], moe_router_topk=shape["topk"], moe_ffn_hidden_size=shape["expert_ffn"],
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=device.type == "cpu", masked_softmax_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        softmax_scale=math.sqrt(128) / shape["head_dim"])


def _timed(fn, device: torch.device, repeats: int) -> dict:
    """Median / min ms of ``fn()`` and, on CUDA, the peak memory it allocates beyond what was live."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        live = torch.cuda.memory_allocated(device)
        fn()
        sync()
        peak = (torch.cuda.max_memory_allocated(device) - live) / 2**30
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return {"ms": statistics.median(times), "ms_min": min(times), "peak_extra_gib": peak}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def bench_attention(config, pg, shape: dict, seq: int, device, dtype, repeats: int) -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from hyperp_megatron.model.sdpa_attention import SDPACoreAttention

    gen = torch.Generator(device=device).manual_seed(0)
    b, h, g, d = shape["batch"], shape["heads"], shape["groups"], shape["head_dim"]
    q = torch.randn(seq, b, h, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    k, v = (torch.randn(seq, b, g, d, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(2))
    grad_out = torch.randn(seq, b, h * d, device=device, dtype=dtype, generator=gen)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                  softmax_scale=config.softmax_scale, pg_collection=pg)
    modules = {"sdpa": SDPACoreAttention(**kwargs), "local": DotProductAttention(**kwargs)}
    part, results = {}, {}
    for name, module in modules.items():
        def step(module=module):
            for t in (q, k, v):
                t.grad = None
            out = module(q, k, v, None, attn_mask_type=AttnMaskType.causal)
            out.backward(grad_out)
            return out

        part[name] = _timed(step, device, repeats)
        out = step()
        results[name] = (out.detach(), q.grad.detach().clone())
    part["speedup"] = part["local"]["ms"] / part["sdpa"]["ms"]
    part["output_rel_diff"] = _rel(results["sdpa"][0], results["local"][0])
    part["grad_rel_diff"] = _rel(results["sdpa"][1], results["local"][1])
    return part


def _copy_sequential_weights(grouped, sequential) -> None:
    with torch.no_grad():
        for i, expert in enumerate(sequential.local_experts):
            expert.linear_fc1.weight.copy_(grouped.linear_fc1.weights()[i])
            expert.linear_fc2.weight.copy_(grouped.linear_fc2.weights()[i])


def bench_experts(config, pg, shape: dict, device, dtype, repeats: int) -> dict:
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    from hyperp_megatron.model.experts import TorchGroupedMLP, grouped_mm_usable

    gen = torch.Generator(device="cpu").manual_seed(0)
    num_tokens = shape["expert_tokens"] * shape["topk"]
    counts = torch.bincount(torch.randint(0, shape["experts"], (num_tokens,), generator=gen),
                            minlength=shape["experts"])
    x = torch.randn(num_tokens, shape["hidden"], generator=gen).to(device, dtype).requires_grad_()
    probs = torch.rand(num_tokens, generator=gen).to(device)
    grad_out = torch.randn(num_tokens, shape["hidden"], generator=gen).to(device, dtype)
    grouped = TorchGroupedMLP(shape["experts"], config, pg_collection=pg).to(device)
    spec = get_moe_module_spec(use_te=False, num_experts=shape["experts"], moe_grouped_gemm=False).submodules.experts
    sequential = build_module(spec, shape["experts"], config, pg_collection=pg).to(device)
    _copy_sequential_weights(grouped, sequential)
    part = {"auto_picks_grouped_mm": grouped_mm_usable(x, grouped.linear_fc1.weights())
            and grouped.linear_fc2.weights()[0].shape[1] % 8 == 0, "routed_tokens": num_tokens}
    results = {}
    for name in ("grouped_mm", "loop", "sequential"):
        module = sequential if name == "sequential" else grouped
        if name != "sequential":
            grouped.kernel = name

        def step(module=module):
            module.zero_grad(set_to_none=True)
            x.grad = None
            out, _ = module(x, counts, probs)
            out.backward(grad_out)
            return out

        try:
            part[name] = _timed(step, device, repeats)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. no _grouped_mm for this device / dtype
            part[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out = step()
        fc1_grads = [p.grad for n, p in module.named_parameters() if "fc1" in n]
        results[name] = (out.detach(), torch.stack([g.detach() for g in fc1_grads]))
    if "grouped_mm" in results:
        part["speedup_vs_sequential"] = part["sequential"]["ms"] / part["grouped_mm"]["ms"]
        part["speedup_vs_loop"] = part["loop"]["ms"] / part["grouped_mm"]["ms"]
        part["output_rel_diff"] = _rel(results["grouped_mm"][0], results["sequential"][0])
        part["fc1_grad_rel_diff"] = _rel(results["grouped_mm"][1], results["sequential"][1])
    part["loop_vs_sequential_output_rel_diff"] = _rel(results["loop"][0], results["sequential"][0])
    return part


def run(device: str = "cuda", dtype: str = "bf16", small: bool = False, repeats: int = 10) -> dict:
    """All parts on ``device``; a failing part is reported (``{"error": ...}``) and the rest still runs."""
    device, torch_dtype, shape = torch.device(device), DTYPES[dtype], dict(SMALL if small else D8)
    pg, created = _ensure_parallel_state(device)
    try:
        parts, metrics = _run_parts(pg, shape, device, torch_dtype, repeats)
    finally:
        _release(created)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": dtype,
            "shape": shape, "torch": torch.__version__, "parts": parts, "metrics": metrics}


def _run_parts(pg, shape: dict, device: torch.device, torch_dtype: torch.dtype, repeats: int) -> tuple[dict, dict]:
    config = _config(shape, device, torch_dtype)
    parts, metrics = {}, {}
    for seq in shape["seqs"]:
        name = f"attention_s{seq}"
        try:
            parts[name] = part = bench_attention(config, pg, shape, seq, device, torch_dtype, repeats)
        except Exception as exc:  # noqa: BLE001 - report and continue (e.g. out of memory for local attention)
            parts[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        metrics[f"sdpa_vs_local_attention_speedup_s{seq}"] = part["speedup"]
        metrics[f"sdpa_vs_local_attention_max_rel_diff_s{seq}"] = max(part["output_rel_diff"], part["grad_rel_diff"])
        if part["sdpa"]["peak_extra_gib"] is not None:
            metrics[f"sdpa_attention_mem_saving_gib_s{seq}"] = (part["local"]["peak_extra_gib"]
                                                               - part["sdpa"]["peak_extra_gib"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        parts["experts"] = part = bench_experts(config, pg, shape, device, torch_dtype, repeats)
        if "speedup_vs_sequential" in part:
            metrics["grouped_vs_sequential_experts_speedup"] = part["speedup_vs_sequential"]
            metrics["grouped_vs_loop_experts_speedup"] = part["speedup_vs_loop"]
            metrics["grouped_experts_max_rel_diff"] = max(part["output_rel_diff"], part["fc1_grad_rel_diff"])
    except Exception as exc:  # noqa: BLE001
        parts["experts"] = {"error": f"{type(exc).__name__}: {exc}"}
    return parts, metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="default bench/results/gpu/attention_experts.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.device, args.dtype, args.small, args.repeats)
    args_text = " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = f"python bench/attention_experts_bench.py {args_text}"
    out = Path(args.out or REPO / "bench" / "results" / "gpu" / "attention_experts.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["metrics"], indent=2))
    for name, part in result["parts"].items():
        if "error" in part:
            print(f"{name}: {part['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
