"""MoE with SqrtGate (docs/method.md section 4) on Megatron-Core.

- the MoE layer equals a direct per-token reference (top-k on the logits, softmax over the k,
  sqrt gates, sqrt(1/2) shared-expert mix; plain gates: plain sum);
- SqrtGate keeps the routed-output RMS across k, plain gates lose ~1/sqrt(k);
- the switch load-balancing loss (gamma at perfect balance, larger under imbalance, the router's value
  equals the formula), MaxVio, and the gradient through the sqrt gate;
- training: EP=2 (all-to-all) and TP=2 x EP=2 (+SP, expert-TP=2; all-gather dispatcher) reproduce the
  single-process run: LM loss and every layer's aux loss, step by step, and the weights, with
  SequentialMLP and with the torch grouped-GEMM experts (``model/experts.py``). Control: the router's
  load statistics kept rank-local;
- several micro-batches: DP=1 x 4 vs DP=2 x 2 agree at step 1 (LM and per-layer aux loss) and stay
  within a measured bound afterwards (the aux-loss gradient's running mean of f; see the test).
"""

import json
import math
import os

import pytest
import torch

from _dist import run_distributed
from trainer_utils import REPO, merge, parity, train_worker

pytestmark = pytest.mark.tier("unit")

HIDDEN = 64


def build_moe_layer(pg_collection, *, sparsity, granularity, shared_expert=False, gate="sqrt",
                    aux_loss_coeff=0.1, expert_width=32, seed=1):
    """One HyperP MoE layer (the ``mlp`` of the GPT layer spec), initialized as in the model."""
    from megatron.core.transformer.spec_utils import build_module

    from hyperp_megatron.config import load_config
    from hyperp_megatron.model.gpt import transformer_config
    from hyperp_megatron.model.init import initialize_parameters
    from hyperp_megatron.model.spec import build_layer_spec

    moe = {"sparsity": sparsity, "granularity": granularity, "shared_expert": shared_expert, "gate": gate,
           "aux_loss_coeff": aux_loss_coeff}
    cfg = load_config(None, {"model": {"num_layers": 1, "hidden_size": HIDDEN, "num_attention_heads": 4,
                                       "num_query_groups": 2, "ffn_hidden_size": expert_width * granularity,
                                       "moe": moe},
                             "train": {"seed": seed}})
    layer = build_module(build_layer_spec(cfg.model, pg_collection=pg_collection).submodules.mlp,
                         config=transformer_config(cfg, pg_collection))
    layer.set_layer_number(1)
    initialize_parameters(layer, cfg, pg_collection)
    return layer


def hidden_states(num_tokens=512, seed=0):
    return torch.randn(num_tokens, 1, HIDDEN, generator=torch.Generator().manual_seed(seed))  # [s, b, h]


def rms(x):
    return x.float().pow(2).mean().sqrt().item()


# ----------------------------------------------------------------------------------------------
# The layer against a direct reference


def reference_moe(layer, x, gate):
    """sum_{i in topk} w_i E_i(x) (+ shared), computed token by token from the layer's own weights."""
    tokens = x.view(-1, HIDDEN)
    logits = tokens @ layer.router.weight.t()
    top_logits, top_idx = logits.topk(layer.router.topk, dim=-1)
    g = torch.softmax(top_logits, dim=-1)
    w = torch.sqrt(g + 1e-30) if gate == "sqrt" else g
    out = torch.zeros_like(tokens)
    for e, expert in enumerate(layer.experts.local_experts):
        expert_out = expert(tokens)[0]
        weight = (w * (top_idx == e)).sum(dim=-1, keepdim=True)
        out += weight * expert_out
    if layer.shared_experts is not None:
        shared = layer.shared_experts(tokens)
        out = math.sqrt(0.5) * (out + shared) if gate == "sqrt" else out + shared
    return out.view_as(x)


