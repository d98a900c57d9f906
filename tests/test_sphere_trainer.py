"""Sphere Muon in the real trainer (Megatron GPTModel, Megatron wrappers, dist checkpoints) on gloo.

- TP=2 (gather and distributed Newton-Schulz, fused QKV), DP=2 layer-wise and TP=2 x DP=2 reproduce the
  single-process run (every parameter, gathered) from the same state: from the same initial weights, the
  first steps' losses and the weights after step 1; from the layout's step-3 checkpoint (weights and
  optimizer state), the last steps' losses and the final weights (``check_layout``). PP=2 reproduces it
  bit for bit; EP=2 (layer-wise) reproduces EP=1 from EP=2's checkpoint. Controls: per-shard
  Newton-Schulz and per-shard sphere radii at TP=2, the embedding / output gradients left out of the DP
  all-reduce at DP=2;
- after training every sphere matrix (each Q/K/V piece, each expert, router, gate, output layer)
  still has its initial Frobenius norm, all-reduced over its shard group;
- every parameter lands in exactly one group and an unknown parameter raises;
- checkpoints resume bit-exactly in the same layout (fp32 at TP=2, bf16 with master weights) and
  give the uninterrupted run's next losses and final weights after TP 2 -> 1 and after layer-wise
  DP 2 -> 1. Control: a load that skips the optimizer state;
- the Muon baseline's update equals W (1 - (eta / eta_peak) wd) - eta sqrt(fan_out / fan_in) NS5(U) per
  Q/K/V piece (two steps, so momentum counts), computed directly from the gradients.

Tolerances sit at the measured level (``python bench/parity.py`` writes the measured values to
``bench/results/parity.json``).

Each spawned worker runs several short trainings in one process group (a spawn costs ~10 s of imports).
"""

import math

import pytest

from _dist import run_distributed
from mutants import mutated
from trainer_utils import TINY, merge, parity, train_worker, weight_parity

pytestmark = pytest.mark.tier("parallel")

STEPS = 5
SAVE_AT = 3
SPHERE = {"optim": {"name": "sphere_muon", "lr": 0.05}, "train": {"steps": STEPS}}
MOE = {"moe": {"sparsity": 2, "granularity": 2, "shared_expert": True}, "gated_attention": True}
MOE_EP = {"moe": {"sparsity": 2, "granularity": 2}}  # 4 routed experts: 2 per EP rank
# Asserted bounds vs the single-process run, each a small margin over the largest value measured
# (bench/results/parity.json): the losses; the weights after the first step and at the end (Newton-Schulz
# matrices: max entry error / max entry; Adam-direction parameters: Frobenius).
#
# Why a layout is compared from the same state and not along two free-running 5-step trajectories
# (issue 21): this training is chaotic at the level of rounding. TP=2's step-1 gradients differ from the
# single process's by rounding (embedding: ~2e-7 absolute, 2e-6 of a row's norm: TP splits the matmul
# reductions), the weights after step 1 by 7.5e-7; every later step multiplies the difference by ~3-25
# (Adam's m / (sqrt(v) + eps) jumps by ~lr where a gradient entry sits at the rounding floor, and
# Newton-Schulz multiplies the update's weak directions by up to ~490), so after 5 free steps the matrices
# differed by 3e-5 on the CPU these bounds were first set on and by 3.5e-3 on an AVX-512 one (also with its
# kernels forced to AVX2); after 8 steps by 1.5e-2. A larger Adam eps does not tame it (final 5.8e-4 at
# eps 1e-5, 8.4e-4 at 1e-4): that comparison measured the CPU's rounding, not the layout. From the same state
# (the layout's checkpoint: weights and optimizer state) two steps agree to 3.1e-7 on the AVX-512 CPU, also
# with its kernels forced to AVX2 (ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
# ONEDNN_MAX_CPU_ISA=AVX2), and to 6.2e-7 on the first CPU (its resume_tp1_from_tp2).
LOSS_RTOL = 1e-6  # measured <= 1.1e-7 (TP=2, steps 1..3 from the initial weights; 4..5 from the checkpoint)
STEP1_MATRIX_RTOL = 2e-6  # 7.6e-7 (TP=2)
# EP=2 vs EP=1 after step 1, as test_moe.py's bound: the experts see few tokens, and Newton-Schulz amplifies
# the weak directions of their low-rank gradients (and their rounding): 4.1e-7 here (AVX-512), 1.95e-6 with
# the kernels forced to AVX2. The controls' step-1 matrix errors are 2.1e-3 and 5.6e-2.
MOE_STEP1_MATRIX_RTOL = 1e-5
STEP1_ADAM_FRO_RTOL = 1e-3  # 1.7e-4 (TP=2)
FINAL_MATRIX_RTOL = 2e-4  # 3.1e-7 (TP=2 / DP=2, from the step-3 checkpoint); controls: >= 4e-2
FINAL_ADAM_FRO_RTOL = 5e-3  # 4.0e-6 (TP=2, from the step-3 checkpoint)
TP2 = {"parallel": {"tensor": 2}}
FORCED_LAYOUTS = {  # checked by check_layout; their runs save the step-SAVE_AT checkpoint
    "tp2_gather": TP2,
    "tp2_distributed": {**TP2, "optim": {"name": "sphere_muon", "lr": 0.05, "ns_mode": "distributed"}},
    "dp2_layer_wise": {"parallel": {"distributed_optimizer": True}},
}
LAYOUT_CONTROLS = {  # a wrong variant of a layout: mutation, layout
    "tp2_newton_schulz_per_shard": ("newton_schulz_per_shard", TP2),
    "tp2_sphere_radius_per_shard": ("sphere_radius_per_shard", TP2),
    "dp2_grad_sync_skips_embedding_and_output": ("dp_grad_sync_skips_embedding_and_output",
                                                 {"parallel": {"distributed_optimizer": True}}),
}

