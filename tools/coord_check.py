"""Coordinate check of the HyperP parameterization against a standard-parameterization control.

Usage:
    python tools/coord_check.py                                   # writes bench/results/coord_check/
    python tools/coord_check.py --steps 5 --widths 64 128 256 --depths 2 4 8
    python tools/coord_check.py --sweeps hyperp standard --lr hyperp=0.01 --depths --out-dir /tmp/cc

Trains each model of each sweep for a few steps at a fixed LR in this process (a gloo world of one
process, CPU or one GPU), measures activation RMS per layer and branch, fits log RMS vs log width
(and depth), and writes coord_check.json and coord_check.png. Exit status 0 when HyperP passes and the
controls fail.

A parameterization transfers hyperparameters across width when the size of every activation
"coordinate" stays the same as the model widens, not only at initialization but after the first
updates at a fixed learning rate (Yang et al., "Tensor Programs V", arXiv 2203.03466, section 8).
Here each model of a sweep is trained for a few steps by the real trainer (``train.setup`` and its
step runner, the optimizer of ``optim.name``) and forward hooks measure, per layer and per step:

- ``attn_branch``: the attention branch as added to the residual stream (after the ``1/sqrt(2d)``
  multiplier), measured as residual-after-attention minus layer input;
- ``mlp_branch``: the MLP branch as added to the residual stream (after the multiplier);
- ``residual``: the residual stream at the layer output;
- ``logits``: the output layer's logits (after the Muon baseline's multiplier, if any).

Each value is an RMS ``sqrt(mean(x^2))``, pooled over layers, micro-batches and tokens. Step ``t``
is the forward pass after ``t`` optimizer updates (``t = 0`` at initialization).

Flatness statistic: the least-squares slope of ``log RMS`` against ``log width`` (at fixed depth)
and against ``log depth`` (at fixed width) at the last step, per quantity. Predicted slopes: 0 in
width for the branches and the residual stream; ``+1/2`` in width for the logits, because the
spec's output layer is ``N(0, 0.02^2)`` whatever the width and has no multiplier, so initial logits
have RMS ``0.02 sqrt(C)`` (HyperP does not make logits width-flat; the check asks that training keeps
that exponent); in depth ``-1/2`` for the branches (each of the ``2d`` branches adds ``1/sqrt(2d)``)
and 0 for the residual stream and the logits. A sweep passes when every slope is within
``threshold`` of its prediction.

``run_coord_check`` needs ``torch.distributed`` initialized with one process (gloo on the CPU, NCCL on a
GPU); ``main`` does that.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hyperp_megatron.config import Config, ParallelConfig, load_config, merge_dicts  # noqa: E402
from hyperp_megatron.model.params import unwrap  # noqa: E402

QUANTITIES = ("attn_branch", "mlp_branch", "residual", "logits")
BRANCHES = ("attn_branch", "mlp_branch")


@dataclass
class Sweep:
    """One parameterization (config overrides) to sweep across widths and depths."""

    label: str
    """Name in the report and the plot."""
    overrides: dict
    """Config overrides (nested dict) on top of the check's model family and batch settings."""
    expect_flat: bool
    """True for HyperP; False for the controls, which the check must reject."""


SWEEPS = {
    "hyperp": Sweep("hyperp", {"model": {"parameterization": "hyperp"},
                               "optim": {"name": "sphere_muon", "lr": 0.02}}, expect_flat=True),
    "standard": Sweep("standard", {"model": {"parameterization": "standard"},
                                   "optim": {"name": "adamw", "lr": 1e-2}}, expect_flat=False),
    "hyperp_adamw": Sweep("hyperp_adamw", {"model": {"parameterization": "hyperp"},
                                           "optim": {"name": "adamw", "lr": 3e-3}}, expect_flat=False),
}
"""``hyperp``: the method (sphere init, multipliers, sphere Muon with eta an angle).
``standard``: negative control, Megatron's init (N(0, 0.02^2)), no multipliers, softmax 1/sqrt(hd),
AdamW at a larger LR. ``hyperp_adamw``: ablation, HyperP's init and multipliers with AdamW at a
width-independent LR, whose updates grow with fan-in (muP scales Adam's hidden LR by 1/width)."""


