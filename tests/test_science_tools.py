"""The sweep and fit tools (issue 15): fits recover a known optimum, exponent and compute multiplier from
synthetic data; the sweep plans shared runs once and resumes without redoing finished runs; the report is
written end to end from a (fake-trainer) sweep."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from hyperp_megatron.science import fit, sweep

REPO = Path(__file__).resolve().parent.parent
FAKE_TRAINER = [sys.executable, str(REPO / "tests" / "fake_trainer.py")]


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


def test_compute_multiplier_is_recovered():
    rng = np.random.default_rng(3)
    compute = np.geomspace(1e12, 3e13, 4)
    law = lambda c: 20 * (c / 1e12) ** -0.3 + 3.0  # noqa: E731
    hyperp = law(compute) + rng.normal(0, 0.002, 4)
    muon = law(compute / 1.58) + rng.normal(0, 0.002, 4)  # needs 1.58x the compute for the same loss
    law_h, law_m = fit.joint_compute_law(compute, hyperp, compute, muon)
    assert fit.compute_multiplier(law_h, law_m) == pytest.approx(1.58, rel=0.05)
    assert law_h.b == pytest.approx(0.3, rel=0.2)
    low, mid, high = fit.bootstrap_multiplier(compute, hyperp, compute, muon, noise_sd=0.002, draws=100)
    assert low <= mid <= high and mid == pytest.approx(1.58, rel=0.05) and high - low < 0.3
    separate = fit.compute_multiplier(fit.compute_law(compute, hyperp), fit.compute_law(compute, muon), 3e13)
    assert separate == pytest.approx(1.58, rel=0.15)


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
            {"name": "seeds", "lr_grid": {"center": 0.1, "factor": 1.41421356, "points": 3},
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
    with pytest.raises(ValueError, match="no experiment"):
        sweep.plan(spec, ["nope"])


def run_fake(spec_path, results, *extra, log=None):
    env = dict(os.environ, FAKE_TRAINER_LOG=str(log or ""), PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "tools/lr_sweep.py"), "run", "--spec", str(spec_path), "--results",
           str(results), "--jobs", "4", "--trainer", " ".join(FAKE_TRAINER), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


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
    report = subprocess.run([sys.executable, str(REPO / "tools/fit_transfer.py"), "--spec", str(spec_path),
                             "--results", str(results), "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stdout + report.stderr
    claims = json.loads((tmp_path / "report" / "claims.json").read_text())["claims"]
    token = claims["token_law"]
    assert abs(token["measured"] + 0.32) < 0.08 and token["verdict"] == "holds", token
    assert claims["compute"]["measured"] == pytest.approx(1.5, rel=0.25), claims["compute"]
    assert claims["norm_transfer"]["verdict"] == "holds", claims["norm_transfer"]
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "## Verdicts" in text and "tokens_lr.png" in text and (tmp_path / "report" / "tokens_lr.png").is_file()


def test_a_resumed_sweep_stops_an_orphaned_trainer_of_the_same_run(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path))
    run = sweep.plan(spec)[0]
    folder = sweep.run_dir(tmp_path / "results", run)
    folder.mkdir(parents=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(folder)],
                              start_new_session=True)
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