@pytest.mark.parametrize("gate", ["sqrt", "plain"])
@pytest.mark.parametrize("shared_expert", [True, False], ids=["shared", "no_shared"])
def test_layer_matches_reference(pg_collection, gate, shared_expert):
    from hyperp_megatron.model.moe import HyperPMoELayer
    from hyperp_megatron.model.router import SqrtGateRouter

    layer = build_moe_layer(pg_collection, sparsity=3, granularity=3, shared_expert=shared_expert, gate=gate)
    assert isinstance(layer, HyperPMoELayer) and isinstance(layer.router, SqrtGateRouter)
    assert layer.router.weight.shape == (9 - int(shared_expert), HIDDEN)
    assert layer.router.topk == 3 - int(shared_expert)
    assert (layer.shared_experts is not None) == shared_expert
    assert all(p.shape[0] == 2 * 32 for n, p in layer.named_parameters() if n.endswith("fc1.weight"))
    assert not any("bias" in n for n, _ in layer.named_parameters())
    layer.eval()
    x = hidden_states(64)
    with torch.no_grad():
        out, bias = layer(x)
        expected = reference_moe(layer, x, gate)
    assert bias is None
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_reference_moe_configs_load_and_build(pg_collection):
    """configs/hyperp/moe_d*.yaml validate on their documented layouts; d8 builds (on the meta device,
    at TP = 1) with 63 routed experts of width 4C/8 = 512, top-7, a shared expert and the sqrt(1/2) mix."""
    import glob

    from megatron.core.models.gpt import GPTModel

    from hyperp_megatron.config import load_config, validate
    from hyperp_megatron.model.gpt import transformer_config
    from hyperp_megatron.model.spec import build_layer_spec

    paths = sorted(glob.glob(os.path.join(REPO, "configs", "hyperp", "moe_d*.yaml")))
    assert len(paths) == 5
    for path in paths:
        cfg = load_config(path)
        validate(cfg, world_size=16 * cfg.parallel.tensor)
        assert (cfg.model.moe.num_routed_experts, cfg.model.moe.router_topk) == (63, 7)
    cfg = load_config(os.path.join(REPO, "configs", "hyperp", "moe_d8.yaml"),
                      {"parallel": {"distributed_optimizer": False}, "train": {"precision": "fp32"}})
    with torch.device("meta"):
        model = GPTModel(config=transformer_config(cfg, pg_collection),
                         transformer_layer_spec=build_layer_spec(cfg.model, pg_collection=pg_collection),
                         vocab_size=32000, max_sequence_length=cfg.model.seq_length,
                         share_embeddings_and_output_weights=False, position_embedding_type="rope",
                         pg_collection=pg_collection)
    for layer in model.decoder.layers:
        moe = layer.mlp
        assert moe.router.weight.shape == (63, 1024) and moe.router.topk == 7
        assert len(moe.experts.local_experts) == 63
        assert moe.experts.local_experts[0].linear_fc1.weight.shape == (2 * 512, 1024)
        assert moe.shared_experts.linear_fc2.weight.shape == (1024, 512)
        assert moe.shared_expert_scale == pytest.approx(math.sqrt(0.5))


# ----------------------------------------------------------------------------------------------
# SqrtGate keeps the output RMS


