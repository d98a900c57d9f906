"""The sweep and fit tools (issue 15): fits recover a known optimum, exponent and compute multiplier from
synthetic data; the sweep plans shared runs once and resumes without redoing finished runs; the report is
written end to end from a (fake-trainer) sweep."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from hyperp_megatron.science import fit, sweep
from hyperp_megatron.science.claims import PAPER_TOKEN_EXPONENT

pytestmark = pytest.mark.tier("unit")

REPO = Path(__file__).resolve().parent.parent
FAKE_TRAINER = [sys.executable, "-m", "tests.fake_trainer"]  # run from REPO (the sweep's working directory)


# ----------------------------------------------------------------------------------------------
# Fits on synthetic data


def synthetic_sweep(optimum: float, seeds: int, noise: float, rng, lrs=None) -> dict:
    lrs = lrs or [optimum * 2 ** (k / 2) for k in range(-4, 3)]  # asymmetric around the optimum
    return {lr: [2.0 + 0.4 * math.log(lr / optimum) ** 2 + rng.normal(0, noise) for _ in range(seeds)]
            for lr in lrs}


@pytest.mark.parametrize("seeds,method", [(3, "bootstrap-seeds"), (1, "jackknife")])
def test_fit_optimum_recovers_a_known_optimum(seeds, method):
    rng = np.random.default_rng(0)
    errors, sds = [], []
    for trial in range(20):
        optimum = 0.02 * 1.3 ** trial
        result = fit.fit_optimum(synthetic_sweep(optimum, seeds, 0.003, rng))
        assert result.method == method and not result.at_edge
        errors.append(math.log(result.lr / optimum))
        sds.append(result.log_sd)
    assert max(abs(e) for e in errors) < 0.15  # within 16% of the true optimum, every time
    assert 0 < np.median(sds) < 0.2 and np.sqrt(np.mean(np.square(errors))) < 3 * np.median(sds) + 0.02


def test_fit_optimum_flags_an_optimum_beyond_the_grid():
    rng = np.random.default_rng(1)
    result = fit.fit_optimum(synthetic_sweep(1.0, 1, 0.001, rng, lrs=[0.05, 0.1, 0.2, 0.4]))
    assert result.at_edge and result.lr <= 0.4 + 1e-12
    with pytest.raises(ValueError, match="3 or more"):
        fit.fit_optimum({0.1: [1.0], 0.2: [1.1]})


def test_power_law_recovers_the_token_exponent():
    rng = np.random.default_rng(2)
    tokens = np.array([1, 2, 4, 8]) * 2.4e5
    slopes = []
    for _ in range(30):
        optima = 0.1 * (tokens / 2.4e5) ** -0.32 * np.exp(rng.normal(0, 0.05, 4))
        law = fit.power_law(tokens, optima, [0.05] * 4)
        slopes.append(law.slope)
        assert abs(law.slope + 0.32) < 4 * law.slope_sd + 0.02
    assert abs(np.mean(slopes) + 0.32) < 0.03


def test_fit_optimum_flags_a_vertex_clamped_to_the_grid_end():
    """Muon d2 of the first sweep: the best point is the second-highest LR and the quadratic's vertex lies above
    the highest, so the argmin was clamped to the grid's end; that optimum is at the edge, not a fit."""
    lrs = [0.0106, 0.015, 0.0212, 0.03, 0.0424, 0.06, 0.0849]
    losses = {lr: [4.4 - 0.08 * math.log(lr / 0.0106) + 0.004 * math.log(lr / 0.0106) ** 2] for lr in lrs}
    losses[0.0849] = [losses[0.06][0] + 0.001]  # a flat top: the best point is not the last one
    result = fit.fit_optimum(losses)
    assert result.clamped and result.at_edge and result.lr == pytest.approx(0.0849)
    inside = fit.fit_optimum(synthetic_sweep(0.05, 1, 0.0, np.random.default_rng(0)))
    assert not inside.clamped and not inside.at_edge


