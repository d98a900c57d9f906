"""The coord check's flatness statistic passes for HyperP (sphere init, multipliers, sphere Muon) and
fails for the standard-parameterization control, on small widths and a few steps of the real trainer."""

import importlib.util
import math
import os
import sys

import pytest

from _dist import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool():
    """``tools/coord_check.py`` as a module (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("coord_check", os.path.join(REPO, "tools", "coord_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def coord_check_worker(rank, world_size, labels, tmp_dir):
    import warnings

    warnings.filterwarnings("ignore")
    from hyperp_megatron.compat import apply_cpu_patches

    cc = load_tool()
    apply_cpu_patches()
    settings = cc.CoordCheckSettings(widths=[32, 64, 128], depths=[2, 4, 8], base_width=32, base_depth=2,
                                     head_dim=16, steps=3, seq_length=32, micro_batch_size=4, global_batch_size=4,
                                     data_cache_dir=os.path.join(REPO, "data"))
    return cc.run_coord_check(settings, [cc.SWEEPS[label] for label in labels], tmp_dir, log=lambda _: None)


@pytest.fixture(scope="module")
def report(embedded_corpus, tmp_path_factory):
    (result,) = run_distributed(coord_check_worker, 1, ["hyperp", "standard"], tmp_path_factory.mktemp("cc"))
    return {sweep["label"]: sweep for sweep in result["sweeps"]}


def test_hyperp_is_flat(report):
    sweep = report["hyperp"]
    for axis in ("width", "depth"):
        for quantity, check in sweep[axis]["flatness"].items():
            assert check["passed"], (axis, quantity, check)
    assert sweep["passed"]
    losses = sweep["width"]["runs"]["128"]["loss"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_standard_control_is_not_flat(report):
    sweep = report["standard"]
    assert not sweep["passed"]
    width = sweep["width"]["flatness"]
    failed = [q for q, check in width.items() if not check["passed"]]
    assert {"mlp_branch", "residual"} <= set(failed), width
    assert width["mlp_branch"]["slope"] > 0.5  # grows with width, where HyperP's stays at 0


def test_statistic_and_plot(report, tmp_path):
    cc = load_tool()
    assert cc.log_slope([1, 2, 4], [3, 6, 12]) == pytest.approx(1.0)
    assert cc.log_slope([1, 2, 4], [5, 5, 5]) == pytest.approx(0.0)
    full = {"settings": {}, "quantities": list(cc.QUANTITIES), "sweeps": list(report.values())}
    json_path, png_path = cc.write_report(full, tmp_path)
    assert json_path.stat().st_size > 0 and png_path.read_bytes()[:4] == b"\x89PNG"
    assert len(cc.summary_lines(full)) == 4
