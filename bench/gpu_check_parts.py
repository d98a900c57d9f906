"""The parts of ``bench/gpu_check.py``: each ``fn(check) -> dict`` of numbers, plus ``"metrics"`` (flat
names for the report) and ``"failures"`` (failed checks; the part is then reported as failed).

``check.smoke`` (CI on the CPU) shrinks every shape and runs 2 steps: it proves each part runs, not speed.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hyperp_megatron.budget import ModelShape, model_flops_per_token

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = "configs/tiny.yaml"
TINY_STEPS = 40
REFERENCE_STEPS = TINY_STEPS  # the same LR schedule, so every step compares
STEP1_TOLERANCE = 1e-3
RESUME_RTOL = 1e-4
SMALL_MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
               "head_dim": None, "ffn_hidden_size": None, "seq_length": 64, "vocab_size": None}
"""Smoke-mode shape of every trainer part (the tiny parts compare with the reference's ``smoke_*`` losses)."""
SMALL_MOE = {"sparsity": 4, "granularity": 4, "shared_expert": True}
UNIT_TESTS = ["tests/test_newton_schulz.py", "tests/test_sphere_muon.py", "tests/test_transfer.py",
              "tests/test_config.py", "tests/test_device.py", "tests/test_rng_checkpoint.py"]


def _steps(check, full: int) -> int:
    return 2 if check.smoke else full


# ---------------------------------------------------------------------- tiny: the CPU comparison


def _tiny(check, precision: str, steps: int, small: bool) -> dict:
    # TF32 off and fp32 Newton-Schulz: the comparison with the CPU is at fp32 precision (the trainer's
    # defaults on a GPU are TF32 on and bf16 Newton-Schulz).
    overrides = check.overrides(f"tiny_{precision}", train={"steps": steps, "precision": precision, "tf32": False},
                                optim={"ns_dtype": "fp32"}, **({"model": SMALL_MODEL} if small else {}))
    result = check.train(TINY_CONFIG, overrides)
    return {"losses": result["losses"], "step_times": [r["step_time"] for r in result["steps"]]}


def _reference_name(precision: str, small: bool) -> str:
    return f"{'smoke_' if small else ''}tiny_{precision}"


def _tiny_part(check, precision: str) -> dict:
    run = _tiny(check, precision, _steps(check, TINY_STEPS), small=check.smoke)
    losses, failures = run["losses"], []
    numbers = {"loss_step1": losses[0], "loss_last": losses[-1], "steps": len(losses),
               "median_step_s": statistics.median(run["step_times"])}
    reference = check.reference.get(_reference_name(precision, check.smoke), {}).get("losses")
    if not reference:
        failures.append("no CPU reference (bench/results/gpu/cpu_reference.json); run --write-reference on a CPU")
    else:
        diffs = [abs(a - b) for a, b in zip(losses, reference)]
        numbers.update(cpu_loss_step1=reference[0], step1_abs_diff=diffs[0],
                       max_abs_diff_first_steps=max(diffs), compared_steps=len(diffs))
        if not diffs[0] <= STEP1_TOLERANCE:
            failures.append(f"step-1 loss {losses[0]:.6f} vs CPU {reference[0]:.6f} (|diff| {diffs[0]:.2e} > "
                            f"{STEP1_TOLERANCE})")
    if not all(math.isfinite(x) for x in losses):
        failures.append(f"non-finite loss: {losses}")
    elif not check.smoke and not losses[-1] < losses[0] - 1.0:
        failures.append(f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}")
    metrics = {f"tiny_{precision}_loss_last": losses[-1]}
    if "step1_abs_diff" in numbers:
        metrics[f"tiny_{precision}_step1_abs_diff"] = numbers["step1_abs_diff"]
    return {**numbers, "metrics": metrics, "failures": failures}


def tiny_fp32(check) -> dict:
    return _tiny_part(check, "fp32")


def tiny_bf16(check) -> dict:
    return _tiny_part(check, "bf16")


def write_reference(check, path: Path, command: str) -> int:
    """The CPU losses of the tiny parts' first steps, which a GPU run must reproduce."""
    if check.device.type != "cpu":
        raise SystemExit("error: --write-reference runs on the CPU (--device cpu)")
    reference = {"command": command, "config": TINY_CONFIG, "versions": check.versions,
                 "note": "synthetic data of bench/gpu_check.py, world size 1, TP 1, one CPU thread; "
                         "smoke_*: the --smoke shape (SMALL_MODEL of bench/gpu_check_parts.py)"}
    for precision in ("fp32", "bf16"):
        for small, steps in ((True, 2), (False, REFERENCE_STEPS)):
            losses = _tiny(check, precision, steps, small)["losses"]
            reference[_reference_name(precision, small)] = {"steps": steps, "losses": losses}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------- checkpoints


def checkpoint_resume(check) -> dict:
    """Save at step k, resume from it in a new session, compare with the uninterrupted run: bit-exact
    (losses and weights digest) with deterministic algorithms; next losses within RESUME_RTOL without.
    Sphere Muon with the layer-wise distributed optimizer (its checkpoint code all-reduces over DP)."""
    steps, save_at = (4, 2) if check.smoke else (6, 3)
    model = {"model": SMALL_MODEL} if check.smoke else {}
    numbers, failures = {}, []
    for deterministic in (True, False):
        tag = "deterministic" if deterministic else "default"
        common = dict(train={"steps": steps, "deterministic": deterministic}, optim={"name": "sphere_muon"},
                      parallel={"distributed_optimizer": True}, **model)
        full = check.train(TINY_CONFIG, check.overrides(f"ckpt_{tag}_full", **common, checkpoint={
            "interval": save_at, "save_final": False, "resume": False, "keep": 0}))
        saved = Path(full["config"].logging.run_dir) / "checkpoints" / f"step_{save_at:06d}"
        resumed = check.train(TINY_CONFIG, check.overrides(f"ckpt_{tag}_resumed", **common, checkpoint={
            "load": str(saved), "resume": False}))
        expected, got = full["losses"][save_at:], resumed["losses"]
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, expected))
        numbers[f"{tag}_max_rel_diff"] = worst
        numbers[f"{tag}_bit_exact"] = got == expected and resumed["weights_digest"] == full["weights_digest"]
        if len(got) != len(expected):
            failures.append(f"{tag}: resumed run took {len(got)} steps, expected {len(expected)}")
        elif deterministic and not numbers[f"{tag}_bit_exact"]:
            failures.append(f"deterministic resume not bit-exact (max rel diff {worst:.2e})")
        elif worst > RESUME_RTOL:
            failures.append(f"{tag}: resumed losses differ by {worst:.2e} relative (> {RESUME_RTOL})")
    return {**numbers, "metrics": {"resume_max_rel_diff": numbers["default_max_rel_diff"]}, "failures": failures}