def test_equal_loss_points_interpolate_the_measured_curves():
    compute = np.geomspace(1e12, 8e12, 4)
    law = lambda c: 20 * (c / 1e12) ** -0.3 + 3.0  # noqa: E731
    hyperp = list(zip(compute, law(compute)))
    muon = list(zip(compute, law(compute / 1.58)))  # needs 1.58x the compute for the same loss
    points = fit.equal_loss_points(hyperp, muon)
    # hyperp's last loss is below every baseline loss: no multiplier there (never extrapolated)
    assert points[-1].multiplier is None and points[-1].loss_gap > 0
    for p in points[:-1]:  # (linear in log compute: the curvature costs a few percent)
        assert p.multiplier == pytest.approx(1.58, rel=0.05) and p.loss_gap > 0
    # a baseline that catches up: the gap shrinks with compute and is never extrapolated
    late = list(zip(compute, law(compute) + np.array([0.16, 0.09, 0.046, 0.01])))
    gaps = [p.loss_gap for p in fit.equal_loss_points(hyperp, late)]
    assert gaps == pytest.approx([0.16, 0.09, 0.046, 0.01]) and gaps == sorted(gaps, reverse=True)
    beyond = fit.equal_loss_points([(2e13, 3.5)], late)[0]
    assert beyond.loss_gap is None and beyond.multiplier is None


def test_compute_verdict_is_judged_on_the_gap_at_equal_compute():
    from hyperp_megatron.science import claims
    from hyperp_megatron.science.results import Row, RunResult

    def ladder(losses):
        out = []
        for i, (flops, loss) in enumerate(losses):
            run = RunResult(f"k{flops}{loss}", "done", loss, 0.1, flops, None, None, None)
            optimum = fit.fit_optimum({0.05: [loss + 0.05], 0.1: [loss], 0.2: [loss + 0.05]})
            out.append((float(i), claims.Sweep("depth", "x", f"d{i}", {}, optimum, [Row("x", f"d{i}", 0.1, 1, run)])))
        return out

    hyperp = ladder([(1e12, 4.3), (2e12, 4.1), (4e12, 3.95)])
    catching_up = ladder([(1e12, 4.46), (2e12, 4.2), (4e12, 3.96)])
    verdict = claims.compute_verdict(hyperp, catching_up, [], noise_sd=0.01)
    assert verdict.verdict == claims.OPEN  # the last gap (0.01) is within 2 x the noise
    assert verdict.details["gap_trend_per_decade"] < 0
    assert claims.compute_verdict(hyperp, ladder([(1e12, 4.5), (2e12, 4.3), (4e12, 4.1)]), [], 0.01).verdict == \
        claims.HOLDS
    assert claims.compute_verdict(hyperp, ladder([(1e12, 4.2), (2e12, 4.0), (4e12, 3.85)]), [], 0.01).verdict == \
        claims.FAILS


def test_weight_decay_on_the_fixed_radius_sphere_is_an_exact_lr_rescale():
    """Why claim 4 gets no verdict: decay, step and retraction to R equal a step at eta / (1 - eta wd)."""
    import torch

    from hyperp_megatron.optim.reference import sphere_step

    torch.manual_seed(0)
    weight, direction = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    lr, wd = 0.1, 0.5
    decayed, rescaled = weight.clone(), weight.clone()
    sphere_step(decayed, direction, {}, lr, wd)
    sphere_step(rescaled, direction * (1 - lr * wd), {"radius": weight.norm()}, lr / (1 - lr * wd), 0.0)
    undecayed = weight.clone()
    sphere_step(undecayed, direction, {}, lr, 0.0)
    # the same direction, scaled: only the step's length matters (the step is eta R D / ||D||)
    torch.testing.assert_close(decayed, rescaled, rtol=0, atol=1e-6)
    assert (decayed - undecayed).abs().max() > 1e-4  # and it is not a no-op


def test_log_axes_label_a_range_inside_one_decade():
    from hyperp_megatron.science.plots import _plt, log_axis

    plt = _plt()
    fig, ax = plt.subplots()
    ax.plot([0.035, 0.28], [1, 2])
    log_axis(ax, "x")
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and 0.035 <= t.get_position()[0] <= 0.28]
    plt.close(fig)
    assert labels == ["0.05", "0.1", "0.2"]


