"""``bench/gpu_check.py`` in its CPU smoke mode: every part runs, the report has the promised schema, the
tiny parts match the committed CPU reference, and a failing part is reported while the rest still run."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tier("system")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    # The README's command shape on a GPU machine without the package installed: PYTHONPATH names only a folder of
    # wheels (here an empty one); the script must import this checkout's package (bench/hyperp_megatron links it).
    site = out / "site"
    site.mkdir()
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--smoke", "--out", str(out),
                           "--work-dir", str(out / "work")], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(site)),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_part_runs_and_the_report_has_the_schema(smoke_report):
    from gpu_check_parts import PARTS

    report, markdown = smoke_report
    assert {"gpu", "versions", "parts", "metrics"} <= set(report)
    assert report["gpu"].startswith("cpu") and report["versions"]["megatron-core"] == "0.16.1"
    assert report["versions"]["package_from_checkout"] is True
    assert list(report["parts"]) == list(PARTS)
    for name, record in report["parts"].items():
        assert record["ok"] is True and record["error"] is None, (name, record)
        assert isinstance(record["seconds"], float)
    assert report["metrics"] and all(isinstance(v, (int, float)) and math.isfinite(v)
                                     for v in report["metrics"].values()), report["metrics"]
    for name in ("tiny_fp32_step1_abs_diff", "tiny_bf16_step1_abs_diff", "dense_d8_sphere_muon_tokens_per_s",
                 "moe_d8_tokens_per_s", "sphere_step_vs_torch_muon", "ns_bf16_vs_matmul", "resume_max_rel_diff",
                 "science_C32_lr_opt", "science_C64_best_val_loss",  # the science part at its smoke widths
                 "recompute_selective_step_ms_vs_none", "recompute_full_saved_gib_vs_none", "async_over_sync_stall"):
        assert name in report["metrics"], name
    assert all(name in markdown for name in PARTS)


def test_recompute_and_async_save_parts_check_their_logic_on_the_cpu(smoke_report):
    """On the CPU the two parts prove their logic, not GPU numbers: recompute's losses equal 'none''s bit for bit,
    its ratios are finite and full recompute keeps fewer activations; no GPU memory is claimed; the async part's
    checkpoints are complete (else the part fails) and both stalls were measured."""
    report, _ = smoke_report
    part = report["parts"]["recompute"]
    for mode in ("selective", "full"):
        assert part[f"{mode}_loss_max_rel_diff"] == 0.0
        for key in ("saved_gib", "step_ms", "estimated_activations_gib"):
            assert 0 < part[f"{mode}_{key}_vs_none"] < math.inf, (mode, key)
    assert part["full_saved_gib_vs_none"] < 1
    assert not any("peak_mem" in key for key in part)
    saves = report["parts"]["async_save"]
    assert saves["ok"] and saves["sync_stall_per_save_s"] > 0 and saves["async_stall_per_save_s"] > 0
    assert 0 < saves["async_over_sync_stall"] < math.inf and saves["async_checkpoint_mib"] > 0


@pytest.mark.tier("unit")
def test_saved_activations_counts_what_autograd_keeps():
    """The recompute part's device-independent activation measure: checkpointing each layer keeps less, every
    saved tensor is released after the backward, and parameters are not counted."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from gpu_check_parts import SavedActivations

    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()) for _ in range(4)])
    x = torch.randn(32, 64, requires_grad=True)
    peaks = {}
    for mode in ("none", "checkpoint"):
        saved = SavedActivations()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            out = x
            for layer in layers:  # each layer a recomputed chunk, as Megatron's full / uniform / 1 layer
                out = layer(out) if mode == "none" else checkpoint(layer, out, use_reentrant=True)
            out.sum().backward()
        del out
        assert saved.current == 0 and not saved.live, mode  # all released
        peaks[mode] = saved.peak
    assert 0 < peaks["checkpoint"] < peaks["none"]
    # Each linear keeps its input, each GELU its input: 7 tensors of 32 x 64 fp32 (x is a leaf); no weights.
    assert peaks["none"] == 7 * 32 * 64 * 4