# ---------------------------------------------------------------------- d8 shapes: throughput


def _d8_overrides(check, name: str, optimizer: str, moe: bool, seq: int = 2048, sequences: int | None = None,
                  steps: int | None = None) -> dict:
    if check.smoke:
        model = dict(SMALL_MODEL, **({"moe": SMALL_MOE} if moe else {}))
        train = {"micro_batch_size": 2, "global_batch_size": 2 if moe else 4, "steps": 2}
    else:
        # Default: 32 x 2048 = 65,536 tokens per dense step (MoE: 8 x 2048), as measured on an H200 (docs/gpu.md section 6).
        model = {"seq_length": seq}
        train = {"micro_batch_size": 8, "global_batch_size": sequences or (8 if moe else 32),
                 "steps": steps or (6 if moe else 10)}
    return check.overrides(name, model=model, optim={"name": optimizer}, monitor={"interval": 0},
                           train={**train, "precision": "bf16"})


def _throughput(check, config: str, name: str, optimizer: str, moe: bool, **shape) -> dict:
    run = check.train(config, _d8_overrides(check, name, optimizer, moe, **shape))
    cfg = run["config"]
    records = run["steps"][3:] if len(run["steps"]) > 4 else run["steps"]  # after compilation / warm-up
    step_s = statistics.median(r["step_time"] for r in records)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    shape = ModelShape.from_model_config(cfg.model, cfg.model.vocab_size or 8192)
    numbers = {"step_ms": 1e3 * step_s, "tokens_per_s": tokens_per_step / step_s, "tokens_per_step": tokens_per_step,
               "model_flops_per_token": model_flops_per_token(shape), "loss_first": run["losses"][0],
               "loss_last": run["losses"][-1], "timed_steps": len(records)}
    if check.peak_tflops:
        numbers["mfu"] = numbers["model_flops_per_token"] * numbers["tokens_per_s"] / (check.peak_tflops * 1e12)
    failures = [] if all(math.isfinite(x) for x in run["losses"]) else [f"non-finite loss: {run['losses']}"]
    return {**numbers, "failures": failures}