def test_a_ladder_base_point_takes_the_seeds_of_a_noise_experiment(tmp_path):
    from hyperp_megatron.science import report
    from hyperp_megatron.science.results import Row, RunResult

    spec = sweep.load_spec(write_spec(tmp_path))
    analysis = report.Analysis(spec, tmp_path, [], {})
    rng = np.random.default_rng(0)

    def rows(variant, scale, seeds):
        return [Row(variant, scale, lr, seed, RunResult(f"{lr}-{seed}", "done", 3 + math.log(lr / 0.1) ** 2 +
                                                         rng.normal(0, 0.01), lr, 1.0, 1.0, 1.0, 1))
                for seed in seeds for lr in (0.05, 0.0707, 0.1, 0.141, 0.2)]

    from hyperp_megatron.science import claims

    ladder_rows, seeded_rows = rows("hyperp", "T240", [1234]), rows("hyperp", "base", [1234, 1235, 1236])
    analysis.sweeps = {"tokens": claims.sweeps("tokens", ladder_rows), "seeds": claims.sweeps("seeds", seeded_rows)}
    assert analysis.sweeps["tokens"]["hyperp", "T240"].optimum.method == "jackknife"
    report.adopt_seeded_sweeps(analysis)
    adopted = analysis.sweeps["tokens"]["hyperp", "T240"]
    assert adopted.optimum.method == "bootstrap-seeds" and adopted.optimum.num_seeds == 3
    assert {r.scale for r in adopted.rows} == {"T240"} and len(adopted.rows) == 15


# ----------------------------------------------------------------------------------------------
# The sweep: plan, resume


def write_spec(tmp_path: Path) -> Path:
    base = yaml.safe_load((REPO / "configs/science/base.yaml").read_text())
    # user data that the fake trainer never reads: the tool then prepares no corpus
    base["data"] = {"prefixes": [str(tmp_path / "corpus")], "tokenizer": str(tmp_path / "tokenizer")}
    base["model"]["vocab_size"] = 1024
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "base_config": str(tmp_path / "base.yaml"), "lr_key": "hyperp.base_lr",
        "experiments": [
            {"name": "tokens", "claims": ["token_law", "norm_transfer"], "scale_key": "train.steps",
             "lr_grid": {"center": 0.1, "factor": 1.41421356, "points": 5},
             "scales": {"T120": {"train.steps": 120}, "T240": {}, "T480": {"train.steps": 480},
                        "T960": {"train.steps": 960}},
             "variants": {"hyperp": {}}},
            {"name": "depth", "claims": ["transfer", "compute"], "scale_key": "model.num_layers",
             "lr_grid": {"center": 0.1, "factor": 1.41421356, "points": 5},
             "scales": {"d2": {"model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4,
                               "model.ffn_hidden_size": 128},
                        "d4": {},
                        "d8": {"model.num_layers": 8, "model.hidden_size": 128, "model.num_attention_heads": 16,
                               "model.ffn_hidden_size": 512}},
             "variants": {"hyperp": {},
                          "muon": {"overrides": {"optim.name": "muon", "model.parameterization": "muon"},
                                   "lr_grid": {"center": 0.03}}}},
            {"name": "seeds", "claims": ["noise"], "lr_grid": {"center": 0.1, "factor": 1.41421356, "points": 3},
             "seeds": [1234, 1235], "variants": {"hyperp": {}, "copy": {"share": {"base": "hyperp"}}}},
        ]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_plan_trains_shared_runs_once(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path))
    runs = sweep.plan(spec)
    # tokens 4 x 5; depth 3 x 5 hyperp + 3 x 5 muon, of which d4 hyperp's 5 are T240's; seeds: 3 x 2, of
    # which seed 1234's 3 are T240's; "copy" shares hyperp's runs.
    assert len(runs) == 20 + 30 - 5 + 3
    by_key = {r.key: r for r in runs}
    base = [r for r in runs if r.overrides["hyperp.base_lr"] == 0.1 and r.overrides["train.seed"] == 1234
            and "train.steps" not in r.overrides and "optim.name" not in r.overrides and
            "model.num_layers" not in r.overrides][0]
    assert {(m.experiment, m.variant) for m in by_key[base.key].memberships} == {
        ("tokens", "hyperp"), ("depth", "hyperp"), ("seeds", "hyperp"), ("seeds", "copy")}
    assert sweep.LRGrid(0.1, 1.41421356, 5).values() == [0.05, 0.0707107, 0.1, 0.141421, 0.2]
    # points below a grid keep its values (its runs): 7 points from 0.035 and 2 more under them
    assert sweep.LRGrid(0.1, 1.41421356, 7, below=2).values()[2:] == sweep.LRGrid(0.1, 1.41421356, 7).values()
    assert sweep.LRGrid(0.1, 1.41421356, 7, below=2).values()[:2] == [0.0176777, 0.025]
    with pytest.raises(ValueError, match="no experiment"):
        sweep.plan(spec, ["nope"])


