"""The README's main job and its AdamW comparison, timed; writes ``bench/results/main_job.json``.

Usage (from the repository root, after ``bash tools/setup.sh``)::

    python bench/main_job.py                  # both runs, 200 steps each (~25 min on 2 idle cores)
    python bench/main_job.py --steps 20 --out /tmp/main_job.json    # a quick check of the script

Runs, one after the other, each in a fresh run directory under ``runs/bench/`` (so nothing resumes):

- ``sphere_muon``: exactly the README's command
  ``torchrun --standalone --nproc-per-node 2 -m hyperp_megatron.train --config configs/tiny.yaml``
  (only ``--logging.run_dir`` added);
- ``adamw``: the same with ``--optim.name adamw --optim.lr 3e-3`` (the AdamW LR of
  ``bench/results/tiny_lr_sweep.json``).

Recorded per run: the validation curve (step 0 and every ``train.eval_interval`` steps), the last train
loss, the wall time of the whole command (imports, data, checkpoints included), the median step time and
tokens/s from ``metrics.jsonl``, and the machine's load while it ran (``bench/common.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, LoadSampler, provenance  # noqa: E402

MAIN_JOB = ["--standalone", "--nproc-per-node", "2", "-m", "hyperp_megatron.train", "--config", "configs/tiny.yaml"]
VARIANTS = {"sphere_muon": [], "adamw": ["--optim.name", "adamw", "--optim.lr", "3e-3"]}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (default: the config's 200)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "bench"), help="parent of the run directories")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "main_job.json"))
    return parser.parse_args(argv)


def run_variant(name: str, extra: list[str], steps: int | None, runs_dir: Path) -> dict:
    run_dir = runs_dir / f"main_job_{name}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: never resume an earlier one
    run_dir.mkdir(parents=True)
    shown_dir = run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir
    args = [*MAIN_JOB, *extra, "--logging.run_dir", str(shown_dir)]
    if steps is not None:
        args += ["--train.steps", str(steps)]
    command = [str(Path(sys.executable).parent / "torchrun"), *args]
    printable = "torchrun " + " ".join(args)
    print(f"[main_job] {name}: {printable}", flush=True)
    started = time.perf_counter()
    with LoadSampler() as load, (run_dir / "stdout.log").open("w") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{name} failed with exit status {code}; see {run_dir / 'stdout.log'}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = json.loads((run_dir / "final.json").read_text())
    steps_rows = [row for row in rows if "step_time" in row]
    step_times = [row["step_time"] for row in steps_rows]
    return {
        "command": printable,
        "wall_s": round(wall, 1),
        "val_loss": {str(row["step"]): row["val_loss"] for row in rows if "val_loss" in row},
        "train_loss_last": final["loss"],
        "steps": final["step"],
        "median_step_s": statistics.median(step_times),
        "median_tokens_per_s": statistics.median(row["tokens_per_s"] for row in steps_rows),
        "load": load.summary(),
    }


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = provenance("python bench/main_job.py " + " ".join(sys.argv[1:] if argv is None else argv))
    report["what"] = ("configs/tiny.yaml (4 layers, width 256, 8.1M parameters, TP=2 on 2 processes, 16 x 256 "
                      "tokens per step) on the embedded Shakespeare corpus; validation loss = mean over "
                      "train.eval_iters (4) global batches of the valid split")
    report["runs"] = {name: run_variant(name, VARIANTS[name], args.steps, Path(args.runs_dir).resolve())
                      for name in args.variants}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for name, run in report["runs"].items():
        curve = " -> ".join(f"{v:.3f} ({s})" for s, v in run["val_loss"].items())
        print(f"[main_job] {name}: val loss {curve}; wall {run['wall_s']} s; {run['load']['note']}")
    print(f"[main_job] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