def test_sqrt_gate_keeps_output_rms_plain_gate_does_not(pg_collection):
    """16 routed experts of equal width (independent random weights, so nearly uncorrelated outputs of
    equal RMS), top-k for k in 1, 2, 4, 8."""
    x = hidden_states(1024)
    measured = {}
    for gate in ("sqrt", "plain"):
        for k in (1, 2, 4, 8):
            layer = build_moe_layer(pg_collection, sparsity=16 // k, granularity=k, gate=gate, seed=7)
            layer.eval()
            with torch.no_grad():
                measured[gate, k] = rms(layer(x)[0])
    sqrt_rms = [measured["sqrt", k] for k in (1, 2, 4, 8)]
    assert max(sqrt_rms) / min(sqrt_rms) < 1.1, measured
    for k in (2, 4, 8):  # plain gates: RMS falls like 1/sqrt(k) (measured 1.0-1.08 x that)
        ratio = measured["plain", k] / measured["plain", 1]
        assert 0.9 < ratio * math.sqrt(k) < 1.25, measured


# ----------------------------------------------------------------------------------------------
# Load balancing, MaxVio, gradient through the gate


def test_aux_loss_is_gamma_at_perfect_balance_and_rises_under_imbalance():
    from hyperp_megatron.model.router import switch_load_balancing_loss, topk_gates

    num_tokens, num_experts, topk, gamma = 64, 8, 2, 0.1
    uniform = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    balanced = torch.full((num_experts,), num_tokens * topk / num_experts)
    loss = switch_load_balancing_loss(uniform, balanced, num_tokens, num_tokens, topk, gamma)
    assert loss.item() == pytest.approx(gamma, rel=1e-6)

    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(0))
    losses = []
    for skew in (0.0, 1.0, 3.0):  # favour expert 0 more and more
        skewed = logits + skew * torch.nn.functional.one_hot(torch.tensor(0), num_experts)
        _, routing_map = topk_gates(skewed, topk, "sqrt")
        scores = torch.softmax(skewed, dim=-1)
        losses.append(switch_load_balancing_loss(scores, routing_map.sum(0), num_tokens, num_tokens, topk,
                                                 gamma).item())
    assert gamma <= losses[0] < losses[1] < losses[2], losses
    assert losses[2] > 1.5 * gamma, losses


def test_max_violation():
    from hyperp_megatron.model.router import max_violation

    assert max_violation(torch.tensor([5, 5, 5, 5])).item() == 0.0
    assert max_violation(torch.tensor([8, 0, 0, 0])).item() == pytest.approx(3.0)  # E - 1
    assert max_violation(torch.tensor([2.0, 1.0, 1.0, 0.0])).item() == pytest.approx(1.0)
    batched = max_violation(torch.tensor([[1, 1], [3, 1]]))
    torch.testing.assert_close(batched, torch.tensor([0.0, 0.5]))
    assert max_violation(torch.zeros(4)).item() == 0.0


def test_router_aux_loss_equals_formula_and_reaches_the_router(pg_collection):
    gamma = 0.1
    layer = build_moe_layer(pg_collection, sparsity=3, granularity=3, shared_expert=True, aux_loss_coeff=gamma)
    layer.train()
    x = hidden_states(256)
    layer(x)[0].sum().backward()
    tokens = x.view(-1, HIDDEN)
    logits = tokens @ layer.router.weight.t()
    num_experts, topk = logits.shape[1], layer.router.topk
    counts = torch.zeros(num_experts).scatter_add(0, logits.topk(topk).indices.flatten(),
                                                 torch.ones(tokens.shape[0] * topk))
    f = counts / (tokens.shape[0] * topk)
    p = torch.softmax(logits, dim=-1).mean(0)
    expected = gamma * num_experts * (f * p).sum()
    assert layer.router.pop_aux_loss().item() == pytest.approx(expected.item(), rel=1e-5)
    assert layer.router.pop_aux_loss() is None  # popped

    # The aux loss alone (LM-side gradient zero) reaches the router weight.
    layer.zero_grad()
    (layer(x)[0] * 0).sum().backward()
    grad = layer.router.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradient_flows_through_the_sqrt_gate(pg_collection):
    layer = build_moe_layer(pg_collection, sparsity=4, granularity=4, aux_loss_coeff=0.0)  # gate path only
    layer.train()
    out, _ = layer(hidden_states(256))
    out.pow(2).sum().backward()
    grad = layer.router.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert layer.router.pop_aux_loss() is None  # no aux loss at gamma = 0


# ----------------------------------------------------------------------------------------------
# Training: expert / tensor / data parallel layouts reproduce the single-process run

