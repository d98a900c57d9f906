"""Coordinate check of the HyperP parameterization against a standard-parameterization control.

Usage:
    python tools/coord_check.py                                   # writes bench/results/coord_check/
    python tools/coord_check.py --steps 5 --widths 64 128 256 --depths 2 4 8
    python tools/coord_check.py --sweeps hyperp standard --lr hyperp=0.01 --depths --out-dir /tmp/cc

Trains each model of each sweep for a few steps at a fixed LR in this process (a gloo world of one
process, CPU or one GPU), measures activation RMS per layer and branch, fits log RMS vs log width
(and depth), and writes coord_check.json and coord_check.png. See hyperp_megatron/coord_check.py for
the quantities and the flatness statistic. Exit status 0 when HyperP passes and the controls fail.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from hyperp_megatron import coord_check as cc  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = cc.CoordCheckSettings()
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
    parser.add_argument("--sweeps", nargs="+", default=list(cc.SWEEPS), choices=list(cc.SWEEPS),
                        help="hyperp (expected flat); standard and hyperp_adamw (controls, expected not flat)")
    parser.add_argument("--lr", nargs="+", default=[], metavar="SWEEP=LR",
                        help="override a sweep's fixed LR, e.g. hyperp=0.01 standard=0.003")
    parser.add_argument("--data-cache-dir", default=d.data_cache_dir)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: all cores)")
    return parser.parse_args(argv)


def with_lr(sweep: cc.Sweep, items: list[str]) -> cc.Sweep:
    """``sweep`` with the LR of a matching ``SWEEP=LR`` item, if any."""
    for item in items:
        label, _, value = item.partition("=")
        if label not in cc.SWEEPS:
            raise ValueError(f"--lr {item!r}: expected SWEEP=LR with SWEEP one of {', '.join(cc.SWEEPS)}")
        if label == sweep.label:
            lr = cc.merge_overrides(sweep.overrides, {"optim": {"lr": float(value)}})
            return cc.Sweep(sweep.label, lr, sweep.expect_flat)
    return sweep


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = cc.CoordCheckSettings(
            widths=args.widths, depths=args.depths, base_width=args.base_width, base_depth=args.base_depth,
            head_dim=args.head_dim, steps=args.steps, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
            threshold=args.threshold, data_cache_dir=args.data_cache_dir)
    except ValueError as error:
        sys.exit(f"error: {error}")
    try:
        sweeps = [with_lr(cc.SWEEPS[label], args.lr) for label in args.sweeps]
    except ValueError as error:
        sys.exit(f"error: {error}")

    import torch

    from hyperp_megatron.compat import apply_cpu_patches
    from hyperp_megatron.config import ParallelConfig
    from hyperp_megatron.parallel import destroy, discover_launch_env, init_process_group

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    apply_cpu_patches()
    env = discover_launch_env({key: value for key, value in os.environ.items() if key == "MASTER_PORT"})
    init_process_group(env, ParallelConfig())
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="coord_check_") as work_dir:
            report = cc.run_coord_check(settings, sweeps, Path(work_dir))
    finally:
        destroy()
    report["command"] = "python tools/coord_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report["seconds"] = round(time.perf_counter() - started, 1)
    json_path, png_path = cc.write_report(report, args.out_dir)
    print("\n".join(cc.summary_lines(report)))
    print(f"wrote {json_path} and {png_path} in {report['seconds']} s")
    return 0 if report["as_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
