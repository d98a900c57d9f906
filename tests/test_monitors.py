"""Stability monitors (docs/method.md section 5) and the non-finite step guard.

- the statistics against direct computations: attention LSE from explicit scores, outliers planted in a
  tensor, MaxVio on known counts;
- on a small model (one process), every indicator of a monitor step equals a direct computation from
  independent hooks: Z from the explicit attention scores of the q/k the core attention receives (whose
  softmax reproduces Megatron's attention output), branch RMS / outliers from the residual stream, router
  Z / MaxVio from the router's logits, the pre-clip gradient norm split, per-group LR; sphere radius drift
  is ~0 after a sphere-Muon step and equals the perturbation of one Q piece;
- TP=2, PP=2 and, for an MoE model, TP=2 + sequence parallel and EP=2 (DP=2) log the same monitor
  records as one process; control: the monitors' TP / EP / DP reductions skipped;
- a planted NaN loss skips the step on every rank (PP=2) with weights and optimizer state unchanged and the
  counter logged; K consecutive NaNs stop the trainer with a message and exit status 3; a checkpoint of
  non-finite weights is refused.
"""

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from functools import partial

import pytest
import torch

from _dist import free_port, run_distributed
from trainer_utils import REPO, TINY, merge, train_worker

pytestmark = pytest.mark.tier("unit")

# ----------------------------------------------------------------------------------------------
# Pure statistics


