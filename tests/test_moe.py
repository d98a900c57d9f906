"""MoE with SqrtGate (HYPERP.md section 4) on Megatron-Core.

- the MoE layer equals a direct per-token reference (top-k on the logits, softmax over the k,
  sqrt gates, sqrt(1/2) shared-expert mix; plain gates: plain sum);
- SqrtGate keeps the routed-output RMS across k, plain gates lose ~1/sqrt(k);
- the switch load-balancing loss (gamma at perfect balance, larger under imbalance, the router's value
  equals the formula), MaxVio, and the gradient through the sqrt gate;
- training: EP=2 (all-to-all) and TP=2 x EP=2 (+SP, expert-TP=2; all-gather dispatcher) reproduce the
  single-process run, LM loss and aux loss, step by step, with SequentialMLP and with the torch
  grouped-GEMM experts (``model/experts.py``).
"""

import json
import math
import os

import pytest
import torch

from _dist import run_distributed
from trainer_utils import REPO, merge, train_worker

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
# Training: expert / tensor parallel layouts reproduce the single-process run

STEPS = 4
MOE_MODEL = {"ffn_hidden_size": 192,  # s = 3, k = 3 with a shared expert: 8 routed experts of width 64, top-2
             "moe": {"sparsity": 3, "granularity": 3, "shared_expert": True, "gate": "sqrt", "aux_loss_coeff": 0.1},
             # Top-k routing is discontinuous: layouts differ by ~5e-8 in the loss (TP reductions) and a
             # near-tie expert choice can flip a few steps later. With the SDPA attention, TP=2 x EP=2 flipped
             # one at step 3 (loss off by 3e-5, same step-1/2 deviations as here); with Megatron's attention
             # these 4 steps stay within 3e-7. This test checks token dispatch and experts; the SDPA attention's
             # TP parity is tests/test_sdpa_attention.py's, and MoE + SDPA layouts run in test_monitors.py.
             "attention_backend": "megatron_local"}


OPTIMIZER = {"name": "sphere_muon", "lr": 0.1}
"""Sphere Muon (every expert its own sphere). The sphere step is an angle: 0.1 rad per step moves the weights
enough in 4 steps."""


def run_moe(tmp_path, name, world_size, parallel, micro_batch_size, dispatcher="alltoall", grouped_gemm="auto"):
    run_dir = tmp_path / name
    run_distributed(train_worker, world_size, {
        "model": merge(MOE_MODEL, {"moe": {"token_dispatcher": dispatcher, "grouped_gemm": grouped_gemm}}),
        "parallel": parallel,
        "optim": OPTIMIZER,
        "train": {"steps": STEPS, "micro_batch_size": micro_batch_size, "global_batch_size": 8},
        "logging": {"run_dir": str(run_dir)},
    })
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    return [row["loss"] for row in rows], [row["aux_loss"] for row in rows]


@pytest.fixture(scope="module")
def moe_reference(embedded_corpus, tmp_path_factory):
    # One micro-batch per step in every layout, so f (global over the micro-batch) is the same.
    return run_moe(tmp_path_factory.mktemp("moe"), "ep1", 1, {}, micro_batch_size=8)


def _close(actual, expected, rtol=1e-5):
    assert len(actual) == len(expected) == STEPS
    for a, e in zip(actual, expected):
        assert math.isclose(a, e, rel_tol=rtol), f"{actual} vs {expected}"


def test_moe_reference_learns_and_balances(moe_reference):
    losses, aux = moe_reference
    assert all(math.isfinite(x) for x in losses + aux)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1, losses
    num_layers, gamma = 2, 0.1
    assert all(0.9 * gamma * num_layers < a < 2 * gamma * num_layers for a in aux), aux  # ~gamma per layer


@pytest.mark.parametrize("grouped_gemm", ["auto", "true"], ids=["sequential_mlp", "torch_grouped"])
@pytest.mark.parametrize("world_size, parallel, dispatcher", [
    (2, {"expert": 2}, "alltoall"),
    (4, {"tensor": 2, "sequence_parallel": True, "expert": 2}, "allgather"),  # expert-TP = TP = 2
], ids=["ep2_alltoall", "tp2_ep2_allgather"])
def test_expert_parallel_matches_single_process(moe_reference, tmp_path, world_size, parallel, dispatcher,
                                                grouped_gemm):
    """SequentialMLP ('auto' on CPU) or the torch grouped-GEMM experts ('true'; their per-expert loop on
    CPU) at EP=2 / TP=2 x EP=2 against the single-process SequentialMLP run."""
    losses, aux = run_moe(tmp_path, "run", world_size, parallel, micro_batch_size=4, dispatcher=dispatcher,
                          grouped_gemm=grouped_gemm)
    _close(losses, moe_reference[0])
    _close(aux, moe_reference[1])