STEPS = 4
MOE_MODEL = {"ffn_hidden_size": 192,  # s = 3, k = 3 with a shared expert: 8 routed experts of width 64, top-2
             "moe": {"sparsity": 3, "granularity": 3, "shared_expert": True, "gate": "sqrt", "aux_loss_coeff": 0.1},
             # Top-k routing is discontinuous: layouts differ by ~5e-8 in the loss (TP reductions) and a
             # near-tie expert choice can flip a few steps later. With the SDPA attention, TP=2 x EP=2 flipped
             # one at step 3 (loss off by 3e-5, same step-1/2 deviations as here); with Megatron's attention
             # these 4 steps stay within 3e-7. This test checks token dispatch and experts; the SDPA attention's
             # TP parity is tests/test_sdpa_attention.py's, and MoE + SDPA layouts run in test_monitors.py.
             "attention_backend": "megatron_local"}
# Sphere Muon (every expert its own sphere); the sphere step is an angle: 0.1 rad per step moves the
# weights enough in 4 steps.
OPTIMIZER = {"name": "sphere_muon", "lr": 0.1}
NUM_LAYERS = 2
# Bounds a small margin above the largest value measured (bench/results/parity.json; see
# trainer_utils.parity for why final weights agree less closely than losses and the first step).
LOSS_RTOL = 1e-6  # LM loss, every step: measured <= 2.1e-7 (TP=2 x EP=2)
AUX_RTOL = 3e-6  # every layer's aux loss, every step: 8.1e-7
STEP1_MATRIX_RTOL = 1e-5  # 2.9e-6
FINAL_MATRIX_RTOL = 3e-4  # 8.3e-5
FINAL_ADAM_FRO_RTOL = 1e-2  # 4.2e-3
# DP=2 x 2 vs DP=1 x 4 micro-batches (see the test): steps 2-4 differ through the aux-loss gradient
MICRO_BATCH_LOSS_RTOL = 2e-3  # measured 6.9e-4
MICRO_BATCH_AUX_RTOL = 4e-2  # 1.4e-2


def moe_overrides(micro_batch_size: int, parallel: dict | None = None, dispatcher: str = "alltoall",
                  aux_loss_coeff: float = 0.1, grouped_gemm: str = "auto") -> dict:
    """``grouped_gemm`` 'auto': SequentialMLP on CPU; 'true': the torch grouped-GEMM experts (their
    per-expert loop on CPU)."""
    model = merge(MOE_MODEL, {"moe": {"token_dispatcher": dispatcher, "aux_loss_coeff": aux_loss_coeff,
                                      "grouped_gemm": grouped_gemm}})
    return {"model": model, "parallel": parallel or {}, "optim": OPTIMIZER,
            "train": {"steps": STEPS, "micro_batch_size": micro_batch_size, "global_batch_size": 8}}


def _recording_aux_loss(shares: list):
    """``step.pop_local_aux_loss`` that also records this rank's share of every layer's aux loss."""
    from hyperp_megatron.model.moe import routers

    def pop(model_chunks, device):
        values = [router.pop_aux_loss() for router in routers(model_chunks)]
        shares.append(torch.tensor([0.0 if v is None else float(v) for v in values], dtype=torch.float64))
        return shares[-1].sum().to(device)

    return pop


def moe_worker(rank: int, world_size: int, runs: dict) -> dict:
    """Train each run (name -> (overrides, mutation or None)) in this process group; per run: losses,
    weights (rank 0), and the aux loss of every step and layer (reduced as the trainer reduces the total)."""
    import contextlib
    from unittest import mock

    import torch.distributed as dist

    from hyperp_megatron import step
    from mutants import mutated

    results = {}
    for name, (overrides, mutation) in runs.items():
        shares = []
        with mock.patch.object(step, "pop_local_aux_loss", _recording_aux_loss(shares)), \
                (mutated(mutation) if mutation else contextlib.nullcontext()):
            result = train_worker(rank, world_size, overrides, weights=True)
        per_layer = torch.stack(shares)  # [steps, layers]: this rank's shares
        dist.all_reduce(per_layer)  # world: TP/CP shares, DP replicas (PP = 1: every rank has every layer)
        train = overrides["train"]
        dp_size = world_size // overrides["parallel"].get("tensor", 1)
        per_layer /= dp_size * train["global_batch_size"] // (train["micro_batch_size"] * dp_size)
        results[name] = {"aux_per_layer": per_layer.tolist(), **{
            key: result[key] for key in ("losses", "weights", "weights_step1", "replica_spread")}}
    return results