def _dense(check, optimizer: str) -> dict:
    numbers = _throughput(check, "configs/hyperp/dense_d8.yaml", f"dense_d8_{optimizer}", optimizer, moe=False)
    metrics = {f"dense_d8_{optimizer}_tokens_per_s": numbers["tokens_per_s"]}
    if "mfu" in numbers:
        metrics[f"dense_d8_{optimizer}_mfu"] = numbers["mfu"]
        if optimizer == "sphere_muon":
            metrics["dense_d8_mfu"] = numbers["mfu"]
    return {**numbers, "metrics": metrics}


def dense_d8_sphere_muon(check) -> dict:
    return _dense(check, "sphere_muon")


def dense_d8_muon(check) -> dict:
    return _dense(check, "muon")


def dense_d8_adamw(check) -> dict:
    return _dense(check, "adamw")


def _target(numbers: dict, failures: list, name: str, value, target: float, at_least: bool) -> None:
    """Record an issue-13 target beside its value; a missed target is a failure of the part (not on the
    CPU smoke run, which proves only that the part runs)."""
    numbers[f"target_{name}"] = target
    if value is None:
        return
    met = value >= target if at_least else value <= target
    numbers[f"target_{name}_met"] = met
    if not met and not numbers.get("smoke"):
        failures.append(f"{name} {value:.3g} {'<' if at_least else '>'} target {target}")


def dense_d8_seq4096(check) -> dict:
    """Dense d8, sphere Muon, 16 x 4096 tokens per step (issue 13: >= 50% MFU)."""
    numbers = _throughput(check, "configs/hyperp/dense_d8.yaml", "dense_d8_seq4096", "sphere_muon", moe=False,
                          seq=4096, sequences=16, steps=8)
    failures = numbers.pop("failures")
    numbers["smoke"] = check.smoke
    _target(numbers, failures, "mfu", numbers.get("mfu"), 0.50, at_least=True)
    metrics = {"dense_d8_seq4096_tokens_per_s": numbers["tokens_per_s"]}
    if "mfu" in numbers:
        metrics["dense_d8_seq4096_mfu"] = numbers["mfu"]
    return {**numbers, "metrics": metrics, "failures": failures}


def sphere_vs_adamw(check) -> dict:
    """Dense d8 at 32 x 4096 tokens per step: sphere Muon vs AdamW tokens/s (issue 13: within 5%)."""
    numbers, failures = {}, []
    for optimizer in ("sphere_muon", "adamw"):
        run = _throughput(check, "configs/hyperp/dense_d8.yaml", f"d8_32x4096_{optimizer}", optimizer, moe=False,
                          seq=4096, sequences=32, steps=6)
        failures += run.pop("failures")
        numbers.update({f"{optimizer}_{key}": run[key] for key in ("tokens_per_s", "step_ms", "mfu") if key in run})
    ratio = numbers["sphere_muon_tokens_per_s"] / numbers["adamw_tokens_per_s"]
    numbers.update(sphere_over_adamw_tokens_per_s=ratio, smoke=check.smoke)
    _target(numbers, failures, "sphere_over_adamw_tokens_per_s", ratio, 0.95, at_least=True)
    return {**numbers, "metrics": {"sphere_over_adamw_tokens_per_s_32x4096": ratio}, "failures": failures}


def moe_d8(check) -> dict:
    """MoE d8 (grouped-GEMM experts where 'auto' picks them), seq 2048 (issue 13: >= 25% MFU)."""
    numbers = _throughput(check, "configs/hyperp/moe_d8.yaml", "moe_d8", "sphere_muon", moe=True)
    failures = numbers.pop("failures")
    numbers["smoke"] = check.smoke
    _target(numbers, failures, "mfu", numbers.get("mfu"), 0.25, at_least=True)
    metrics = {"moe_d8_tokens_per_s": numbers["tokens_per_s"]}
    if "mfu" in numbers:
        metrics["moe_d8_mfu"] = numbers["mfu"]
    return {**numbers, "metrics": metrics, "failures": failures}


# ---------------------------------------------------------------------- recomputation and asynchronous saves

