"""One command that proves the trainer on a GPU: correctness against the CPU, checkpoints, speed, memory.

Usage (needs torch, megatron-core, tokenizers, pyyaml, numpy, pytest and nothing from the network: the data
is synthetic, made here; the package need not be installed: ``bench/hyperp_megatron`` links to the
checkout's, which Python finds beside the script)::

    python bench/gpu_check.py                          # one GPU, every part, ~5 min with imports
    python bench/gpu_check.py --out $OUT               # results elsewhere (default bench/results/gpu)
    python bench/gpu_check.py --parts tiny_fp32,dense_d8_adamw
    python bench/gpu_check.py --device cpu --smoke     # CI: every part on tiny shapes, 2 steps each
    python bench/gpu_check.py --device cpu --write-reference   # the CPU losses the GPU must match

Parts (``bench/gpu_check_parts.py``, in order; a failing part is reported and the rest still run):
tiny fp32 / bf16 (40 steps, step-1 loss vs the committed CPU reference to 1e-3, TF32 off and fp32
Newton-Schulz), checkpoint save + resume (bit-exact with ``train.deterministic``; next losses within 1e-4
without), then issue 13's targets: dense d8 at 16 x 4096 (MFU >= 50%), sphere Muon vs AdamW tokens/s at
32 x 4096 (>= 0.95), MoE d8 with grouped experts (MFU >= 25%); issue 23's levers: activation recomputation
(none / selective / full on dense d8: peak memory, saved activations and step time as ratios against none,
losses equal to none's) and asynchronous checkpoint saves (the step loop's stall per save, async vs sync);
then the sphere step vs ``torch.optim.Muon`` with bf16 Newton-Schulz (<= 1.1x), Newton-Schulz bf16 vs
matmul FLOP/s (>= 0.7), SDPA attention and grouped experts (``bench/attention_experts_bench.py``); then the d8 dense shape at seq 2048 with
sphere_muon / muon / adamw (tokens/s, MFU vs the GPU's bf16 peak, peak memory) and the single-process
unit tests, and issue 24's science micro-study (the science base recipe at C 256 and 512, vocab 32k,
3 LRs). Trainer runs use the trainer's GPU defaults (TF32 on, bf16 Newton-Schulz) except the tiny parts.
Writes ``gpu_check.json`` (``gpu``, ``versions``, ``parts`` = {name: {"ok", "error",
...numbers}}, ``metrics`` = flat name -> number) and ``gpu_check.md`` after every part.

Adding a part: a function ``fn(check) -> dict`` in ``bench/gpu_check_parts.py``, listed in ``PARTS``;
it returns its numbers (``"metrics"``: the flat names it contributes, ``"failures"``: failed checks)
and uses the helpers of :class:`Check` (``train``, ``time_cuda``, ``overrides``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

# Read by cuBLAS when it creates its first handle: deterministic GEMMs for the resume part (harmless else).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

REFERENCE = REPO / "bench/results/gpu/cpu_reference.json"
SYNTHETIC_VOCAB = 8192
EOD = "<|endoftext|>"


# ---------------------------------------------------------------------- synthetic data


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: the same uint64 hash on every machine and numpy version."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def synthetic_documents(num_documents: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    """Documents of 200-599 tokens below ``vocab - 1`` (the last id is EOD): skewed unigrams over 1024 ids
    and every odd position the previous token + 1, so a model's loss falls quickly from ln(vocab)."""
    with np.errstate(over="ignore"):
        lengths = 200 + _mix(np.arange(num_documents, dtype=np.uint64) + np.uint64(seed << 32)) % np.uint64(400)
        documents = []
        for index, length in enumerate(lengths.astype(np.int64)):
            keys = np.uint64((seed << 40) + (index << 12)) + np.arange(length, dtype=np.uint64)
            uniform = (_mix(keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
            tokens = (1024 * (uniform * uniform * uniform)).astype(np.int64)  # IEEE products: no libm pow
            tokens[1::2] = (tokens[0::2][: len(tokens[1::2])] + 1) % 1024
            documents.append(tokens % (vocab - 1))
    return documents


def make_synthetic_corpus(directory: Path, num_documents: int = 3000) -> tuple[str, str]:
    """A Megatron ``.bin/.idx`` corpus and a word-level tokenizer directory (EOD = the last id);
    returns (dataset prefix, tokenizer directory). Deterministic: the CPU reference uses the same."""
    import tokenizers
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tokenizer_dir = directory / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    vocab = {f"t{i}": i for i in range(SYNTHETIC_VOCAB - 1)} | {EOD: SYNTHETIC_VOCAB - 1}
    tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=EOD)).save(str(tokenizer_dir / "tokenizer.json"))
    prefix = directory / "synthetic_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(SYNTHETIC_VOCAB))
    for tokens in synthetic_documents(num_documents, SYNTHETIC_VOCAB):
        builder.add_item(torch.from_numpy(np.append(tokens, SYNTHETIC_VOCAB - 1)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix), str(tokenizer_dir)


# ---------------------------------------------------------------------- the check's context


@dataclass
class Check:
    """What every part gets: the device, the mode, where to work, the data, and helpers."""

    device: torch.device
    smoke: bool
    work_dir: Path
    peak_tflops: float | None
    reference: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    data_prefix: str = ""
    tokenizer_dir: str = ""

    def overrides(self, name: str, **sections) -> dict:
        """The sections every trainer run of a part shares (data, run dir, no eval or checkpoints)."""
        base = {
            "parallel": {"tensor": 1, "pipeline": 1, "backend": "nccl" if self.device.type == "cuda" else "gloo"},
            "data": {"prefixes": [self.data_prefix], "tokenizer": self.tokenizer_dir,
                     "cache_dir": str(self.work_dir / "data")},
            "train": {"eval_interval": 0, "eval_iters": 1, "log_interval": 10},
            "logging": {"run_dir": str(self.work_dir / "runs" / name), "tensorboard": False},
            "checkpoint": {"interval": 0, "save_final": False, "resume": False},
        }
        for section, values in sections.items():
            base.setdefault(section, {}).update(values)
        return base

    def train(self, config: str | None, overrides: dict) -> dict:
        """Train in this process (world size 1) on the check's device; the trainer's result plus the
        per-step metrics it logged (``steps``: dicts of step, loss, step_time, tokens_per_s, memory)."""
        from megatron.core import parallel_state

        from hyperp_megatron.config import load_config, validate
        from hyperp_megatron.train import train

        cfg = load_config(REPO / config if config else None, overrides)
        validate(cfg, 1)
        try:
            result = train(cfg, 1, 0, device=self.device)
        finally:
            parallel_state.destroy_model_parallel()
            gc.collect()
        lines = (Path(cfg.logging.run_dir) / "metrics.jsonl").read_text().splitlines()
        result["steps"] = [record for record in map(json.loads, lines) if "step_time" in record]
        result["config"] = cfg
        return result

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_cuda(self, fn, repeats: int, warmup: int = 2) -> float:
        """Median wall seconds of ``fn()`` (synchronized on a GPU)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.synchronize()
            started = time.perf_counter()
            fn()
            self.synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times)


# ---------------------------------------------------------------------- running parts and reporting


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_mem_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def run_part(check: Check, fn) -> tuple[dict, dict]:
    """Run one part: (its record {"ok", "error", "seconds", ...numbers}, the flat metrics it contributes)."""
    _reset_memory(check.device)
    started = time.perf_counter()
    try:
        numbers = fn(check)
        failures = numbers.pop("failures", [])
        metrics = numbers.pop("metrics", {})
        record = {"ok": not failures, "error": "; ".join(failures) or None, **numbers}
    except Exception as exc:  # noqa: BLE001 - a failing part is reported, the others still run
        traceback.print_exc()
        record, metrics = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}, {}
    record["seconds"] = round(time.perf_counter() - started, 2)
    record.update(_peak_memory(check.device))
    return record, metrics


def environment(device: torch.device) -> tuple[str, dict]:
    from hyperp_megatron.metrics import package_versions

    import hyperp_megatron

    versions = {**package_versions(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "triton": _version("triton"),
                # bench/hyperp_megatron links to the checkout's package, so the script checks this checkout
                "package_from_checkout": Path(hyperp_megatron.__file__).resolve().parent == REPO / "hyperp_megatron"}
    if device.type != "cuda":
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", versions
    props = torch.cuda.get_device_properties(device)
    versions["compute_capability"] = f"{props.major}.{props.minor}"
    versions["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return props.name, versions


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def peak_tflops_for(gpu: str, override: float | None) -> float | None:
    """``--peak-tflops``, else the dense bf16 peak of the GPU by name (``hyperp_megatron.hardware``, the
    trainer's MFU table)."""
    from hyperp_megatron.hardware import bf16_peak_tflops

    return override or bf16_peak_tflops(gpu)


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# GPU check: {report['gpu']}", "",
             f"`{report['command']}` on {report['started']}, {report['seconds']:.0f} s in all; "
             f"torch {report['versions'].get('torch')}, megatron-core {report['versions'].get('megatron-core')}, "
             f"CUDA {report['versions'].get('cuda')}" + (" (smoke mode)" if report["smoke"] else ""), "",
             "| part | ok | s | numbers / error |", "|---|---|---|---|"]
    for name, record in report["parts"].items():
        numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k not in ("ok", "error", "seconds"))
        detail = numbers if record["ok"] else f"**{record['error']}**" + (f"; {numbers}" if numbers else "")
        lines.append(f"| {name} | {'yes' if record['ok'] else 'NO'} | {record['seconds']} | {detail} |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in sorted(report["metrics"].items())]
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------------- entry point


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 2 steps per part (CI)")
    parser.add_argument("--parts", default="", help="comma-separated part names (default: all)")
    parser.add_argument("--out", default=str(REPO / "bench/results/gpu"), help="where the .json and .md go")
    parser.add_argument("--work-dir", default=None, help="runs and data (default: a temporary directory)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="parts starting after this many seconds are skipped (reported as failed)")
    parser.add_argument("--write-reference", action="store_true",
                        help=f"run the tiny parts on the CPU and write {REFERENCE.relative_to(REPO)}")
    return parser.parse_args(argv)


def _init_distributed(device_name: str) -> torch.device:
    from hyperp_megatron.config import ParallelConfig
    from hyperp_megatron.parallel import discover_launch_env, init_process_group

    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible; run with --device cpu (and --smoke) on a CPU machine")
    env = discover_launch_env({key: value for key, value in os.environ.items() if key == "MASTER_PORT"})
    return init_process_group(env, ParallelConfig(backend="nccl" if device_name == "cuda" else "gloo"))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started, started_at = time.perf_counter(), datetime.datetime.now().isoformat(timespec="seconds")
    import warnings

    warnings.filterwarnings("ignore")
    # The parts outside the trainer start at fp32 precision (torch's default); every trainer run sets TF32
    # itself (train.tf32: off for the tiny parts, which compare with the CPU).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = _init_distributed(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # several CPU threads were measured not to be bit-reproducible
    from gpu_check_parts import PARTS, write_reference

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    gpu, versions = environment(device)
    check = Check(device, args.smoke, work_dir, peak_tflops_for(gpu, args.peak_tflops),
                  json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}, versions)
    check.data_prefix, check.tokenizer_dir = make_synthetic_corpus(work_dir / "data")
    if args.write_reference:
        return write_reference(check, REFERENCE, " ".join(["python bench/gpu_check.py", *sys.argv[1:]]))
    selected = [name for name in args.parts.split(",") if name] or list(PARTS)
    unknown = sorted(set(selected) - set(PARTS))
    if unknown:
        raise SystemExit(f"error: unknown parts {unknown}; choose from {list(PARTS)}")
    report = {"gpu": gpu, "device": str(device), "versions": versions, "smoke": args.smoke,
              "command": " ".join(["python bench/gpu_check.py", *sys.argv[1:]]), "started": started_at,
              "peak_bf16_tflops": check.peak_tflops, "tf32": "off: tiny parts, deterministic resume; on: other trainer runs", "parts": {}, "metrics": {}, "seconds": 0.0}
    for name in selected:
        if time.perf_counter() - started > args.budget_s:
            report["parts"][name] = {"ok": False, "error": f"skipped: the {args.budget_s:.0f} s budget was spent",
                                     "seconds": 0.0}
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        record, metrics = run_part(check, PARTS[name])
        report["parts"][name], report["seconds"] = record, round(time.perf_counter() - started, 1)
        report["metrics"].update(metrics)
        peaks = [r["peak_mem_alloc_gib"] for r in report["parts"].values() if "peak_mem_alloc_gib" in r]
        if peaks:
            report["metrics"]["peak_mem_gib"] = max(peaks)
        write_report(report, Path(args.out))
        print(f"[gpu_check] {name}: {'ok' if record['ok'] else 'FAILED: ' + str(record['error'])} "
              f"({record['seconds']} s)", flush=True)
    failed = [name for name, record in report["parts"].items() if not record["ok"]]
    print(f"[gpu_check] {len(report['parts']) - len(failed)}/{len(report['parts'])} parts ok in "
          f"{report['seconds']:.0f} s; {args.out}/gpu_check.json" + (f"; failed: {failed}" if failed else ""))
    from hyperp_megatron.parallel import destroy

    destroy()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