@dataclass
class CoordCheckSettings:
    """The model family and the measurement."""

    widths: list[int] = field(default_factory=lambda: [64, 128, 256])
    """Hidden sizes of the width sweep (at ``base_depth``)."""
    depths: list[int] = field(default_factory=lambda: [2, 4, 8])
    """Depths of the depth sweep (at ``base_width``); empty skips it."""
    base_width: int = 128
    base_depth: int = 4
    head_dim: int = 32
    """Fixed head dimension: heads = width / head_dim, KV groups = heads / 2 (at least 1)."""
    steps: int = 5
    """Optimizer updates at the fixed LR (``steps + 1`` forwards are measured)."""
    seq_length: int = 64
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1234
    threshold: float = 0.2
    """Largest allowed |slope - predicted slope| of log RMS vs log width (or depth)."""
    data_cache_dir: str = "data"
    """The trainer's ``data.cache_dir`` (embedded corpus and tokenizer)."""

    def __post_init__(self):
        if len(self.widths) < 2:
            raise ValueError("the coord check needs at least two widths")
        if len(self.depths) == 1:
            raise ValueError("the depth sweep needs at least two depths (or none)")
        for width in [*self.widths, self.base_width]:
            if width % self.head_dim:
                raise ValueError(f"width {width} is not a multiple of head_dim {self.head_dim}")
        if self.steps < 1 or self.threshold <= 0:
            raise ValueError("steps must be >= 1 and threshold > 0")