RECOMPUTE_MODES = {"none": {"recompute": "none"}, "selective": {"recompute": "selective"},
                   "full": {"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 1}}


class SavedActivations:
    """Peak bytes of the tensors autograd keeps for the backward pass (``saved_tensors_hooks``), parameters left
    out and each storage counted once: the activation memory that recomputation trades for compute, measured the
    same way on any device (on a GPU the part also reads the allocator's peak)."""

    def __init__(self):
        self.live: dict[int, list[int]] = {}  # storage pointer -> [saved references, bytes]
        self.current = self.peak = 0

    def pack(self, tensor):
        base = tensor if tensor._base is None else tensor._base  # a linear saves its weight as a transposed view
        if base.is_leaf and base.requires_grad:  # a parameter (or a recomputed chunk's detached input): not counted
            return tensor
        storage = tensor.untyped_storage()
        entry = self.live.setdefault(storage.data_ptr(), [0, storage.nbytes()])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        return _Saved(self, storage.data_ptr(), tensor)

    @staticmethod
    def unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]


class _Saved:
    """One saved tensor; autograd drops it when the backward no longer needs it."""

    __slots__ = ("owner", "key", "tensor")

    def __init__(self, owner: SavedActivations, key: int, tensor):
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self):
        self.owner.release(self.key)


def recompute(check) -> dict:
    """Dense d8 (sphere Muon, bf16, 8 x 2048 tokens per step; the trainer's default attention, so 'selective'
    frees little: only Megatron's unfused attention keeps scores) under ``model.recompute`` none / selective /
    full (uniform, 1 layer): peak memory, saved activations and median step time as ratios against 'none'; the
    losses must equal 'none''s (bit for bit on the CPU; on a GPU within RESUME_RTOL, reduction orders vary)."""
    numbers, failures, runs = {"smoke": check.smoke}, [], {}
    for mode, model in RECOMPUTE_MODES.items():
        overrides = _d8_overrides(check, f"recompute_{mode}", "sphere_muon", moe=False,
                                  sequences=8, steps=None if check.smoke else 8)
        overrides["model"].update(model)
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(check.device)
        saved = SavedActivations()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            run = check.train("configs/hyperp/dense_d8.yaml", overrides)
        records = run["steps"][2:] if len(run["steps"]) > 3 else run["steps"]  # after warm-up
        derived = json.loads((Path(run["config"].logging.run_dir) / "derived.json").read_text())
        runs[mode] = {"losses": run["losses"], "saved_gib": saved.peak / 2**30,
                      "step_ms": 1e3 * statistics.median(r["step_time"] for r in records),
                      "estimated_activations_gib": derived["memory_gib"]["activations"]}
        if check.device.type == "cuda":
            runs[mode]["peak_mem_gib"] = torch.cuda.max_memory_allocated(check.device) / 2**30
    metrics = {}
    for mode, run in runs.items():
        numbers.update({f"{mode}_{key}": value for key, value in run.items() if key != "losses"})
        for key in ("saved_gib", "step_ms", "peak_mem_gib", "estimated_activations_gib"):
            if key in run and mode != "none":
                ratio = run[key] / runs["none"][key]
                numbers[f"{mode}_{key}_vs_none"] = metrics[f"recompute_{mode}_{key}_vs_none"] = ratio
        reference = runs["none"]["losses"]
        worst = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], reference))
        numbers[f"{mode}_loss_max_rel_diff"] = worst
        equal = run["losses"] == reference if check.device.type == "cpu" else worst <= RESUME_RTOL
        if len(run["losses"]) != len(reference) or not equal:
            failures.append(f"{mode}: losses differ from 'none' (max rel diff {worst:.2e})")
    if not runs["full"]["saved_gib"] < runs["none"]["saved_gib"]:
        failures.append(f"full recompute kept {runs['full']['saved_gib']:.3g} GiB of activations, not less than "
                        f"none's {runs['none']['saved_gib']:.3g}")
    return {**numbers, "metrics": metrics, "failures": failures}