# Bounds vs the committed CPU reference (bench/results/gpu/cpu_reference.json), one thread, measured with the
# oneDNN / ATen / MKL kernels of four x86 instruction sets on one machine (ONEDNN_MAX_CPU_ISA = default (AMX),
# AVX512_CORE_BF16, AVX512_CORE, AVX2): fp32, both steps: 4.8e-7 in all four; bf16 step 1: 0, 0, 2.9e-6, 3.8e-6.
# The bf16 step 2 is not compared (issue 21): 1.9e-5, 4.1e-4, 6.5e-4, 1.4e-3 over the four. Each ISA's bf16
# matmuls round differently, the step-1 update carries that rounding (amplified: test_sphere_trainer.py's
# bounds comment), and the bf16 copy of the updated weights flips whole bf16 ulps (4e-3 relative) where the
# rounding straddles one: the step-2 loss measures the CPU's bf16 kernels, not the trainer. The update itself is
# compared by the fp32 part (steps 1 and 2) and the bf16 master-weight path by test_sphere_trainer's bit-exact
# bf16 resume.
TINY_LOSS_ABS = 1e-5


def test_tiny_parts_reproduce_the_committed_cpu_reference(smoke_report):
    report, _ = smoke_report
    fp32, bf16 = report["parts"]["tiny_fp32"], report["parts"]["tiny_bf16"]
    assert fp32["compared_steps"] == bf16["compared_steps"] == 2, (fp32, bf16)
    assert fp32["max_abs_diff_first_steps"] < TINY_LOSS_ABS, fp32
    assert bf16["step1_abs_diff"] < TINY_LOSS_ABS, bf16
    assert math.isfinite(bf16["loss_last"]), bf16
    resume = report["parts"]["checkpoint_resume"]
    assert resume["deterministic_bit_exact"] and resume["default_bit_exact"]


@pytest.mark.tier("unit")
def test_a_failing_part_is_reported_and_the_rest_run(tmp_path):
    import torch
    from gpu_check import Check, run_part, write_report

    check = Check(torch.device("cpu"), smoke=True, work_dir=tmp_path, peak_tflops=None)

    def broken(check):
        raise RuntimeError("boom")

    def failed_check(check):
        return {"value": 1.5, "failures": ["value too small"], "metrics": {"value": 1.5}}

    records = {}
    for name, fn in (("broken", broken), ("failed_check", failed_check), ("fine", lambda c: {"x": 2})):
        records[name], _ = run_part(check, fn)
    assert records["broken"]["ok"] is False and records["broken"]["error"] == "RuntimeError: boom"
    assert records["failed_check"] == {"ok": False, "error": "value too small", "value": 1.5,
                                       "seconds": records["failed_check"]["seconds"]}
    assert records["fine"]["ok"] is True and records["fine"]["x"] == 2
    report = {"gpu": "cpu", "versions": {}, "smoke": True, "command": "test", "started": "now", "seconds": 1.0,
              "parts": records, "metrics": {"value": 1.5}}
    write_report(report, tmp_path)
    assert "**RuntimeError: boom**" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.tier("unit")
def test_synthetic_corpus_is_the_same_everywhere():
    """The GPU run compares with losses computed here: its data must be bit-identical."""
    from gpu_check import synthetic_documents

    documents = synthetic_documents(50, 8192)
    digest = hashlib.sha256(b"".join(doc.astype("<i8").tobytes() for doc in documents)).hexdigest()
    assert [len(doc) for doc in documents[:4]] == [535, 265, 310, 453]
    assert digest == "6c5e2a94dde517f07412bb07702bb3a606570c7ff609005dadaa635edeb297a4"
    assert all(0 <= doc.min() and doc.max() < 8191 for doc in documents)  # 8191 is EOD