def _run_dir(tmp_path, name: str) -> dict:
    return {"logging": {"run_dir": str(tmp_path / name)}}


@pytest.fixture(scope="module")
def moe_single(embedded_corpus, tmp_path_factory):
    """One process: the reference (one micro-batch of 8 per step) and 4 micro-batches of 2 per step."""
    tmp = tmp_path_factory.mktemp("moe1")
    (result,) = run_distributed(moe_worker, 1, {
        "reference": (merge(moe_overrides(8), _run_dir(tmp, "reference")), None),
        "dp1_4_micro": (moe_overrides(2), None),
        "dp1_4_micro_no_aux": (moe_overrides(2, aux_loss_coeff=0.0), None),
    })
    rows = [json.loads(line) for line in (tmp / "reference" / "metrics.jsonl").read_text().splitlines()]
    result["reference"]["aux_logged"] = [row["aux_loss"] for row in rows if "aux_loss" in row]
    return result


@pytest.fixture(scope="module")
def moe_two(embedded_corpus):
    """Two processes: EP=2 (one micro-batch of 4 per rank, as the reference's global micro-batch), its
    control with rank-local load statistics, and DP=2 with 2 micro-batches of 2 per rank."""
    return run_distributed(moe_worker, 2, {
        "ep2": (moe_overrides(4, {"expert": 2}), None),
        "ep2_torch_grouped": (moe_overrides(4, {"expert": 2}, grouped_gemm="true"), None),
        "ep2_local_statistics": (moe_overrides(4, {"expert": 2}), "moe_load_statistics_local"),
        "dp2_2_micro": (moe_overrides(2), None),
        "dp2_2_micro_no_aux": (moe_overrides(2, aux_loss_coeff=0.0), None),
    })[0]


def _aux_rel(run: dict, reference: dict) -> float:
    """Largest relative difference of a per-layer aux loss, over steps and layers."""
    return max(abs(a - b) / abs(b) for steps, ref_steps in zip(run["aux_per_layer"], reference["aux_per_layer"])
               for a, b in zip(steps, ref_steps))


def check_moe_parity(measured, name: str, run: dict, reference: dict) -> dict:
    errors = {**parity(run, reference, "sphere_muon"), "aux_rel": _aux_rel(run, reference)}
    measured("parity/moe_sphere_muon_trainer", name, errors)
    assert errors["replica_spread"] == 0.0, errors
    assert errors["loss_rel"] <= LOSS_RTOL and errors["aux_rel"] <= AUX_RTOL, errors
    assert errors["step1"]["matrix_max_rel"] <= STEP1_MATRIX_RTOL, errors
    assert errors["final"]["matrix_max_rel"] <= FINAL_MATRIX_RTOL, errors
    assert errors["final"]["adam_fro_rel"] <= FINAL_ADAM_FRO_RTOL, errors
    return errors


@pytest.mark.tier("parallel")
def test_moe_reference_learns_and_balances(moe_single):
    reference = moe_single["reference"]
    losses, aux = reference["losses"], [sum(layers) for layers in reference["aux_per_layer"]]
    assert all(math.isfinite(x) for x in losses + aux)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1, losses
    gamma = 0.1
    assert all(0.9 * gamma < a < 2 * gamma for layers in reference["aux_per_layer"] for a in layers), aux
    # The per-layer values recorded here add up to the trainer's logged aux loss.
    for logged, recorded in zip(reference["aux_logged"], aux, strict=True):
        assert math.isclose(logged, recorded, rel_tol=1e-9), (reference["aux_logged"], aux)