def async_save(check) -> dict:
    """The step loop's stall for a checkpoint: a synchronous save (``checkpoint.save``) vs an asynchronous one
    (``checkpoint.AsyncSaver``: the loop is blocked while the save starts, in each step's poll, which also
    publishes (manifest checksums, rename) once the writer has finished, and in any wait for the previous save).
    Dense d8, sphere Muon with the distributed optimizer, bf16; the trainer's own session and step function, a
    save every ``interval`` steps. Every checkpoint must verify; ratio = async stall / sync stall per save."""
    from megatron.core import parallel_state

    from hyperp_megatron import checkpoint as ckpt
    from hyperp_megatron import train as trainer
    from hyperp_megatron.config import load_config, validate

    interval, saves = (2, 2) if check.smoke else (5, 3)
    overrides = _d8_overrides(check, "async_save", "sphere_muon", moe=False, sequences=8)
    cfg = load_config(REPO / "configs/hyperp/dense_d8.yaml", overrides)
    validate(cfg, 1)
    s = trainer.setup(cfg, 1, 0, check.device)
    numbers, failures = {"smoke": check.smoke, "interval": interval, "saves": saves}, []
    try:
        data = trainer._train_iterator(s, 0)
        s.runner.train_step(data)  # warm-up, and the optimizer state exists before the first save
        # One untimed save of each kind: the writer's helper processes start once per process (the first save).
        warm_up = Path(cfg.logging.run_dir) / "checkpoints_warm_up"
        ckpt.save(warm_up, ckpt.TrainState(step=1), s.model_chunks, s.optimizer, {}, keep=1, log=lambda line: None)
        saver = ckpt.AsyncSaver(log=lambda line: None)
        saver.save(warm_up, ckpt.TrainState(step=2), s.model_chunks, s.optimizer, {}, keep=1)
        saver.close()
        for mode in ("sync", "async"):
            root = Path(cfg.logging.run_dir) / f"checkpoints_{mode}"
            saver = ckpt.AsyncSaver(log=lambda line: None) if mode == "async" else None
            stall, step_times = 0.0, []
            for step in range(1, interval * saves + 1):
                check.synchronize()
                started = time.perf_counter()
                if saver is not None:
                    saver.poll()
                stall += time.perf_counter() - started
                started = time.perf_counter()
                s.runner.train_step(data)
                check.synchronize()
                step_times.append(time.perf_counter() - started)
                if step % interval == 0:
                    started = time.perf_counter()
                    state = ckpt.TrainState(step=step)
                    if saver is None:
                        ckpt.save(root, state, s.model_chunks, s.optimizer, {}, keep=0, log=lambda line: None)
                    else:
                        saver.save(root, state, s.model_chunks, s.optimizer, {}, keep=0)
                    check.synchronize()
                    stall += time.perf_counter() - started
            started = time.perf_counter()
            if saver is not None:
                saver.close()  # the end of training waits for the last save
            numbers[f"{mode}_end_wait_s"] = time.perf_counter() - started
            numbers[f"{mode}_stall_per_save_s"] = stall / saves
            numbers[f"{mode}_median_step_s"] = statistics.median(step_times)
            complete = ckpt.complete_checkpoints(root)
            problems = [f"{p.name}: {ckpt.verify(p)}" for p in complete if ckpt.verify(p) is not None]
            if len(complete) != saves or problems or (root / ckpt.LATEST).read_text().strip() != complete[0].name:
                failures.append(f"{mode}: {len(complete)} of {saves} checkpoints complete {problems}")
            numbers[f"{mode}_checkpoint_mib"] = sum(f.stat().st_size for f in complete[0].rglob("*")) / 2**20
    finally:
        s.logger.close()
        parallel_state.destroy_model_parallel()
    ratio = numbers["async_stall_per_save_s"] / numbers["sync_stall_per_save_s"]
    numbers["async_over_sync_stall"] = ratio
    if not math.isfinite(ratio):
        failures.append(f"stall ratio {ratio}")
    return {**numbers, "failures": failures,
            "metrics": {"async_over_sync_stall": ratio, "sync_save_stall_s": numbers["sync_stall_per_save_s"]}}


# ---------------------------------------------------------------------- optimizer and Newton-Schulz alone


def _hidden_matrices(check) -> list[tuple[int, int]]:
    """The 32 hidden matrices of d8 (fused QKV, fused gate+up fc1): 142.6M parameters."""
    layers, width, heads, groups, head_dim, ffn = (2, 64, 4, 2, 16, 256) if check.smoke else (8, 1024, 16, 4, 128, 4096)
    per_layer = [((heads + 2 * groups) * head_dim, width), (width, heads * head_dim), (2 * ffn, width), (width, ffn)]
    return per_layer * layers