def run_config(settings: CoordCheckSettings, sweep: Sweep, width: int, depth: int, run_dir: Path) -> Config:
    """The trainer config of one model of a sweep (single process, fixed LR, no eval, no checkpoints)."""
    heads = width // settings.head_dim
    family = {
        "model": {"num_layers": depth, "hidden_size": width, "num_attention_heads": heads,
                  "num_query_groups": max(1, heads // 2), "head_dim": settings.head_dim,
                  "seq_length": settings.seq_length},
        "data": {"cache_dir": settings.data_cache_dir},
        "train": {"steps": settings.steps + 1, "micro_batch_size": settings.micro_batch_size,
                  "global_batch_size": settings.global_batch_size, "seed": settings.seed,
                  "eval_interval": 0, "eval_iters": 1},
        "optim": {"min_lr_ratio": 1.0, "warmup_steps": 0},
        "logging": {"run_dir": str(run_dir), "tensorboard": False, "progress": False},
        "checkpoint": {"save_final": False, "resume": False},
    }
    return load_config(None, merge_dicts(family, sweep.overrides))


class ActivationRecorder:
    """Forward hooks accumulating sum(x^2) and numel per (quantity, layer) until :meth:`pop`."""

    def __init__(self, gpt: torch.nn.Module):
        self._sums: dict[tuple[str, int], list[float]] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles = []
        for i, layer in enumerate(gpt.decoder.layers):
            self._handles += [
                layer.input_layernorm.register_forward_pre_hook(self._layer_input(i)),
                layer.pre_mlp_layernorm.register_forward_pre_hook(self._after_attention(i)),
                layer.register_forward_hook(self._layer_output(i)),
            ]
        if getattr(gpt, "output_layer", None) is not None:
            self._handles.append(gpt.output_layer.register_forward_hook(
                lambda module, args, output: self._add("logits", 0, output[0])))

    def _add(self, quantity: str, layer: int, x: torch.Tensor) -> None:
        total = self._sums.setdefault((quantity, layer), [0.0, 0])
        total[0] += float(x.detach().float().pow(2).sum())
        total[1] += x.numel()

    def _layer_input(self, i):
        def hook(module, args):
            self._inputs[i] = args[0].detach()
        return hook

    def _after_attention(self, i):
        def hook(module, args):
            mid = args[0].detach()
            self._add("attn_branch", i, mid - self._inputs[i])
            self._inputs[i] = mid
        return hook

    def _layer_output(self, i):
        def hook(module, args, output):
            out = output[0].detach()
            self._add("mlp_branch", i, out - self._inputs.pop(i))
            self._add("residual", i, out)
        return hook

    def pop(self) -> dict[str, list[float]]:
        """Per quantity, the RMS of each layer (one entry for the logits) since the last pop."""
        rms: dict[str, list[float]] = {q: [] for q in QUANTITIES}
        for (quantity, _), (sum_sq, count) in sorted(self._sums.items()):
            rms[quantity].append(math.sqrt(sum_sq / count))
        self._sums = {}
        return rms

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def measure(cfg: Config) -> dict:
    """Train ``cfg.train.steps`` steps at the fixed ``optim.lr``; per step, the per-layer RMS of each
    quantity (``rms[step][quantity][layer]``) and the loss. Leaves Megatron's parallel state destroyed."""
    from megatron.core import parallel_state

    from hyperp_megatron.data.datasets import build_data_iterator
    from hyperp_megatron.optim.builder import set_learning_rate
    from hyperp_megatron.train import setup

    session = setup(cfg, world_size=1, rank=0)
    try:
        recorder = ActivationRecorder(unwrap(session.model_chunks[0]))
        batches = build_data_iterator(session.datasets.train, consumed_samples=0,
                                      micro_batch_size=cfg.train.micro_batch_size, dp_rank=0, dp_size=1)
        rms, losses = [], []
        for _ in range(session.derived.steps):
            set_learning_rate(session.optimizer, session.derived.lr)
            losses.append(session.runner.train_step(batches)["loss"])
            rms.append(recorder.pop())
        recorder.remove()
        session.logger.close()
    finally:
        parallel_state.destroy_model_parallel()
    return {"rms": rms, "loss": losses}


def pooled(rms_per_layer: list[float]) -> float:
    """RMS over all layers (equal token counts per layer)."""
    return math.sqrt(sum(r * r for r in rms_per_layer) / len(rms_per_layer))


def log_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def predicted_slope(axis: str, quantity: str) -> float:
    """The exponent HyperP predicts (module docstring): flat in width except the fixed-std readout's
    logits ~ C^1/2; branches ~ d^-1/2 and the rest flat in depth."""
    if axis == "width":
        return 0.5 if quantity == "logits" else 0.0
    return -0.5 if quantity in BRANCHES else 0.0


def flatness(runs: dict[int, dict], axis: str, threshold: float) -> dict:
    """Per quantity, the slope of log RMS vs log(width or depth) at the last step, and whether it passes."""
    sizes = sorted(runs)
    out = {}
    for quantity in QUANTITIES:
        values = [pooled(runs[size]["rms"][-1][quantity]) for size in sizes]
        slope = log_slope(sizes, values)
        predicted = predicted_slope(axis, quantity)
        out[quantity] = {"slope": slope, "predicted": predicted,
                         "passed": abs(slope - predicted) <= threshold}
    return out


def run_sweep(settings: CoordCheckSettings, sweep: Sweep, work_dir: Path, log=print) -> dict:
    """Measure every model of ``sweep`` (widths at the base depth, depths at the base width)."""
    axes = {"width": {w: (w, settings.base_depth) for w in settings.widths},
            "depth": {d: (settings.base_width, d) for d in settings.depths}}
    measured: dict[tuple[int, int], dict] = {}
    result: dict = {"label": sweep.label, "overrides": sweep.overrides}
    for axis, points in axes.items():
        runs = {}
        for size, (width, depth) in points.items():
            if (width, depth) not in measured:
                cfg = run_config(settings, sweep, width, depth, work_dir / f"{sweep.label}_w{width}_d{depth}")
                measured[width, depth] = measure(cfg)
                log(f"[coord_check] {sweep.label} width {width} depth {depth}: loss "
                    + " ".join(f"{x:.3f}" for x in measured[width, depth]["loss"]))
            runs[size] = measured[width, depth]
        result[axis] = {"runs": {str(k): v for k, v in runs.items()}}
        if len(runs) > 1:
            result[axis]["flatness"] = flatness(runs, axis, settings.threshold)
    result["passed"] = all(check["passed"] for axis in axes if "flatness" in result[axis]
                           for check in result[axis]["flatness"].values())
    result["expect_flat"] = sweep.expect_flat
    return result


def run_coord_check(settings: CoordCheckSettings, sweeps: list[Sweep], work_dir: Path, log=print) -> dict:
    """Every sweep; the report that :func:`write_report` saves. ``report["as_expected"]``: HyperP
    sweeps pass and controls fail."""
    results = [run_sweep(settings, sweep, Path(work_dir), log) for sweep in sweeps]
    return {"settings": dataclasses.asdict(settings), "quantities": list(QUANTITIES), "sweeps": results,
            "as_expected": all(r["passed"] == r["expect_flat"] for r in results)}


def plot(report: dict, path: Path) -> None:
    """One row per (sweep, axis), one column per quantity: pooled RMS vs size, one line per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(s, axis) for s in report["sweeps"] for axis in ("width", "depth") if "flatness" in s[axis]]
    fig, axes = plt.subplots(len(rows), len(QUANTITIES), figsize=(4 * len(QUANTITIES), 3 * len(rows)),
                             squeeze=False)
    for row, (sweep, axis) in zip(axes, rows):
        runs = {int(k): v for k, v in sweep[axis]["runs"].items()}
        sizes = sorted(runs)
        num_steps = len(runs[sizes[0]]["rms"])
        colors = plt.cm.viridis([t / max(num_steps - 1, 1) for t in range(num_steps)])
        for ax, quantity in zip(row, QUANTITIES):
            values = [[pooled(runs[s]["rms"][step][quantity]) for s in sizes] for step in range(num_steps)]
            for step in range(num_steps):
                ax.plot(sizes, values[step], "o-", color=colors[step], label=f"step {step}")
            # At least a decade on every y axis, so that flat curves look flat.
            low, high = min(map(min, values)), max(map(max, values))
            pad = max(1.2, math.sqrt(10 * low / high))
            ax.set_ylim(low / pad, high * pad)
            check = sweep[axis]["flatness"][quantity]
            verdict = "ok" if check["passed"] else "FAIL"
            ax.set(xscale="log", yscale="log", xlabel=axis,
                   title=f"{sweep['label']}: {quantity}\nslope {check['slope']:+.2f} "
                         f"(pred. {check['predicted']:+.1f}) {verdict}")
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.minorticks_off()
        row[0].set_ylabel("RMS")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def summary_lines(report: dict) -> list[str]:
    """One line per sweep and axis: the slope of each quantity and the verdict."""
    lines = []
    for sweep in report["sweeps"]:
        for axis in ("width", "depth"):
            if "flatness" not in sweep[axis]:
                continue
            checks = sweep[axis]["flatness"]
            slopes = " ".join(f"{q} {c['slope']:+.3f}" for q, c in checks.items())
            verdict = "pass" if all(c["passed"] for c in checks.values()) else "FAIL"
            expected = "flat" if sweep["expect_flat"] else "not flat"
            lines.append(f"{sweep['label']:>12} {axis:>5}: {slopes} -> {verdict} (expected {expected})")
    return lines


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """``coord_check.json`` and ``coord_check.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "coord_check.json", out_dir / "coord_check.png"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, png_path)
    return json_path, png_path


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = CoordCheckSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results/coord_check"))
    parser.add_argument("--widths", type=int, nargs="+", default=d.widths)
    parser.add_argument("--depths", type=int, nargs="*", default=d.depths, help="none: skip the depth sweep")
    parser.add_argument("--base-width", type=int, default=d.base_width, help="width of the depth sweep")
    parser.add_argument("--base-depth", type=int, default=d.base_depth, help="depth of the width sweep")
    parser.add_argument("--head-dim", type=int, default=d.head_dim)
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer updates at the fixed LR")
    parser.add_argument("--seq-length", type=int, default=d.seq_length)
    parser.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    parser.add_argument("--global-batch-size", type=int, default=d.global_batch_size)
    parser.add_argument("--threshold", type=float, default=d.threshold, help="max |slope - predicted|")
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=list(SWEEPS),
                        help="hyperp (expected flat); standard and hyperp_adamw (controls, expected not flat)")
    parser.add_argument("--lr", nargs="+", default=[], metavar="SWEEP=LR",
                        help="override a sweep's fixed LR, e.g. hyperp=0.01 standard=0.003")
    parser.add_argument("--data-cache-dir", default=d.data_cache_dir)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: all cores)")
    return parser.parse_args(argv)