def _run(overrides: dict, **sections) -> dict:
    return merge(SPHERE, {**overrides, **sections})


def _saving(run_dir) -> dict:
    return {"logging": {"run_dir": str(run_dir)},
            "checkpoint": {"interval": SAVE_AT, "save_final": False, "keep": 0}}


def _loading(run_dir, checkpoint) -> dict:
    return {"logging": {"run_dir": str(run_dir)}, "checkpoint": {"load": str(checkpoint)}}


def _checkpoint(run_dir):
    return run_dir / "checkpoints" / f"step_{SAVE_AT:06d}"


# ---------------------------------------------------------------------- workers


def _sphere_norms(optimizer) -> dict[str, list[float]]:
    """Per-piece Frobenius norms of every sphere parameter, all-reduced over its shard group."""
    import torch
    import torch.distributed as dist

    norms = {}
    for index, wrapped in enumerate(optimizer.chained_optimizers):
        sphere = wrapped.optimizer
        for group in sphere.param_groups:
            for position, param in enumerate(group["params"]):
                layout = sphere.layout(param)
                if layout.rule not in ("sphere_muon", "sphere_adam"):
                    continue
                weight = param.detach().float()
                split = layout.qkv_split
                pieces = weight.view(split.num_local_query_groups, -1, weight.size(-1)).split(
                    split.piece_rows, dim=1) if split else [weight]
                squares = torch.stack([piece.square().sum() for piece in pieces]).double()
                if layout.group is not None and layout.group.size() > 1:
                    dist.all_reduce(squares, group=layout.group)  # the group sharding this matrix
                norms[f"{index}.{group['rule']}.{position}"] = squares.sqrt().tolist()
    return norms