def optimizer_step(check) -> dict:
    """One optimizer step on the d8 hidden matrices with fixed gradients, interleaved rounds, median."""
    from hyperp_megatron.optim import ParamLayout, SphereMuon

    generator = torch.Generator().manual_seed(0)
    shapes = _hidden_matrices(check)
    weights = [((torch.rand(m, n, generator=generator) * 2 - 1) / math.sqrt(n)).to(check.device) for m, n in shapes]
    grads = [(torch.randn(m, n, generator=generator) * 1e-3).to(check.device) for m, n in shapes]

    def params():
        tensors = [torch.nn.Parameter(w.clone()) for w in weights]
        for tensor, grad in zip(tensors, grads):
            tensor.grad = grad.clone()
        return tensors

    def sphere(rule, dtype):
        tensors = params()
        return SphereMuon(tensors, {t: ParamLayout(rule) for t in tensors}, lr=0.02, ns_compute_dtype=dtype)

    optimizers = {"sphere_fp32_ns": sphere("sphere_muon", None),
                  "sphere_bf16_ns": sphere("sphere_muon", torch.bfloat16),
                  "muon_bf16_ns": sphere("muon", torch.bfloat16),
                  "torch_muon": torch.optim.Muon(params(), lr=0.02, weight_decay=0.0),
                  "torch_adamw": torch.optim.AdamW(params(), lr=0.02, betas=(0.9, 0.95), weight_decay=0.0)}
    repeats = 2 if check.smoke else 10
    times = {name: [] for name in optimizers}
    for round_index in range(2 + repeats):
        for name, optimizer in optimizers.items():
            seconds = check.time_cuda(optimizer.step, repeats=1, warmup=0)
            if round_index >= 2:
                times[name].append(seconds)
    ms = {f"{name}_ms": 1e3 * statistics.median(values) for name, values in times.items()}
    ratio = ms["sphere_bf16_ns_ms"] / ms["torch_muon_ms"]
    numbers = {**ms, "params_m": sum(m * n for m, n in shapes) / 1e6, "sphere_step_vs_torch_muon": ratio,
               "smoke": check.smoke}
    failures = []
    _target(numbers, failures, "sphere_step_vs_torch_muon", ratio, 1.1, at_least=False)
    return {**numbers, "failures": failures,
            "metrics": {"sphere_step_vs_torch_muon": ratio, "sphere_step_bf16_ms": ms["sphere_bf16_ns_ms"]}}


def newton_schulz(check) -> dict:
    """NS5 on an 8192 x 1024 matrix (bf16 and fp32 iterations) vs a square bf16 matmul, in TFLOP/s."""
    from hyperp_megatron.optim import newton_schulz5

    rows, cols, size = (256, 64, 256) if check.smoke else (8192, 1024, 8192)
    repeats = 2 if check.smoke else 20
    update = torch.randn(rows, cols, device=check.device)
    short, long = min(rows, cols), max(rows, cols)
    ns_flops = 5 * (4 * short * short * long + 2 * short**3)  # 5 iterations of A = X X^T, B = bA + cA^2, BX
    ns_bf16 = check.time_cuda(lambda: newton_schulz5(update, compute_dtype=torch.bfloat16), repeats)
    torch.set_float32_matmul_precision("highest")  # fp32 iterations with TF32 off (a trainer run may have set it)
    ns_fp32 = check.time_cuda(lambda: newton_schulz5(update), repeats)
    a = torch.randn(size, size, device=check.device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=check.device, dtype=torch.bfloat16)
    matmul = check.time_cuda(lambda: a @ b, repeats)
    tflops = {"ns_bf16_tflops": ns_flops / ns_bf16 / 1e12, "ns_fp32_tflops": ns_flops / ns_fp32 / 1e12,
              "matmul_bf16_tflops": 2 * size**3 / matmul / 1e12}
    ratio = tflops["ns_bf16_tflops"] / tflops["matmul_bf16_tflops"]
    numbers, failures = {**tflops, "ns_bf16_ms": 1e3 * ns_bf16, "ns_bf16_vs_matmul": ratio, "smoke": check.smoke}, []
    _target(numbers, failures, "ns_bf16_vs_matmul", ratio, 0.7, at_least=True)
    return {**numbers, "failures": failures,
            "metrics": {"ns_bf16_vs_matmul": ratio, "matmul_bf16_tflops": tflops["matmul_bf16_tflops"]}}


