"""Layout-parity maxima, negative-control errors and sphere invariants, as measured by the tests.

Usage (from the repository root)::

    python bench/parity.py              # ~10 min on 2 idle cores; writes bench/results/parity.json

Runs the parity and control tests under pytest with ``HYPERP_MEASURED_OUT`` set: every such test records
the numbers it asserts on (``measured`` fixture, ``tests/conftest.py``), so the file holds exactly what
the asserted bounds were checked against, plus the command, commit and machine load. The test run must
pass. What each number means:

- ``parity/*``: a multi-process layout vs the single-process run (or the named reference), real gloo
  runs of the trainer (``tests/trainer_utils.parity``): ``loss_rel`` = max over steps of |loss / loss_ref
  - 1|; ``step1`` / ``final``: the weights after the first optimizer step / at the end, every parameter
  gathered to its full tensor: ``matrix_max_rel`` = max over Newton-Schulz matrices of max|w - w_ref| /
  max|w_ref|, ``adam_max_rel`` / ``adam_fro_rel`` = the same (max entry / Frobenius) over the parameters
  with an Adam direction (embedding, output layer, norms; every parameter under AdamW);
  ``replica_spread`` = largest difference between two ranks' copies of one shard; ``aux_rel`` (MoE) =
  max over steps and layers of the relative aux-loss difference. ``parity/sphere_muon_raw_shards``: the
  optimizer alone on raw shards, max relative Frobenius error over the matrices. test_sphere_trainer's
  layouts are compared from the same state (issue 21): ``free`` = from the same initial weights, the losses
  of steps 1-3 and the weights after step 1; ``forced`` = the single process from the layout's step-3
  checkpoint vs the layout's last losses and final weights.
- ``controls/*``: the same measures for a deliberately wrong variant (``tests/mutants.py``): each must be
  far outside the bound its test asserts.
- ``moe_micro_batches``: DP=2 x 2 micro-batches vs DP=1 x 4 (MoE): equal at step 1, bounded drift
  afterwards (the aux-loss gradient's running mean of f), equal again at gamma = 0.
- ``sphere_invariants``, ``update_rules``: largest relative radius drift of any sphere matrix after
  training; the Muon baseline's update vs its formula.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, LoadSampler, provenance  # bench/common.py (the script's folder is on sys.path)

TESTS = [
    "tests/test_sphere_trainer.py",
    "tests/test_trunk_parallel.py",
    "tests/test_moe.py",
    "tests/test_sphere_muon_dist.py",
    "tests/test_hyperp_model.py::test_gated_attention_tensor_parallel_matches_single_process",
    "tests/test_monitors.py::test_parallel_records_equal_tp1_with_control",
    "tests/test_sphere_muon.py::test_weight_decay_keeps_radius_and_changes_weights_only_to_second_order",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else REPO / "bench" / "results" / "parity.json"
    with tempfile.TemporaryDirectory() as tmp:
        measured = Path(tmp) / "measured.json"
        started = time.perf_counter()
        with LoadSampler() as load:
            code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=REPO,
                                  env={**os.environ, "HYPERP_MEASURED_OUT": str(measured)}).returncode
        if code != 0:
            print(f"error: the tests failed (exit status {code}); {out} not written", file=sys.stderr)
            return 1
        report = provenance("python bench/parity.py " + " ".join(argv))
        report.update(what=__doc__[__doc__.index("- ``parity/*``"):].strip(), tests=TESTS,
                      pytest_seconds=round(time.perf_counter() - started, 1), load=load.summary(),
                      measured=json.loads(measured.read_text()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