def with_lr(sweep: Sweep, items: list[str]) -> Sweep:
    """``sweep`` with the LR of a matching ``SWEEP=LR`` item, if any."""
    for item in items:
        label, _, value = item.partition("=")
        if label not in SWEEPS:
            raise ValueError(f"--lr {item!r}: expected SWEEP=LR with SWEEP one of {', '.join(SWEEPS)}")
        if label == sweep.label:
            overrides = merge_dicts(sweep.overrides, {"optim": {"lr": float(value)}})
            return Sweep(sweep.label, overrides, sweep.expect_flat)
    return sweep


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")  # megatron-core's import-time warnings about optional GPU packages
    args = parse_args(argv)
    try:
        settings = CoordCheckSettings(
            widths=args.widths, depths=args.depths, base_width=args.base_width, base_depth=args.base_depth,
            head_dim=args.head_dim, steps=args.steps, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
            threshold=args.threshold, data_cache_dir=args.data_cache_dir)
    except ValueError as error:
        sys.exit(f"error: {error}")
    try:
        sweeps = [with_lr(SWEEPS[label], args.lr) for label in args.sweeps]
    except ValueError as error:
        sys.exit(f"error: {error}")

    from hyperp_megatron.parallel import destroy, discover_launch_env, init_process_group

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = discover_launch_env({key: value for key, value in os.environ.items() if key == "MASTER_PORT"})
    # The device: a GPU when CUDA is available, else the CPU; the trainer's setup applies what compat it needs.
    init_process_group(env, ParallelConfig())
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="coord_check_") as work_dir:
            report = run_coord_check(settings, sweeps, Path(work_dir))
    finally:
        destroy()
    report["command"] = "python tools/coord_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report["seconds"] = round(time.perf_counter() - started, 1)
    json_path, png_path = write_report(report, args.out_dir)
    print("\n".join(summary_lines(report)))
    print(f"wrote {json_path} and {png_path} in {report['seconds']} s")
    return 0 if report["as_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