def attention_experts(check) -> dict:
    """``bench/attention_experts_bench.py``: SDPA vs Megatron's local attention, grouped vs sequential
    experts (smoke: its small shapes in fp32)."""
    from attention_experts_bench import run

    result = run(str(check.device), "fp32" if check.smoke else "bf16", small=check.smoke,
                 repeats=2 if check.smoke else 5)
    errors = [f"{name}: {part['error']}" for name, part in result["parts"].items() if "error" in part]
    numbers = {f"{name}_{key}": value for name, part in result["parts"].items() for key, value in part.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {**numbers, "metrics": result["metrics"], "failures": errors}


# ---------------------------------------------------------------------- unit tests


def unit_tests(check) -> dict:
    """The single-process unit tests, in a child process (its own Megatron state)."""
    files = ["tests/test_transfer.py"] if check.smoke else UNIT_TESTS
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", summary)}
    failures = [] if proc.returncode == 0 else [f"pytest exit {proc.returncode}: {summary or proc.stderr[-500:]}"]
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0), "skipped": counts.get("skipped", 0),
            "files": len(files), "metrics": {"unit_tests_passed": counts.get("passed", 0)}, "failures": failures}


# ---------------------------------------------------------------------- science: the logit-capacity micro-study

SCIENCE_WIDTHS = (256, 512)
SCIENCE_SMOKE_WIDTHS = (32, 64)
SCIENCE_LRS = (0.05, 0.1, 0.2)
SCIENCE_VOCAB = 32768
SCIENCE_STEPS = 240


def science_micro(check) -> dict:
    """Issue 24's GPU micro-study: the science base point's unmodified recipe (d 4, attention width 2C, FFN 4C,
    sequence 128, batch 16, 240 steps, output init std 0.02, every HyperP rule on) at C 256 and 512 with a 32k
    vocabulary, at 3 base LRs. On the CPU the optimum fell with width (C 32 -> 128, slope about -0.8) while at
    constant logit capacity (output std x C fixed) it was flat; at these widths 0.02 C is 5-10, so the
    transfer rule predicts the optimum stays near the base point's (~0.1) if capacity was the cause.
    ``val_loss`` per LR and the fitted optimum per width (bench/results/science/REPORT.md has the CPU side)."""
    from hyperp_megatron.science.fit import fit_optimum

    widths = SCIENCE_SMOKE_WIDTHS if check.smoke else SCIENCE_WIDTHS
    numbers, metrics, failures = {"widths": list(widths), "base_lrs": list(SCIENCE_LRS), "vocab": SCIENCE_VOCAB}, {}, []
    for width in widths:
        losses = {}
        for lr in SCIENCE_LRS:
            model = {"hidden_size": width, "num_attention_heads": 8, "num_query_groups": 4, "head_dim": width // 4,
                     "ffn_hidden_size": 4 * width, "vocab_size": SCIENCE_VOCAB}
            run = check.train("configs/science/base.yaml", check.overrides(
                f"science_C{width}_lr{lr:g}", model=model, hyperp={"base_lr": lr},
                train={"steps": _steps(check, SCIENCE_STEPS), "eval_iters": 2 if check.smoke else 8,
                       "precision": "bf16" if check.device.type == "cuda" else "fp32"},
                monitor={"interval": 0}))
            losses[lr] = run["val_loss"]
            if run["val_loss"] is None or not math.isfinite(run["val_loss"]):
                failures.append(f"C{width} lr {lr}: val_loss {run['val_loss']}")
        numbers[f"C{width}_val_loss"] = {f"{lr:g}": loss for lr, loss in losses.items()}
        finite = {lr: [loss] for lr, loss in losses.items() if loss is not None and math.isfinite(loss)}
        if len(finite) == len(SCIENCE_LRS):
            optimum = fit_optimum(finite, window=3)
            numbers[f"C{width}_lr_opt"], numbers[f"C{width}_at_edge"] = optimum.lr, optimum.at_edge
            metrics[f"science_C{width}_lr_opt"] = optimum.lr
            metrics[f"science_C{width}_best_val_loss"] = min(finite.values())[0]
    return {**numbers, "metrics": metrics, "failures": failures}


PARTS = {fn.__name__: fn for fn in (tiny_fp32, tiny_bf16, checkpoint_resume, dense_d8_seq4096, sphere_vs_adamw,
                                     moe_d8, recompute, async_save, optimizer_step, newton_schulz, attention_experts, dense_d8_sphere_muon,
                                     dense_d8_muon, dense_d8_adamw, unit_tests, science_micro)}
"""Run in this order; the first ones matter most when the time budget runs out (the issue-13 targets come
before the seq-2048 comparisons with docs/gpu.md section 6)."""