def run_fake(spec_path, results, *extra, log=None):
    env = dict(os.environ, FAKE_TRAINER_LOG=str(log or ""))
    cmd = [sys.executable, "-m", "hyperp_megatron.science", "sweep", "run", "--spec", str(spec_path), "--results",
           str(results), "--jobs", "4", "--trainer", " ".join(FAKE_TRAINER), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_sweep_resumes_without_redoing_finished_runs(tmp_path):
    spec_path, results, log = write_spec(tmp_path), tmp_path / "results", tmp_path / "invocations.txt"
    runs = sweep.plan(sweep.load_spec(spec_path))
    first = run_fake(spec_path, results, "--max-runs", "10", "--only", "tokens", log=log)
    assert first.returncode == 0, first.stdout + first.stderr
    assert len(log.read_text().split()) == 10 and "[sweep] 10/20 finished" in first.stdout
    # an interrupted run (no status.json) and a failed one are redone; finished ones never
    done = sorted(p.parent.name for p in results.glob("runs/*/status.json"))
    (results / "runs" / done[0] / "status.json").unlink()
    status = json.loads((results / "runs" / done[1] / "status.json").read_text())
    (results / "runs" / done[1] / "status.json").write_text(json.dumps({**status, "status": "failed"}))
    second = run_fake(spec_path, results, log=log)
    assert second.returncode == 0, second.stdout + second.stderr
    invocations = log.read_text().split()
    assert len(invocations) == 10 + (len(runs) - 10) + 2
    assert sorted(invocations[10:]) == sorted([r.key for r in runs if r.key not in done[2:]])
    third = run_fake(spec_path, results, log=log)
    assert len(log.read_text().split()) == len(invocations), "a finished sweep must not train anything"
    assert f"{len(runs)}/{len(runs)} finished ({len(runs)} earlier" in third.stdout
    folder = results / "runs" / runs[0].key
    assert {"config.yaml", "metrics.jsonl", "final.json", "status.json", "sweep_run.json", "train.log"} <= {
        p.name for p in folder.iterdir()}
    assert not list(results.glob("runs/*/checkpoints"))
    report = subprocess.run([sys.executable, "-m", "hyperp_megatron.science", "fit", "--spec", str(spec_path),
                             "--results", str(results), "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert report.returncode == 0, report.stdout + report.stderr
    claims = json.loads((tmp_path / "report" / "claims.json").read_text())["claims"]
    token = claims["token_law"]
    (judged,) = token["details"]["judged_on"]  # the only token ladder of this spec: 'tokens'
    assert abs(token["measured"][judged] - PAPER_TOKEN_EXPONENT) < 0.08 and token["verdict"] == "holds", token
    multipliers = claims["compute"]["measured"]["multiplier"]  # the fake Muon needs 1.5x the FLOPs
    assert multipliers and all(m == pytest.approx(1.5, rel=0.25) for m in multipliers.values()), claims["compute"]
    assert claims["compute"]["verdict"] == "holds", claims["compute"]
    assert claims["norm_transfer"]["verdict"] == "holds", claims["norm_transfer"]
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "## Verdicts" in text and "tokens_lr.png" in text and (tmp_path / "report" / "tokens_lr.png").is_file()
    assert text.index("## The regime") < text.index("## The logit-capacity mechanism") < text.index("## Verdicts")
    # the compact summary and the archive: the report regenerates from the summary alone, identically
    archived = subprocess.run([sys.executable, "-m", "hyperp_megatron.science", "sweep", "archive", "--spec",
                               str(spec_path), "--results", str(results), "--out", str(tmp_path / "summary"),
                               "--archive", str(tmp_path / "runs.tar.gz")],
                              capture_output=True, text=True, timeout=600, cwd=REPO)
    assert archived.returncode == 0, archived.stdout + archived.stderr
    from hyperp_megatron.science import summary

    manifest = json.loads((tmp_path / "summary" / summary.ARCHIVE_MANIFEST).read_text())
    assert manifest["runs"] == len(runs) and manifest["archive"] == "runs.tar.gz"  # a name: kept anywhere
    summary.verify_archive(tmp_path / "runs.tar.gz", manifest)
    again = summary.write_archive(runs, results, tmp_path / "again.tar.gz")
    assert again["sha256"] == manifest["sha256"]  # reproducible byte for byte
    lines = (tmp_path / "summary" / summary.SUMMARY_FILE).read_text()
    assert len(lines.splitlines()) == len(runs) and str(tmp_path) not in lines
    refit = subprocess.run([sys.executable, "-m", "hyperp_megatron.science", "fit", "--spec", str(spec_path),
                            "--results", str(tmp_path / "summary" / summary.SUMMARY_FILE), "--out",
                            str(tmp_path / "refit")], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert refit.returncode == 0, refit.stdout + refit.stderr
    from_summary = json.loads((tmp_path / "refit" / "claims.json").read_text())
    from_folders = json.loads((tmp_path / "report" / "claims.json").read_text())
    assert from_summary["claims"] == from_folders["claims"]
    (tmp_path / "again.tar.gz").write_bytes(b"not it")
    with pytest.raises(ValueError, match="sha256 differs"):
        summary.verify_archive(tmp_path / "again.tar.gz", manifest)


def test_a_resumed_sweep_stops_an_orphaned_trainer_of_the_same_run(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path))
    run = sweep.plan(spec)[0]
    folder = sweep.run_dir(tmp_path / "results", run)
    folder.mkdir(parents=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(folder)],
                              start_new_session=True)
    deadline = time.monotonic() + 60  # until it has exec'd (under load the fork still shows pytest's command line)
    while str(folder) not in Path(f"/proc/{orphan.pid}/cmdline").read_bytes().decode(errors="replace"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (folder / sweep.PID_FILE).write_text(str(orphan.pid))
    sweep.prepare_folder(run, tmp_path / "results", tmp_path / "data")
    assert orphan.wait(timeout=20) != 0  # killed
    assert (folder / sweep.IDENTITY_FILE).is_file() and not (folder / sweep.PID_FILE).exists()


@pytest.mark.parametrize("name", ["science.yaml", "science_smoke.yaml"])
def test_shipped_sweep_specs_plan_and_every_run_config_loads(name, tmp_path, monkeypatch):
    from hyperp_megatron.config import load_config

    spec = sweep.load_spec(REPO / "sweeps" / name)
    runs = sweep.plan(spec)
    assert runs and len({r.key for r in runs}) == len(runs)
    for run in runs:
        load_config(spec.base_config, sweep.nested_overrides(run.overrides))
    monkeypatch.chdir(tmp_path)  # the run keys do not depend on the working directory
    assert [r.key for r in sweep.plan(sweep.load_spec(REPO / "sweeps" / name))] == [r.key for r in runs]


def test_norm_transfer_counts_a_sweep_shared_by_two_ladders_once():
    """The base point is in the tokens and the batch ladder: alone, it is one optimum, not two that agree."""
    from hyperp_megatron.science import claims
    from hyperp_megatron.science.results import Row, RunResult

    def sweep(scale, keys, norms, optimum_lr):
        rows = [Row("hyperp", scale, lr, 1, RunResult(key, "done", 3.0, lr, None, None, None, None,
                                                      monitors={"output_rms_inf": norm}))
                for key, lr, norm in zip(keys, (0.05, 0.1, 0.2), norms)]
        optimum = fit.fit_optimum({0.05: [3.1], 0.1: [3.0], 0.2: [3.1]})
        assert optimum is not None and math.isclose(optimum.lr, optimum_lr, rel_tol=0.05)
        return claims.Sweep("tokens", "hyperp", scale, {}, optimum, rows)

    base = sweep("T0", ("a", "b", "c"), (1.0, 2.0, 4.0), 0.1)
    shared = {"tokens": [base], "batch": [sweep("B0", ("a", "b", "c"), (1.0, 2.0, 4.0), 0.1)]}
    verdict = claims.norm_transfer_verdict(shared, [])
    assert verdict.verdict == claims.OPEN and "too few optima" in verdict.why, verdict
    distinct = {"tokens": [base], "batch": [sweep("B1", ("d", "e", "f"), (1.0, 2.0, 4.0), 0.1)]}
    assert claims.norm_transfer_verdict(distinct, []).verdict == claims.HOLDS