@pytest.mark.tier("parallel")
@pytest.mark.parametrize("experts", ["", "_torch_grouped"], ids=["sequential_mlp", "torch_grouped"])
def test_expert_parallel_matches_single_process(moe_single, moe_two, measured, experts):
    """SequentialMLP or the torch grouped-GEMM experts at EP=2 against the single-process SequentialMLP run."""
    check_moe_parity(measured, f"ep2_alltoall{experts}", moe_two[f"ep2{experts}"], moe_single["reference"])


@pytest.mark.tier("parallel")
def test_tensor_and_expert_parallel_match_single_process(moe_single, measured):
    """TP=2 x EP=2 (+SP, expert-TP = TP = 2; all-gather dispatcher) on 4 processes, both expert kinds."""
    layout = {"tensor": 2, "sequence_parallel": True, "expert": 2}
    runs = run_distributed(moe_worker, 4, {
        name: (moe_overrides(4, layout, dispatcher="allgather", grouped_gemm=grouped), None)
        for name, grouped in (("tp2_ep2_sp_allgather", "auto"), ("tp2_ep2_sp_allgather_torch_grouped", "true"))})[0]
    for name, run in runs.items():
        check_moe_parity(measured, name, run, moe_single["reference"])


@pytest.mark.tier("parallel")
def test_control_moe_load_statistics_local_is_caught(moe_single, moe_two, measured):
    """Negative control: with the router's top-k counts not all-reduced, each EP rank balances its own
    tokens; the aux loss (and with it training) no longer matches the single process."""
    mutant, reference = moe_two["ep2_local_statistics"], moe_single["reference"]
    with pytest.raises(AssertionError):
        check_moe_parity(lambda *args: None, "control", mutant, reference)
    aux_rel = _aux_rel(mutant, reference)
    measured("controls", "moe_load_statistics_local/ep2_aux_rel", aux_rel)
    assert aux_rel > 100 * AUX_RTOL, aux_rel


@pytest.mark.tier("parallel")
def test_several_micro_batches_across_data_parallel_layouts(moe_single, moe_two, measured):
    """DP=1 with 4 micro-batches vs DP=2 with 2 each (the same 8 sequences per step).

    Step 1 (same weights): the LM loss and every layer's aux loss agree, because the logged aux loss
    uses f over the whole step. The gradient of micro-batch m can only use f of micro-batches 1..m (a
    running mean, as in Megatron: its backward runs before later ones are routed), which differs between
    the layouts (2, 4, 6, 8 sequences vs 4, 8), so the updates differ (the router's most) and later
    steps drift apart by a measured bound. With gamma = 0 they agree like any other layout: the aux-loss
    gradient is the only difference.
    """
    one, two = moe_single["dp1_4_micro"], moe_two["dp2_2_micro"]
    step1 = {"loss_rel": abs(two["losses"][0] / one["losses"][0] - 1),
             "aux_rel": max(abs(a / b - 1) for a, b in zip(two["aux_per_layer"][0], one["aux_per_layer"][0]))}
    drift = {**parity(two, one, "sphere_muon"), "aux_rel": _aux_rel(two, one)}
    no_aux = parity(moe_two["dp2_2_micro_no_aux"], moe_single["dp1_4_micro_no_aux"], "sphere_muon")
    measured("moe_micro_batches", "dp2x2_vs_dp1x4", {"step1": step1, "all_steps": drift, "gamma0": no_aux})
    assert step1["loss_rel"] <= LOSS_RTOL and step1["aux_rel"] <= AUX_RTOL, step1
    assert drift["loss_rel"] <= MICRO_BATCH_LOSS_RTOL and drift["aux_rel"] <= MICRO_BATCH_AUX_RTOL, drift
    assert no_aux["loss_rel"] <= LOSS_RTOL and no_aux["step1"]["matrix_max_rel"] <= STEP1_MATRIX_RTOL, no_aux
    assert no_aux["final"]["matrix_max_rel"] <= FINAL_MATRIX_RTOL, no_aux
