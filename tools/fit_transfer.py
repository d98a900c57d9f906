"""Fit a sweep's results and write the report: bench/results/science/{REPORT.md, claims.json, optima.json, *.png}.

    python tools/fit_transfer.py --spec sweeps/science.yaml --results /work/science/results \
        --out bench/results/science

Works on partial results (every verdict names its missing runs). Per scale: a quadratic in log(LR) of the final
validation loss, its argmin and uncertainty (bootstrap over seeds, or leave-one-out); across scales: power laws
of the optimum (depth, width, tokens, MoE granularity), loss-vs-compute laws and the HyperP / Muon compute
multiplier, the stability indicators, and the output-layer norm of the optimal runs (issue 17).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hyperp_megatron.science import report, sweep  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--out", default=str(REPO / "bench/results/science"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = sweep.load_spec(args.spec)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not Path(args.results).is_dir():
        print(f"error: results folder not found: {args.results}", file=sys.stderr)
        return 2
    analysis = report.analyze(spec, args.results)
    commands = {
        "the sweep (resumable)": f"python tools/lr_sweep.py run --spec {args.spec} --results {args.results} --jobs 2",
        "this report": f"python tools/fit_transfer.py --spec {args.spec} --results {args.results} --out {args.out}",
    }
    path = report.write(analysis, args.out, commands)
    for claim, verdict in analysis.verdicts.items():
        print(f"{claim:14s} {verdict.verdict:14s} {verdict.why}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