def _norm_run(rank: int, world_size: int, overrides: dict) -> dict:
    """Train a few steps through the trainer's session; sphere norms before and after, and radii."""
    from hyperp_megatron import train as trainer
    from hyperp_megatron.compat import apply_cpu_patches
    from hyperp_megatron.config import load_config, validate

    apply_cpu_patches()
    cfg = load_config(None, merge(TINY, overrides))
    validate(cfg, world_size)
    try:
        s = trainer.setup(cfg, world_size, rank)
        iterator = trainer._train_iterator(s, consumed_samples=0)
        initial = _sphere_norms(s.optimizer)
        losses = []
        for _ in range(cfg.train.steps):
            for group in s.optimizer.param_groups:
                group["lr"] = cfg.optim.lr
            losses.append(s.runner.train_step(iterator)["loss"])
        return {"initial": initial, "final": _sphere_norms(s.optimizer), "losses": losses}
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def _trained(rank: int, world_size: int, overrides: dict) -> dict:
    """Losses, and final full weights on rank 0 (see trainer_utils.gather_full_weights)."""
    result = train_worker(rank, world_size, overrides, weights=True)
    return {key: result[key] for key in ("losses", "weights", "weights_step1", "replica_spread")}


def two_process_worker(rank: int, world_size: int, tmp_path) -> dict:
    moe_model = {"model": MOE_EP}
    runs = {name: _run(layout, **_saving(tmp_path / name)) for name, layout in FORCED_LAYOUTS.items()}
    runs.update({
        "pp2": _run({"parallel": {"pipeline": 2}}),
        "ep2_layer_wise_moe": _run(moe_model, parallel={"expert": 2, "distributed_optimizer": True},
                                   **_saving(tmp_path / "ep2_layer_wise_moe")),
    })
    results = {name: _trained(rank, world_size, overrides) for name, overrides in runs.items()}
    # EP=1 (DP=2) from EP=2's checkpoint: the reference of the EP=2 run's last steps and final weights.
    results["ep1_dp2_moe_from_ep2"] = _trained(rank, world_size, _run(moe_model, **_loading(
        tmp_path / "ep1_dp2_moe_from_ep2", _checkpoint(tmp_path / "ep2_layer_wise_moe"))))
    results["ep1_dp2_moe"] = _trained(rank, world_size, _run(moe_model))
    for name, (mutation, layout) in LAYOUT_CONTROLS.items():
        with mutated(mutation):
            results[name] = _trained(rank, world_size, _run(layout, **_saving(tmp_path / name)))
    results["tp2_resumed"] = train_worker(rank, world_size, _run(
        TP2, **_loading(tmp_path / "tp2_resumed", _checkpoint(tmp_path / "tp2_gather"))))["losses"]
    # MoE (routed experts with expert-TP, shared expert, router) and per-head gates, QKV under TP=2 + SP.
    results["norms"] = _norm_run(rank, world_size, _run(
        {"model": MOE, "parallel": {"tensor": 2, "sequence_parallel": True}},
        optim={"name": "sphere_muon", "lr": 0.2, "ns_mode": "distributed"}))
    return results


