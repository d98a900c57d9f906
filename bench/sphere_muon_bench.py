"""Sphere Muon cost on the hidden matrices of a ~25M-parameter model, side by side in one script.

Usage (from the repository root)::

    python bench/sphere_muon_bench.py                      # all parts, ~8 min on a 2-core CPU machine
    python bench/sphere_muon_bench.py --repeats 20 --threads 2
    python bench/sphere_muon_bench.py --device cuda --layers 8 --hidden 1024 --heads 16 --query-groups 4 \
        --ffn 4096 --out bench/results/gpu/sphere_muon.json   # the d8 matrices on a GPU (parts 0-2)

Parts 1-2 time CPU time (``time.process_time``) with ``--threads 1`` by default, so that other processes
on a shared machine do not enter the numbers (wall times are recorded too); on ``--device cuda`` wall
time with the device synchronized.

0. aten ops one step issues (``op_counters.count_aten_ops``, the second step) for every optimizer below.
1. Optimizer step time (one process) on the same matrices and gradients:
   ``SphereMuon`` with the 'sphere_muon' rule (batched across layers; fp32 and bf16 Newton-Schulz; results
   before 2026-12-05 also timed a per-matrix loop, since removed), the same class with the plain 'muon' rule
   (the baseline), ``torch.optim.Muon`` (bf16 Newton-Schulz) and ``torch.optim.AdamW``. Steps are
   interleaved (one step of each optimizer per round, ``--repeats`` rounds) so drifts of a shared machine
   hit all alike; medians and minima reported, and per-round ratios (median): sphere / plain Muon
   (target <= 1.05), sphere bf16 NS / ``torch.optim.Muon`` (issue 13: <= 1.1 on a GPU).
2. Newton-Schulz FLOP/s vs ``torch.matmul`` FLOP/s on the same shapes: NS5 of each distinct matrix
   shape (``5 (4 m^2 n + 2 m^3)`` flops, ``m <= n``) against its three matmuls timed alone
   (``X X^T``, ``A A``, ``B X``). Target: NS >= 0.8 x matmul FLOP/s.
3. (CPU only) Collectives and bytes per step under TP=2 (2 gloo processes), Newton-Schulz 'gather' vs
   'distributed': every ``all_reduce`` / ``all_gather`` call in one ``SphereMuon.step`` counted with its
   payload (bytes of the tensor this rank passes in), plus the median step time.

Writes ``bench/results/sphere_muon.json`` and ``bench/results/sphere_muon.png``. The matrices are those
of one model (``--layers``, ``--hidden``, ...; fused QKV kept as one matrix in parts 0-2 so every
optimizer does the same work; split per Q/K/V as in training in part 3); no embeddings/norms.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from hyperp_megatron.op_counters import count_aten_ops
from hyperp_megatron.optim import ParamLayout, QKVSplit, SphereMuon, newton_schulz5

LR = 0.02


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--query-groups", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=8192, help="counted in the model size only")
    parser.add_argument("--repeats", type=int, default=12, help="timed rounds (parts 1 and 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="parts 1-2; CPU time per step is then compute time, whatever else runs")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=str(REPO / "bench/results/sphere_muon.json"))
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- the model's matrices


def model_matrices(args) -> dict[str, tuple[int, int]]:
    """Hidden matrices of a SwiGLU GQA transformer (Megatron's fused QKV and fused gate+up fc1)."""
    head_dim = args.hidden // args.heads
    qkv_rows = (args.heads + 2 * args.query_groups) * head_dim
    shapes = {}
    for layer in range(args.layers):
        shapes[f"{layer}.qkv"] = (qkv_rows, args.hidden)
        shapes[f"{layer}.proj"] = (args.hidden, args.heads * head_dim)
        shapes[f"{layer}.fc1"] = (2 * args.ffn, args.hidden)
        shapes[f"{layer}.fc2"] = (args.hidden, args.ffn)
    return shapes


def model_size(args, shapes) -> dict[str, int]:
    hidden = sum(m * n for m, n in shapes.values())
    norms = args.layers * (2 * args.hidden + 2 * (args.hidden // args.heads)) + args.hidden
    return {"hidden_matrices": hidden, "total": hidden + 2 * args.vocab * args.hidden + norms}


def init_weights(shapes, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    weights, grads = [], []
    for m, n in shapes.values():
        weights.append((torch.rand(m, n, generator=generator) * 2 - 1) / math.sqrt(n))
        grads.append(torch.randn(m, n, generator=generator) * 1e-3)
    return weights, grads


# ---------------------------------------------------------------------- part 1: step time


SPHERE, PLAIN, TORCH_MUON = "SphereMuon[sphere_muon]", "SphereMuon[muon]", "torch.optim.Muon"
SPHERE_BF16 = SPHERE + ", bf16 NS"


def make_optimizers(shapes, device: torch.device) -> dict[str, tuple[torch.optim.Optimizer, list[torch.Tensor]]]:
    weights, grads = init_weights(shapes)

    def params():
        tensors = [torch.nn.Parameter(w.to(device, copy=True)) for w in weights]
        for tensor, grad in zip(tensors, grads):
            tensor.grad = grad.to(device, copy=True)
        return tensors

    made = {}
    for name, rule, ns_dtype in ((SPHERE, "sphere_muon", None), (PLAIN, "muon", None),
                                 (SPHERE_BF16, "sphere_muon", torch.bfloat16)):
        tensors = params()
        made[name] = (SphereMuon(tensors, {t: ParamLayout(rule) for t in tensors}, lr=LR,
                                 ns_compute_dtype=ns_dtype), tensors)
    # torch's Muon runs Newton-Schulz in bf16 (compare with the bf16 NS lines).
    tensors = params()
    made[TORCH_MUON] = (torch.optim.Muon(tensors, lr=LR, weight_decay=0.0), tensors)
    tensors = params()
    made["torch.optim.AdamW"] = (torch.optim.AdamW(tensors, lr=LR, betas=(0.9, 0.95), weight_decay=0.0), tensors)
    return made


def count_ops(shapes, device: torch.device) -> dict:
    """aten ops of one step (the second: the first creates the state), per optimizer."""
    counts = {}
    for name, (optimizer, _) in make_optimizers(shapes, device).items():
        optimizer.step()
        with count_aten_ops() as ops:
            optimizer.step()
        counts[name] = sum(ops.values())
    return {"aten_ops_per_step": counts,
            "sphere_bf16_over_torch_muon": counts[SPHERE_BF16] / counts[TORCH_MUON],
            "target_over_torch_muon": 1.5}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ratio(times: dict, numerator: str, denominator: str) -> float:
    """Median over rounds of the per-round ratio (robust to a shared machine's drifts)."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def bench_step_times(shapes, repeats: int, warmup: int, device: torch.device) -> dict:
    optimizers = make_optimizers(shapes, device)
    wall: dict[str, list[float]] = {name: [] for name in optimizers}
    cpu: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_index in range(warmup + repeats):
        for name, (optimizer, _) in optimizers.items():
            _synchronize(device)
            started, started_cpu = time.perf_counter(), time.process_time()
            optimizer.step()
            _synchronize(device)
            if round_index >= warmup:
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - started_cpu)
    times = wall if device.type == "cuda" else cpu  # CPU: CPU time, others' processes do not enter it
    ratio = _median_ratio(times, SPHERE, PLAIN)
    return {
        "timed": "wall (synchronized)" if device.type == "cuda" else "CPU time",
        "median_cpu_s": {name: statistics.median(values) for name, values in cpu.items()},
        "median_wall_s": {name: statistics.median(values) for name, values in wall.items()},
        "min_wall_s": {name: min(values) for name, values in wall.items()},
        "all_cpu_s": cpu,
        "sphere_over_plain_muon": ratio,
        "sphere_over_plain_muon_per_round": [a / b for a, b in zip(times[SPHERE], times[PLAIN])],
        "target_sphere_over_plain_muon": 1.05,
        "target_met": ratio <= 1.05,
        "sphere_bf16_over_torch_muon": _median_ratio(times, SPHERE_BF16, TORCH_MUON),
        "target_sphere_bf16_over_torch_muon_gpu": 1.1,
    }


# ---------------------------------------------------------------------- part 2: NS vs matmul


def _interleaved_medians(fns: list, repeats: int, warmup: int) -> list[float]:
    """Median CPU time of each function, timed in turn (one call of each per round)."""
    samples: list[list[float]] = [[] for _ in fns]
    for round_index in range(warmup + repeats):
        for fn, times in zip(fns, samples):
            started = time.process_time()
            fn()
            if round_index >= warmup:
                times.append(time.process_time() - started)
    return [statistics.median(times) for times in samples]


def _interleaved_wall_medians(fns: list, repeats: int, warmup: int, device: torch.device) -> list[float]:
    samples: list[list[float]] = [[] for _ in fns]
    for round_index in range(warmup + repeats):
        for fn, times in zip(fns, samples):
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            if round_index >= warmup:
                times.append(time.perf_counter() - started)
    return [statistics.median(times) for times in samples]


def newton_schulz_flops(m: int, n: int) -> float:
    """Five iterations of A = X X^T (2 m^2 n), A A (2 m^3), (bA + cA^2) X (2 m^2 n), m <= n."""
    m, n = min(m, n), max(m, n)
    return 5 * (4 * m * m * n + 2 * m**3)


def bench_newton_schulz(shapes, repeats: int, warmup: int, device: torch.device) -> dict:
    rows, total_ns_time, total_mm_time, total_flops = [], 0.0, 0.0, 0.0
    if device.type == "cuda":
        global _interleaved_medians  # wall time with the device synchronized
        _interleaved_medians = functools.partial(_interleaved_wall_medians, device=device)
    for m, n in sorted(set(shapes.values())):
        count = sum(1 for shape in shapes.values() if shape == (m, n))
        x = torch.randn(m, n, device=device)
        wide = x if m <= n else x.mT.contiguous()
        short = wide.size(0)
        gram = torch.randn(short, short, device=device)
        # NS5, and the three matmuls of one NS iteration alone (x 5 iterations).
        ns_time, *matmul_times = _interleaved_medians(
            [lambda: newton_schulz5(x), lambda: wide @ wide.mT, lambda: gram @ gram, lambda: gram @ wide],
            repeats, warmup)
        mm_time = 5 * sum(matmul_times)
        flops = newton_schulz_flops(m, n)
        rows.append({"shape": [m, n], "count": count, "ns_s": ns_time, "matmul_s": mm_time, "flops": flops,
                     "ns_gflops": flops / ns_time / 1e9, "matmul_gflops": flops / mm_time / 1e9,
                     "ratio": mm_time / ns_time})
        total_ns_time += count * ns_time
        total_mm_time += count * mm_time
        total_flops += count * flops
    ratio = total_mm_time / total_ns_time
    return {"per_shape": rows, "ns_gflops": total_flops / total_ns_time / 1e9,
            "matmul_gflops": total_flops / total_mm_time / 1e9, "ns_over_matmul_flops": ratio,
            "target_ns_over_matmul": 0.8, "target_met": ratio >= 0.8}


# ---------------------------------------------------------------------- part 3: TP=2 collectives


@contextlib.contextmanager
def count_collectives(log: list):
    """Record (name, bytes) of every all_reduce / all_gather call made inside the block."""
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def wrap(name, original):
        def counted(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            log.append((name, tensor.numel() * tensor.element_size()))
            return original(*args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield log
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _tp_shards(args, shapes, rank: int, world_size: int):
    """This rank's shards (Megatron layout: qkv/fc1 rows, proj/fc2 columns) and their layouts."""
    import torch.distributed as dist

    group = dist.group.WORLD
    head_dim = args.hidden // args.heads
    weights, grads = init_weights(shapes)
    params, layouts = [], {}
    for (name, _), weight, grad in zip(shapes.items(), weights, grads):
        dim = 0 if name.endswith(("qkv", "fc1")) else 1
        param = torch.nn.Parameter(weight.chunk(world_size, dim=dim)[rank].clone())
        param.grad = grad.chunk(world_size, dim=dim)[rank].clone()
        split = None
        if name.endswith("qkv"):  # rows interleaved by query group; groups contiguous by rank
            split = QKVSplit(args.query_groups // world_size, args.heads // args.query_groups * head_dim, head_dim)
        params.append(param)
        layouts[param] = ParamLayout("sphere_muon", group=group, partition_dim=dim, qkv_split=split)
    return params, layouts


def _tp_worker(rank: int, world_size: int, port: int, args, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        shapes, results = model_matrices(args), {}
        for mode in ("gather", "distributed"):
            params, layouts = _tp_shards(args, shapes, rank, world_size)
            optimizer = SphereMuon(params, layouts, lr=LR, ns_mode=mode)
            times = []
            for index in range(args.warmup + args.repeats):
                dist.barrier()
                log: list = []
                started = time.perf_counter()
                with count_collectives(log):
                    optimizer.step()
                if index >= args.warmup:
                    times.append(time.perf_counter() - started)
            counts = {name: sum(1 for n, _ in log if n == name) for name in ("all_reduce", "all_gather")}
            results[mode] = {"collectives_per_step": counts, "calls": len(log),
                             "bytes_per_step": sum(size for _, size in log), "median_step_s": statistics.median(times)}
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def bench_tensor_parallel(args) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tp_worker, args=(rank, 2, port, args, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=1800) for _ in procs)
    for proc in procs:
        proc.join()
    out = results[0]
    out["note"] = ("bytes = payload this rank passes to each collective (all_gather: its shard; all_reduce: the "
                   "reduced buffer); the same on both ranks")
    return out


# ---------------------------------------------------------------------- report


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    on_cuda = results["machine"]["device"] == "cuda"
    steps = results["step_time"]["median_wall_s" if on_cuda else "median_cpu_s"]
    axes[0].barh(list(steps), [1e3 * v for v in steps.values()], color=[f"C{i}" for i in range(len(steps))])
    axes[0].set_xlabel("median optimizer step, " + ("wall ms" if on_cuda else
                                                       f"CPU ms ({results['machine']['threads']} thread)"))
    axes[0].set_title(f"step time, {results['model']['hidden_matrices'] / 1e6:.1f}M matrix params")
    rows = results["newton_schulz"]["per_shape"]
    labels = [f"{r['shape'][0]}x{r['shape'][1]}" for r in rows]
    x = range(len(rows))
    axes[1].bar([i - 0.2 for i in x], [r["ns_gflops"] for r in rows], width=0.4, label="Newton-Schulz")
    axes[1].bar([i + 0.2 for i in x], [r["matmul_gflops"] for r in rows], width=0.4, label="torch.matmul")
    axes[1].set_xticks(list(x), labels)
    axes[1].set_ylabel("GFLOP/s")
    axes[1].set_title("NS5 vs its matmuls alone")
    axes[1].legend()
    if "tensor_parallel_2" not in results:  # measured on the CPU only
        axes[2].axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return
    tp = results["tensor_parallel_2"]
    modes = ["gather", "distributed"]
    axes[2].bar(modes, [tp[m]["bytes_per_step"] / 2**20 for m in modes], color=["C4", "C5"])
    for i, mode in enumerate(modes):
        axes[2].text(i, tp[mode]["bytes_per_step"] / 2**20, f"{tp[mode]['calls']} calls", ha="center", va="bottom")
    axes[2].set_ylabel("MiB per rank per step")
    axes[2].set_title("TP=2 collectives per SphereMuon step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    shapes = model_matrices(args)
    results = {
        "command": "python bench/sphere_muon_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None},
        "model": {**vars(args), **model_size(args, shapes), "num_matrices": len(shapes)},
    }
    results["model"].pop("out")
    print(f"[bench] {len(shapes)} matrices, {results['model']['hidden_matrices'] / 1e6:.1f}M of "
          f"{results['model']['total'] / 1e6:.1f}M params", flush=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    results["op_counts"] = count_ops(shapes, device)
    print("[bench] aten ops per step:", results["op_counts"]["aten_ops_per_step"], flush=True)
    results["step_time"] = bench_step_times(shapes, args.repeats, args.warmup, device)
    step = results["step_time"]
    key = "median_wall_s" if device.type == "cuda" else "median_cpu_s"
    print(f"[bench] step {step['timed']} (ms):", {k: round(1e3 * v, 1) for k, v in step[key].items()}, flush=True)
    print("[bench] ratios:", {k: round(v, 3) for k, v in step.items() if k.startswith("sphere_")
                              and isinstance(v, float)}, flush=True)
    results["newton_schulz"] = bench_newton_schulz(shapes, args.repeats, args.warmup, device)
    print(f"[bench] NS {results['newton_schulz']['ns_gflops']:.1f} GFLOP/s vs matmul "
          f"{results['newton_schulz']['matmul_gflops']:.1f}", flush=True)
    if device.type == "cpu":
        results["tensor_parallel_2"] = bench_tensor_parallel(args)
        print("[bench] TP=2:", {m: results["tensor_parallel_2"][m] for m in ("gather", "distributed")}, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"[bench] wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