def test_attention_logsumexp_matches_explicit_scores():
    from hyperp_megatron.monitors import attention_logsumexp, evenly_spaced

    gen = torch.Generator().manual_seed(0)
    seq, batch, heads, groups, dim, scale = 12, 2, 4, 2, 8, 0.3
    query = torch.randn(seq, batch, heads, dim, generator=gen)
    key = torch.randn(seq, batch, groups, dim, generator=gen)
    # Megatron's layout: key groups repeated to the query heads, scores [b, heads, sq, sk].
    scores = torch.einsum("qbhd,kbhd->bhqk", query, key.repeat_interleave(heads // groups, dim=2)) * scale
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    expected = torch.logsumexp(scores.masked_fill(causal, float("-inf")), dim=-1)  # [b, heads, sq]
    positions, chosen = evenly_spaced(seq, 5), torch.tensor([1, 3])
    lse = attention_logsumexp(query, key, scale, positions, chosen)
    torch.testing.assert_close(lse, expected[:, chosen][:, :, positions], rtol=1e-5, atol=1e-5)
    # An explicit mask (True = masked) instead of the causal default.
    mask = torch.rand(batch, 1, seq, seq, generator=gen) > 0.7
    mask[..., 0] = False  # every query sees at least one key
    expected = torch.logsumexp(scores.masked_fill(mask, float("-inf")), dim=-1)
    lse = attention_logsumexp(query, key, scale, torch.arange(seq), torch.arange(heads), mask)
    torch.testing.assert_close(lse, expected, rtol=1e-5, atol=1e-5)


def test_evenly_spaced():
    from hyperp_megatron.monitors import evenly_spaced

    assert evenly_spaced(10, 0).tolist() == list(range(10))
    assert evenly_spaced(10, 20).tolist() == list(range(10))
    assert evenly_spaced(9, 3).tolist() == [0, 4, 8]


def test_branch_statistics_count_planted_outliers():
    from hyperp_megatron.monitors import branch_statistics

    tokens, hidden = 64, 512
    x = torch.ones(tokens, hidden)
    x[:, ::2] = -1.0  # mean 0, std 1 per token: no element is beyond 5 sigma
    planted = [(3, 10), (3, 11), (20, 0), (63, 511)]
    for t, i in planted:
        x[t, i] = 200.0
    sum_sq, outliers, count = branch_statistics(x.view(8, 8, hidden), outlier_sigma=5.0).tolist()
    assert outliers == len(planted) and count == tokens * hidden
    assert math.isclose(sum_sq, float(x.double().pow(2).sum()), rel_tol=1e-12)
    # The same count from the definition, and none at a threshold above every deviation.
    deviation = (x - x.mean(-1, keepdim=True)).abs() / x.std(-1, unbiased=False, keepdim=True)
    assert int((deviation > 5).sum()) == len(planted)
    assert branch_statistics(x, outlier_sigma=1e3)[1] == 0


def test_max_violation_on_known_counts():
    from hyperp_megatron.monitors import max_violation

    assert float(max_violation(torch.tensor([10.0, 10, 10, 10]))) == 0.0
    assert float(max_violation(torch.tensor([40.0, 0, 0, 0]))) == 3.0  # E - 1: one expert takes all
    assert float(max_violation(torch.tensor([2.0, 1, 1, 0]))) == 1.0


# ----------------------------------------------------------------------------------------------
# One process, in this process: a small model against direct computations

MODEL = {"optim": {"name": "sphere_muon", "clip_grad": 0.0}, "train": {"global_batch_size": 4}}
MOE = {"model": {"moe": {"sparsity": 2, "granularity": 2}}, "optim": {"name": "adamw"}}


@pytest.fixture(scope="module")
def world_of_one(embedded_corpus):
    import torch.distributed as dist

    from hyperp_megatron.compat import apply_cpu_patches

    apply_cpu_patches()
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if started:
        dist.destroy_process_group()


def make_session(extra: dict, run_dir):
    from hyperp_megatron.config import load_config
    from hyperp_megatron.train import _train_iterator, setup

    cfg = load_config(None, merge(merge(TINY, extra), {"logging": {"run_dir": str(run_dir)}}))
    session = setup(cfg, 1, 0)
    return session, _train_iterator(session, 0)


@pytest.fixture(scope="module")
def dense(world_of_one, tmp_path_factory):
    return make_session(MODEL, tmp_path_factory.mktemp("dense"))


def monitor_for(session, **overrides):
    import dataclasses

    from hyperp_megatron.monitors import StabilityMonitor

    cfg = dataclasses.replace(session.cfg.monitor, **overrides)
    return StabilityMonitor(cfg, session.cfg.model, session.model_chunks, session.optimizer, session.pg_collection)


class Reference:
    """Independent hooks: attention scores from the core attention's inputs, branch outputs from the
    residual stream (x -> x + a*attn -> x + a*attn + a*mlp), router logits from the router's input."""

    def __init__(self, model, softmax_scale: float):
        self.scale = softmax_scale
        self.sums = defaultdict(float)  # (name, layer) -> sum; (name, layer, "n") -> count
        self.lse: dict[int, list] = defaultdict(list)
        self.handles = []
        for layer in model.decoder.layers:
            index = layer.layer_number - 1
            self.handles += [
                layer.self_attention.core_attention.register_forward_hook(partial(self.attention, index),
                                                                          with_kwargs=True),
                layer.register_forward_pre_hook(partial(self.layer_input, index), with_kwargs=True),
                layer.pre_mlp_layernorm.register_forward_pre_hook(partial(self.middle, index)),
                layer.register_forward_hook(partial(self.layer_output, index)),
            ]
            if hasattr(layer.mlp, "router"):
                self.handles.append(layer.mlp.router.register_forward_hook(partial(self.router, index)))
        self.inputs, self.middles = {}, {}

    def add(self, name, index, total, count):
        self.sums[name, index] += float(total)
        self.sums[name, index, "n"] += float(count)

    def value(self, name, index):
        return self.sums[name, index] / self.sums[name, index, "n"]

    @torch.no_grad()
    def attention(self, index, module, args, kwargs, output):
        query, key, value = (a.float() for a in args[:3])
        group = query.shape[2] // key.shape[2]
        scores = torch.einsum("qbhd,kbhd->bhqk", query, key.repeat_interleave(group, dim=2)) * self.scale
        causal = torch.triu(torch.ones(scores.shape[-2:], dtype=torch.bool), diagonal=1)
        lse = torch.logsumexp(scores.masked_fill(causal, float("-inf")), dim=-1)  # [b, heads, sq]
        # The LSE and mask are Megatron's: its attention output is softmax(scores) @ v.
        probs = torch.exp(scores - lse[..., None]).masked_fill(causal, 0.0)
        context = torch.einsum("bhqk,kbhd->qbhd", probs, value.repeat_interleave(group, dim=2))
        torch.testing.assert_close(context.reshape(output.shape), output.float(), rtol=1e-4, atol=1e-5)
        self.lse[index].append(lse)
        self.add("attn_z", index, lse.double().pow(2).sum(), lse.numel())

    def layer_input(self, index, module, args, kwargs):
        self.inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach().double()

    def middle(self, index, module, args):
        self.middles[index] = args[0].detach().double()

    def layer_output(self, index, module, args, output):
        out = output[0].detach().double()
        for name, branch in (("attn", self.middles[index] - self.inputs[index]), ("mlp", out - self.middles[index])):
            self.add(f"{name}_rms", index, branch.pow(2).sum(), branch.numel())
            deviation = (branch - branch.mean(-1, keepdim=True)).abs()
            outliers = (deviation > 5 * branch.std(-1, unbiased=False, keepdim=True)).sum()
            self.add(f"{name}_outlier_pct", index, 100 * outliers, branch.numel())

    @torch.no_grad()
    def router(self, index, module, args, output):
        logits = args[0].reshape(-1, args[0].shape[-1]).double() @ module.weight.double().t()
        self.add("router_z", index, torch.logsumexp(logits, -1).pow(2).sum(), logits.shape[0])
        top = torch.topk(logits, module.topk, dim=-1).indices
        counts = torch.bincount(top.flatten(), minlength=logits.shape[1]).double()
        self.sums["counts", index] = self.sums.get(("counts", index), 0) + counts
        self.sums["last_counts", index] = counts  # the step's last micro-batch, at the end

    def remove(self):
        for handle in self.handles:
            handle.remove()


def check_layers(records, reference, name, num_layers, rel=1e-5, transform=lambda v: v):
    values = []
    for layer in range(num_layers):
        expected = transform(reference.value(name, layer))
        got = records[f"monitor/{name}/layer{layer:02d}"]
        assert math.isclose(got, expected, rel_tol=rel, abs_tol=1e-9), (name, layer, got, expected)
        values.append(got)
    # the layer mean of an RMS is quadratic (as the paper plots it), of everything else arithmetic
    mean = (math.sqrt(sum(v * v for v in values) / num_layers) if name.endswith("_rms")
            else sum(values) / num_layers)
    assert math.isclose(records[f"monitor/{name}"], mean, rel_tol=1e-12)


def test_dense_indicators_match_direct_computation(dense):
    from hyperp_megatron.model.params import unwrap
    from hyperp_megatron.model.spec import softmax_scale
    from hyperp_megatron.monitors import evenly_spaced
    from hyperp_megatron.operator_norms import rms_inf_norm, rms_rms_norm

    session, iterator = dense
    model, num_layers = unwrap(session.model_chunks[0]), session.cfg.model.num_layers
    reference = Reference(model, softmax_scale(session.cfg.model.kv_channels))
    sampled = monitor_for(session, sample_tokens=5, sample_heads=2)
    sampled.start()
    try:
        metrics = session.runner.train_step(iterator, monitor_for(session, sample_tokens=0, sample_heads=0))
    finally:
        reference.remove()
    sampled_records = sampled.finish()
    assert not metrics["skipped"]
    check_layers(metrics, reference, "attn_z", num_layers)
    for name in ("attn_rms", "mlp_rms"):
        check_layers(metrics, reference, name, num_layers, transform=math.sqrt)
    for name in ("attn_outlier_pct", "mlp_outlier_pct"):
        check_layers(metrics, reference, name, num_layers)
    assert metrics["monitor/attn_rms"] > 0 and "monitor/router_z" not in metrics and "monitor/maxvio" not in metrics
    # Sampling: the same LSE at evenly spaced positions and heads (heads 0 and 3 of 4).
    for layer in range(num_layers):
        lse = torch.cat(reference.lse[layer])[:, [0, 3]][:, :, evenly_spaced(64, 5)]
        assert math.isclose(sampled_records[f"monitor/attn_z/layer{layer:02d}"], float(lse.double().pow(2).mean()),
                            rel_tol=1e-5)
    # Pre-clip gradient norms (clip_grad 0: main_grad is left as it was).
    squares = defaultdict(float)
    for name, param in model.named_parameters():
        squares["decoder.layers." in name and param.dim() == 2] += float(param.main_grad.double().pow(2).sum())
    assert math.isclose(metrics["monitor/grad_norm_matrix"], math.sqrt(squares[True]), rel_tol=1e-6)
    assert math.isclose(metrics["monitor/grad_norm_other"], math.sqrt(squares[False]), rel_tol=1e-6)
    assert math.isclose(metrics["grad_norm"] ** 2, squares[True] + squares[False], rel_tol=1e-5)
    (lr,) = {group["lr"] for group in session.optimizer.param_groups}
    assert {k: v for k, v in metrics.items() if k.startswith("monitor/lr/")} == {
        f"monitor/lr/0.{rule}": lr for rule in ("sphere_muon", "sphere_adam", "adamw")}  # the dense SphereMuon's
    assert 0 <= metrics["monitor/sphere_radius_drift"] < 1e-5
    output = model.output_layer.weight.detach()  # after the step: the monitor measures the updated weights
    assert math.isclose(metrics["monitor/output_rms_inf"], rms_inf_norm(output), rel_tol=1e-5)
    # a 5x-iteration cold start: close to (and below) the exact norm; later monitor steps warm-start
    assert 0.9 * rms_rms_norm(output) < metrics["monitor/output_rms_rms"] <= rms_rms_norm(output) * (1 + 1e-5)


def test_radius_drift_measures_a_perturbed_piece(dense):
    from hyperp_megatron.model.params import unwrap
    from hyperp_megatron.monitors import sphere_radius_drift

    session, _ = dense
    assert sphere_radius_drift(session.optimizer) < 1e-5  # on the sphere after the steps so far
    weight = unwrap(session.model_chunks[0]).decoder.layers[1].self_attention.linear_qkv.weight
    saved = weight.detach().clone()
    m = session.cfg.model
    q_rows = m.num_attention_heads // m.num_query_groups * m.kv_channels
    rows_per_group = q_rows + 2 * m.kv_channels
    with torch.no_grad():
        for group in range(m.num_query_groups):  # the Q piece of every query group: ||Q|| x 1.05
            weight[group * rows_per_group: group * rows_per_group + q_rows] *= 1.05
    try:
        assert math.isclose(sphere_radius_drift(session.optimizer), 0.05, rel_tol=1e-4)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert sphere_radius_drift(session.optimizer) < 1e-5


def _snapshot(session):
    weights = [p.detach().clone() for chunk in session.model_chunks for p in chunk.parameters()]
    inner = [opt.optimizer for opt in session.optimizer.chained_optimizers]  # the SphereMuon instances
    state = [(k, v.clone() if torch.is_tensor(v) else v) for opt in inner for p in opt.state
             for k, v in sorted(opt.state[p].items())]
    return weights, state


def test_nonfinite_loss_skips_the_update(dense):
    session, iterator = dense
    weights, state = _snapshot(session)
    assert state, "the optimizer has state after the previous steps"
    metrics = session.runner.train_step(iterator, poison_loss=True)
    assert metrics["skipped"] and not metrics["update_successful"]
    assert not math.isfinite(metrics["loss"]) and not math.isfinite(metrics["grad_norm"])
    after_weights, after_state = _snapshot(session)
    assert all(torch.equal(a, b) for a, b in zip(weights, after_weights))
    assert len(state) == len(after_state)
    for (key, value), (key_after, value_after) in zip(state, after_state):
        assert key == key_after
        assert torch.equal(value, value_after) if torch.is_tensor(value) else value == value_after
    metrics = session.runner.train_step(iterator)  # the next step trains normally
    assert not metrics["skipped"] and math.isfinite(metrics["loss"])


def test_checkpoint_of_nonfinite_weights_is_refused(dense, tmp_path):
    from hyperp_megatron import checkpoint as ckpt

    session, _ = dense
    param = next(session.model_chunks[0].parameters())
    saved = param.detach().clone()
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    try:
        with pytest.raises(ckpt.NonFiniteStateError, match="refusing to checkpoint step 7"):
            ckpt.save(tmp_path, ckpt.TrainState(step=7), session.model_chunks, session.optimizer, {})
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert not list(tmp_path.glob("step_*"))


def test_moe_router_indicators_match_direct_computation(world_of_one, tmp_path):
    from hyperp_megatron.model.params import unwrap
    from hyperp_megatron.model.spec import softmax_scale

    session, iterator = make_session(MOE, tmp_path)
    model, num_layers = unwrap(session.model_chunks[0]), session.cfg.model.num_layers
    reference = Reference(model, softmax_scale(session.cfg.model.kv_channels))
    try:
        metrics = session.runner.train_step(iterator, monitor_for(session))
    finally:
        reference.remove()
    check_layers(metrics, reference, "router_z", num_layers)
    assert session.runner.num_microbatches > 1  # MaxVio of the last micro-batch differs from the step's
    for layer in range(num_layers):
        for name, counts in (("maxvio_step", reference.sums["counts", layer]),
                             ("maxvio", reference.sums["last_counts", layer])):
            expected = float((counts.max() - counts.mean()) / counts.mean())
            assert math.isclose(metrics[f"monitor/{name}/layer{layer:02d}"], expected, rel_tol=1e-9, abs_tol=1e-12)
    check_layers(metrics, reference, "mlp_rms", num_layers, transform=math.sqrt)
    assert "monitor/sphere_radius_drift" not in metrics  # AdamW: no sphere


# ----------------------------------------------------------------------------------------------
# Distributed: the same records under TP / PP / EP / DP; NaN steps on every rank

MONITORED = {"train": {"steps": 2}, "optim": {"name": "sphere_muon"},
             "monitor": {"interval": 1, "sample_tokens": 16, "sample_heads": 2, "operator_norms": "all"}}


def monitor_records(run_dir) -> dict[int, dict]:
    """{step: {monitor key: value}} from a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("monitor/")} for r in records
            if "monitor/attn_z" in r}


def assert_same_records(records: dict, expected: dict) -> None:
    """Every record within 3e-5 relative (measured <= 2.1e-6: bench/results/parity.json)."""
    assert records.keys() == expected.keys()
    assert {"monitor/attn_z/layer01", "monitor/mlp_outlier_pct", "monitor/grad_norm_matrix",
            "monitor/sphere_radius_drift", "monitor/output_rms_inf", "monitor/output_rms_rms",
            "monitor/hidden_rms_rms_mean", "monitor/hidden_spectral_ratio_mean"} <= records.keys()
    for key, value in expected.items():
        tolerance = 1e-5 if key.endswith("sphere_radius_drift") else 1e-9
        assert math.isclose(records[key], value, rel_tol=3e-5, abs_tol=tolerance), (key, records[key], value)


MODELS = {"dense": {}, "moe": {"model": {"moe": {"sparsity": 2, "granularity": 2}},
                                # One micro-batch per rank: the aux loss's running mean of f over the
                                # micro-batches of a step depends on how they are split over DP.
                                "train": {"micro_batch_size": 4, "global_batch_size": 4}}}


@pytest.fixture(scope="module")
def tp1_records(world_of_one, tmp_path_factory):
    """{model: records} of the single-process runs, in this process (each run once)."""
    from hyperp_megatron.config import load_config
    from hyperp_megatron.train import train

    cache = {}

    def records(model: str) -> dict:
        if model not in cache:
            run_dir = tmp_path_factory.mktemp(f"tp1_{model}")
            extra = merge(MONITORED, merge(MODELS[model], {"logging": {"run_dir": str(run_dir)}}))
            train(load_config(None, merge(TINY, extra)), 1, 0)
            cache[model] = monitor_records(run_dir)
        return cache[model]

    return records


@pytest.mark.tier("parallel")
@pytest.mark.parametrize("model,layout", [
    ("dense", {"tensor": 2}),
    ("moe", {"tensor": 2, "sequence_parallel": True}),  # tokens split over TP; expert-TP 2
    ("moe", {"expert": 2}),  # DP 2: tokens split over replicas; experts over EP
], ids=["tp2", "moe_tp2_sp", "moe_ep2"])
def test_parallel_records_equal_tp1_with_control(tp1_records, model, layout, tmp_path, measured):
    """Control (same process group): with the monitors' all-reduces skipped (each rank reports its own
    partial statistics) the records no longer match."""
    expected = tp1_records(model)
    micro_batch = {"micro_batch_size": 2} if "expert" in layout else {}
    overrides = merge(MONITORED, merge(MODELS[model], {"parallel": layout, "train": micro_batch}))
    run_distributed(real_and_mutant_worker, 2, overrides, tmp_path)
    records, mutant = monitor_records(tmp_path / "real"), monitor_records(tmp_path / "mutant")
    assert records.keys() == expected.keys() == mutant.keys() == {1, 2}
    if model == "moe":
        assert {"monitor/router_z/layer01", "monitor/maxvio"} <= expected[1].keys()
    for step in (1, 2):
        assert_same_records(records[step], expected[step])
    with pytest.raises(AssertionError):
        assert_same_records(mutant[1], expected[1])
    name = f"{model}_{'_'.join(f'{k}{v}' for k, v in layout.items())}"
    measured("parity/monitor_records", name, _worst_relative(records, expected))
    measured("controls", f"monitor_reductions_skipped/{name}", _worst_relative(mutant, expected))


def _worst_relative(records: dict, expected: dict) -> float:
    """Largest relative difference of a monitor record over the steps (records that are 0, and the radius
    drift, a rounding-level number compared in absolute terms, skipped)."""
    return max(abs(records[step][key] / value - 1) for step in expected for key, value in expected[step].items()
               if value and not key.endswith("sphere_radius_drift"))


def real_and_mutant_worker(rank, world_size, overrides, tmp_path):
    """The trainer with monitors, then again with the monitors' reductions skipped (tests/mutants.py)."""
    from mutants import mutated

    train_worker(rank, world_size, merge(overrides, {"logging": {"run_dir": str(tmp_path / "real")}}))
    with mutated("monitor_reductions_skipped"):
        train_worker(rank, world_size, merge(overrides, {"logging": {"run_dir": str(tmp_path / "mutant")}}))


def nan_worker(rank, world_size, overrides):
    """The trainer with a planted NaN, then the guard's agreement when only rank 1 sees a NaN."""
    import torch

    from hyperp_megatron.step import agree_on_step

    result = train_worker(rank, world_size, overrides)
    cpu = torch.device("cpu")
    agreed = agree_on_step(torch.tensor([1.0, 1.0]), torch.tensor(float("nan") if rank == 1 else 1.0), False,
                           torch.zeros(()), False, cpu)
    return result, not agreed["skipped"]


@pytest.mark.tier("parallel")
def test_planted_nan_is_skipped_on_every_rank(tp1_records, tmp_path):
    expected = tp1_records("dense")
    results = run_distributed(nan_worker, 2, merge(MONITORED, {
        "parallel": {"pipeline": 2}, "train": {"steps": 3, "eval_interval": 1},
        "debug": {"nan_at_steps": [2]}, "logging": {"run_dir": str(tmp_path)},
    }))
    for result, agreed in results:  # both pipeline stages skipped step 2
        assert result["skipped_steps"] == 1 and not agreed
        assert math.isnan(result["losses"][1]) and all(math.isfinite(x) for x in result["losses"][::2])
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert [records[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert not records[2]["update_successful"] and records[3]["update_successful"]
    # Weights unchanged by the skipped step: the validation loss after it is bit-identical.
    assert records[2]["val_loss"] == records[1]["val_loss"] != records[3]["val_loss"]
    # PP=2 (a layer per stage) logs TP=1's monitor records at the step before the NaN.
    assert_same_records(monitor_records(tmp_path)[1], expected[1])


@pytest.mark.tier("system")
def test_consecutive_nans_stop_the_run(embedded_corpus, tmp_path):
    config = merge(TINY, {"train": {"steps": 6}, "checkpoint": {"interval": 1, "keep": 0},
                          "debug": {"nan_at_steps": [2, 3, 5]}, "monitor": {"max_consecutive_skips": 2},
                          "logging": {"run_dir": str(tmp_path)}})
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "hyperp_megatron.train", "--config", str(config_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "stopping at step 3: 2 consecutive steps had a non-finite loss or gradient norm" in proc.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["skipped_steps"] == 2
    # Checkpoints after steps 1 and 2 (a skipped step leaves the finite weights), none at the stop.
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000001", "step_000002"]


def test_plot_stability_tool_writes_both_figures(tmp_path):
    import importlib.util

    from hyperp_megatron.config import load_config
    from hyperp_megatron.metrics import write_run_files

    spec = importlib.util.spec_from_file_location("plot_stability", os.path.join(REPO, "tools", "plot_stability.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    runs = []
    for depth in (2, 4):
        run_dir = tmp_path / f"d{depth}"
        cfg = load_config(None, {"model": {"num_layers": depth}, "train": {"steps": 20}})
        write_run_files(run_dir, cfg.to_dict(), {"world_size": 1})
        records = [{"step": s, "loss": 5.0 / s, "grad_norm": 1.0, "skipped_steps": 0} for s in range(1, 21)]
        for record in records[9::10]:
            record.update({"monitor/attn_z": 10.0 + depth, "monitor/attn_z/layer00": 9.0, "monitor/mlp_rms": 0.1,
                           "monitor/lr/0.adamw": 1e-3})
        (run_dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
        runs.append(str(run_dir))
        assert tool.flops_per_step(run_dir, None) == pytest.approx(
            __import__("hyperp_megatron.derived", fromlist=["derive"]).derive(cfg, 1).flops_per_token
            * cfg.train.global_batch_size * cfg.model.seq_length)
    assert tool.main([*runs, "--out-dir", str(tmp_path / "plots"), "--layers"]) == 0
    for name in ("stability_steps.png", "stability_flops.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 10_000
    assert tool.main([str(tmp_path)]) == 2  # not a run directory: a message, no traceback