def _group_checks() -> dict:
    """Build the MoE + gated model and its optimizer in this process: role and group bookkeeping."""
    import torch

    from hyperp_megatron.config import load_config
    from hyperp_megatron.model.gpt import build_model
    from hyperp_megatron.optim.param_groups import assign_parameters, layout_for
    from hyperp_megatron.derived import derive
    from hyperp_megatron.optim.builder import build_sphere_optimizer
    from hyperp_megatron.parallel import init_model_parallel

    cfg = load_config(None, merge(TINY, {"model": MOE, "optim": {"name": "sphere_muon"}}))
    pg_collection = init_model_parallel(cfg.parallel, cfg.train.seed)
    try:
        chunks = build_model(cfg, pg_collection, 256)
        optimizer = build_sphere_optimizer(cfg, chunks, pg_collection, derive(cfg, 1, vocab_size=256))
        in_groups = [id(p) for wrapped in optimizer.chained_optimizers for g in wrapped.optimizer.param_groups
                     for p in g["params"]]
        rules = {a.name: a.rule for a in assign_parameters(chunks, "sphere_muon", pg_collection)}
        for group in optimizer.param_groups:  # as the trainer sets the schedule's LR
            group["lr"] = 0.123
        inner_lrs = {g["lr"] for wrapped in optimizer.chained_optimizers for g in wrapped.optimizer.param_groups}
        try:
            layout_for("decoder.layers.0.mlp.mystery.weight", torch.zeros(2, 2), optimizer_name="sphere_muon",
                       config=chunks[0].config, pg_collection=pg_collection)
            unknown_error = None
        except ValueError as error:
            unknown_error = str(error)
        return {"num_params": len(list(chunks[0].parameters())), "in_groups": len(in_groups),
                "distinct_in_groups": len(set(in_groups)),
                "all_covered": set(in_groups) == {id(p) for p in chunks[0].parameters()},
                "num_chained": len(optimizer.chained_optimizers), "rules": rules, "unknown_error": unknown_error,
                "inner_lrs": inner_lrs}
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def _muon_rule_check(num_steps: int = 2) -> dict:
    """The Muon baseline in the trainer vs its update rule computed here from the captured gradients:
    M <- mu M + G, U = G + mu M, W <- W (1 - (eta / eta_peak) wd) - eta sqrt(fan_out / fan_in) NS5(U)
    (independent weight decay, as the HyperP reference's baseline), with Q, K and V of the fused QKV as
    separate matrices; eta = eta_peak / 2. Returns the largest relative error per parameter."""
    import torch

    from hyperp_megatron import train as trainer
    from hyperp_megatron.model.params import unwrap
    from hyperp_megatron.config import load_config
    from hyperp_megatron.optim.newton_schulz import newton_schulz5

    peak_lr, wd, mu = 0.02, 0.1, 0.95
    lr = peak_lr / 2
    cfg = load_config(None, merge(TINY, _run({"optim": {"name": "muon", "lr": peak_lr, "weight_decay": wd,
                                                        "momentum": mu, "clip_grad": 0.0}})))
    s = trainer.setup(cfg, 1, 0)
    try:
        iterator = trainer._train_iterator(s, consumed_samples=0)
        model = unwrap(s.model_chunks[0])
        m = cfg.model
        q_rows = m.num_attention_heads // m.num_query_groups * m.kv_channels
        qkv_split = [q_rows, m.kv_channels, m.kv_channels]  # rows of one query group: Q heads, K, V
        checked = {name: p for name, p in model.named_parameters()
                   if name.startswith("decoder.layers.1.") and p.dim() == 2}
        momentum = {name: torch.zeros_like(p) for name, p in checked.items()}
        errors = {}
        for _ in range(num_steps):
            before = {name: p.detach().clone() for name, p in checked.items()}
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            s.runner.train_step(iterator)
            for name, param in checked.items():
                grad = param.main_grad.detach().float()
                momentum[name] = mu * momentum[name] + grad
                update = grad + mu * momentum[name]
                if name.endswith("linear_qkv.weight"):  # per query group [Q heads, K, V] rows
                    groups = update.view(m.num_query_groups, -1, update.shape[-1]).split(qkv_split, dim=1)
                    pieces = [piece.reshape(-1, update.shape[-1]) for piece in groups]
                    steps = [math.sqrt(p.shape[0] / p.shape[1]) * newton_schulz5(p) for p in pieces]
                    step = torch.cat([st.view(m.num_query_groups, -1, update.shape[-1]) for st in steps], dim=1)
                    step = step.reshape_as(update)
                else:
                    step = math.sqrt(update.shape[0] / update.shape[1]) * newton_schulz5(update)
                expected = before[name] * (1 - lr / peak_lr * wd) - lr * step
                error = ((param.detach() - expected).abs().max() / (param.detach() - before[name]).abs().max())
                errors[name] = max(errors.get(name, 0.0), error.item())
        return errors
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def one_process_worker(rank: int, world_size: int, tmp_path) -> dict:
    from hyperp_megatron.compat import apply_cpu_patches

    apply_cpu_patches()
    results = {"groups": _group_checks()}
    results["reference"] = _trained(rank, world_size, SPHERE)
    results["muon_rule"] = _muon_rule_check()
    results["muon"] = train_worker(rank, world_size, _run({"optim": {"name": "muon", "lr": 0.02}}))["losses"]
    for saved in (*FORCED_LAYOUTS, *LAYOUT_CONTROLS):  # the single process from each layout's checkpoint
        results[f"from_{saved}"] = _trained(rank, world_size, _run(
            {}, **_loading(tmp_path / f"from_{saved}", _checkpoint(tmp_path / saved))))
    with mutated("reshard_without_optimizer_state"):
        resumed = _run({}, **_loading(tmp_path / "mutant", _checkpoint(tmp_path / "tp2_gather")))
        results["tp1_from_tp2_without_optimizer_state"] = _trained(rank, world_size, resumed)
    bf16 = {"train": {"precision": "bf16"}}  # Float16 wrapper: fp32 master weights in the checkpoint
    results["bf16"] = train_worker(rank, world_size, _run(bf16, **_saving(tmp_path / "bf16")))["losses"]
    results["bf16_resumed"] = train_worker(rank, world_size, _run(
        bf16, **_loading(tmp_path / "bf16_resumed", _checkpoint(tmp_path / "bf16"))))["losses"]
    return results


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def two(embedded_corpus, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sphere_trainer")
    results = run_distributed(two_process_worker, 2, tmp_path)
    for name, value in results[0].items():  # every rank reports the same losses and all-reduced norms
        same = (value["losses"] == results[1][name]["losses"]) if isinstance(value, dict) and "weights" in value \
            else value == results[1][name]
        assert same, name
    return results[0], tmp_path


@pytest.fixture(scope="module")
def single(two):
    _, tmp_path = two
    (result,) = run_distributed(one_process_worker, 1, tmp_path)
    return result


def check_parity(measured, name: str, result: dict, reference: dict) -> dict:
    """``result`` reproduces ``reference`` (losses and every weight) within the asserted bounds."""
    errors = parity(result, reference, "sphere_muon")
    measured("parity/sphere_muon_trainer", name, errors)
    assert errors["replica_spread"] == 0.0, errors
    assert errors["loss_rel"] <= LOSS_RTOL, (errors, result["losses"], reference["losses"])
    if "step1" in errors:
        assert errors["step1"]["matrix_max_rel"] <= STEP1_MATRIX_RTOL, errors
        assert errors["step1"]["adam_fro_rel"] <= STEP1_ADAM_FRO_RTOL, errors
    assert errors["final"]["matrix_max_rel"] <= FINAL_MATRIX_RTOL, errors
    assert errors["final"]["adam_fro_rel"] <= FINAL_ADAM_FRO_RTOL, errors
    return errors


# ---------------------------------------------------------------------- tests


def test_reference_learns(single):
    losses = single["reference"]["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.05, losses


def layout_errors(result: dict, reference: dict, resumed: dict) -> dict:
    """How far a layout's run is from the single-process run, from the same state (see the bounds' comment):
    ``free``: both from the same initial weights, the losses of steps 1..SAVE_AT and the weights after
    step 1; ``forced``: ``resumed`` (the single process from the layout's step-SAVE_AT checkpoint) vs the
    layout's losses of the later steps and its final weights (trainer_utils.parity)."""
    return {"free": {"loss_rel": parity({**result, "losses": result["losses"][:SAVE_AT]},
                                        {**reference, "losses": reference["losses"][:SAVE_AT]},
                                        "sphere_muon")["loss_rel"],
                     "step1": weight_parity(result["weights_step1"], reference["weights_step1"], "sphere_muon")},
            "forced": parity(resumed, _resumed_vs_uninterrupted(resumed, result), "sphere_muon"),
            "replica_spread": result["replica_spread"]}


def check_layout(measured, name: str, result: dict, reference: dict, resumed: dict,
                 step1_matrix_rtol: float = STEP1_MATRIX_RTOL) -> dict:
    """``result`` reproduces the single-process run from the same state within the asserted bounds."""
    errors = layout_errors(result, reference, resumed)
    measured("parity/sphere_muon_trainer", name, errors)
    free, forced = errors["free"], errors["forced"]
    assert errors["replica_spread"] == 0.0, errors
    assert free["loss_rel"] <= LOSS_RTOL, (errors, result["losses"], reference["losses"])
    assert free["step1"]["matrix_max_rel"] <= step1_matrix_rtol, errors
    assert free["step1"]["adam_fro_rel"] <= STEP1_ADAM_FRO_RTOL, errors
    assert forced["loss_rel"] <= LOSS_RTOL, (errors, result["losses"], resumed["losses"])
    assert forced["final"]["matrix_max_rel"] <= FINAL_MATRIX_RTOL, errors
    assert forced["final"]["adam_fro_rel"] <= FINAL_ADAM_FRO_RTOL, errors
    return errors


@pytest.mark.parametrize("layout", list(FORCED_LAYOUTS))
def test_layout_matches_single_process(two, single, layout, measured):
    check_layout(measured, layout, two[0][layout], single["reference"], single[f"from_{layout}"])


def test_pipeline_parallel_is_bit_exact(two, single, measured):
    """PP=2 runs each layer with the single process's kernels and shapes: the whole free-running run agrees
    bit for bit (no rounding to amplify), so it is compared along the trajectory."""
    errors = check_parity(measured, "pp2", two[0]["pp2"], single["reference"])
    assert errors["loss_rel"] == errors["final"]["matrix_max_rel"] == errors["final"]["adam_fro_rel"] == 0.0, errors


@pytest.mark.parametrize("control", list(LAYOUT_CONTROLS))
def test_control_layout_bug_is_caught(two, single, control, measured):
    """Negative controls: per-shard Newton-Schulz or per-shard sphere radii at TP=2, the embedding's and output
    layer's gradients left out of the DP all-reduce at DP=2. check_layout fails on each, and its part from
    the same checkpoint does on its own (each layout bug acts at every step)."""
    result, resumed = two[0][control], single[f"from_{control}"]
    with pytest.raises(AssertionError):
        check_layout(lambda *args: None, "control", result, single["reference"], resumed)
    errors = layout_errors(result, single["reference"], resumed)
    measured("controls", f"{LAYOUT_CONTROLS[control][0]}/trainer_{control.split('_')[0]}", errors)
    forced = errors["forced"]
    assert (forced["final"]["matrix_max_rel"] > 10 * FINAL_MATRIX_RTOL
            or forced["final"]["adam_fro_rel"] > 10 * FINAL_ADAM_FRO_RTOL), errors


def test_tp2_x_dp2_matches_single_process(single, embedded_corpus, measured, tmp_path):
    layout = {"parallel": {"tensor": 2, "distributed_optimizer": True}}
    results = run_distributed(_trained, 4, _run(layout, **_saving(tmp_path / "tp2_x_dp2")))
    assert all(result["losses"] == results[0]["losses"] for result in results)
    (resumed,) = run_distributed(_trained, 1, _run({}, **_loading(tmp_path / "from_tp2_x_dp2",
                                                                  _checkpoint(tmp_path / "tp2_x_dp2"))))
    check_layout(measured, "tp2_x_dp2_layer_wise", results[0], single["reference"], resumed)


def test_expert_parallel_layer_wise_matches_ep1(two, measured):
    """EP=2 vs EP=1 (both DP=2), from the same state as check_layout: the same initial weights, then EP=1
    from EP=2's step-SAVE_AT checkpoint."""
    check_layout(measured, "ep2_layer_wise_moe_vs_ep1", two[0]["ep2_layer_wise_moe"], two[0]["ep1_dp2_moe"],
                 two[0]["ep1_dp2_moe_from_ep2"], step1_matrix_rtol=MOE_STEP1_MATRIX_RTOL)


def test_sphere_matrices_keep_their_initial_norm(two, measured):
    norms = two[0]["norms"]
    assert norms["losses"][-1] < norms["losses"][0]  # the weights did move
    initial, final = norms["initial"], norms["final"]
    # qkv (3 pieces x 2 layers), proj, gate, router, shared fc1/fc2, output; experts: 3 x 2 x 2
    assert len(initial) == 2 * 6 + 1 + 12, sorted(initial)
    assert sum(len(pieces) == 3 for pieces in initial.values()) == 2  # the fused QKVs
    drift = max(abs(after / before - 1) for name, pieces in initial.items()
                for before, after in zip(pieces, final[name]))
    measured("sphere_invariants", "moe_gated_tp2_sp_max_radius_drift_rel", drift)
    assert drift < 1e-6, drift


def test_every_parameter_in_exactly_one_group(single):
    groups = single["groups"]
    assert groups["in_groups"] == groups["distinct_in_groups"] == groups["num_params"]
    assert groups["all_covered"] and groups["num_chained"] == 2  # dense + routed experts
    assert groups["inner_lrs"] == {0.123}  # the trainer's LR reaches every SphereMuon group
    rules = groups["rules"]
    expected = {
        "decoder.layers.0.self_attention.linear_qkv.weight": "sphere_muon",
        "decoder.layers.0.self_attention.linear_gate.weight": "sphere_muon",
        "decoder.layers.0.mlp.router.weight": "sphere_muon",
        "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight": "sphere_muon",
        "decoder.layers.0.mlp.shared_experts.linear_fc1.weight": "sphere_muon",
        "decoder.layers.1.self_attention.k_layernorm.weight": "adamw",
        "decoder.final_layernorm.weight": "adamw",
        "embedding.word_embeddings.weight": "adamw",
        "output_layer.weight": "sphere_adam",
    }
    assert {name: rules[name] for name in expected} == expected


def test_unknown_parameter_raises(single):
    assert "mystery" in (single["groups"]["unknown_error"] or "")


def test_resume_same_layout_is_bit_exact(two, single):
    assert two[0]["tp2_resumed"] == two[0]["tp2_gather"]["losses"][SAVE_AT:]
    assert single["bf16_resumed"] == single["bf16"][SAVE_AT:]  # bf16 params, fp32 masters and state


def _resumed_vs_uninterrupted(resumed: dict, uninterrupted: dict) -> dict:
    """The uninterrupted run's last losses and final weights as the reference of a resumed run."""
    return {"losses": uninterrupted["losses"][SAVE_AT:], "weights": uninterrupted["weights"]}


@pytest.mark.parametrize("resumed, saved", [("tp1_from_tp2", "tp2_gather"),
                                            ("dp1_from_dp2_layer_wise", "dp2_layer_wise")])
def test_resume_in_another_layout(two, single, resumed, saved, measured):
    check_parity(measured, f"resume_{resumed}", single[f"from_{saved}"],
                 _resumed_vs_uninterrupted(single[f"from_{saved}"], two[0][saved]))


def test_control_reshard_without_optimizer_state_is_caught(two, single, measured):
    """Negative control: a TP 2 -> 1 load that restores the weights but not the optimizer state
    (momentum, Adam moments) fails the resume check above."""
    mutant = single["tp1_from_tp2_without_optimizer_state"]
    reference = _resumed_vs_uninterrupted(mutant, two[0]["tp2_gather"])
    with pytest.raises(AssertionError):
        check_parity(lambda *args: None, "control", mutant, reference)
    errors = parity(mutant, reference, "sphere_muon")
    measured("controls", "reshard_without_optimizer_state/sphere_tp2_to_tp1", errors)
    assert errors["loss_rel"] > 100 * LOSS_RTOL, errors
    assert errors["final"]["matrix_max_rel"] > 10 * FINAL_MATRIX_RTOL, errors


def test_muon_baseline_trains(single):
    losses = single["muon"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.05, losses


def test_muon_baseline_update_rule(single, measured):
    errors = single["muon_rule"]
    assert len(errors) == 4, sorted(errors)  # qkv, proj, fc1, fc2 of layer 1
    measured("update_rules", "muon_baseline_trainer_max_rel", max(errors.values()))
    assert max(errors.values()) < 1e-5, errors  # measured 8e-7 of the step's largest entry
