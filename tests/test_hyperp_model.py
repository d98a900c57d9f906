"""The HyperP parameterization in the real Megatron model (docs/method.md section 2): residual-branch
multiplier, QK-norm, softmax scale and per-head gate are in the module tree and act numerically;
initial sphere radii; the Muon baseline's logit multiplier; the gated model at TP=2 (+SP) = TP=1."""

import dataclasses
import functools
import math

import pytest
import torch

from _dist import run_distributed
from trainer_utils import TINY, merge, parity, train_worker

pytestmark = pytest.mark.tier("unit")

VOCAB = 256
SEQ = 32


def build(pg_collection, **model):
    from hyperp_megatron.config import load_config
    from hyperp_megatron.model.gpt import build_model

    cfg = load_config(None, merge(TINY, {"model": {"seq_length": SEQ, **model}}))
    (gpt,) = build_model(cfg, pg_collection, VOCAB)
    return gpt, cfg


def tokens(batch=2):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=generator)
    return ids, torch.arange(SEQ).expand(batch, SEQ)


def _record(store, what, pick, module, args, output=None):
    """A forward (pre-)hook body: ``store[what] = pick(args, output)``."""
    store[what] = pick(args, output).detach().clone()


def forward_with_hooks(gpt, names):
    """Logits and, per layer, the tensors the hooks saw: ``{layer: {what: tensor}}``."""
    seen = {i: {} for i in range(len(gpt.decoder.layers))}
    handles = []
    for i, layer in enumerate(gpt.decoder.layers):
        attn = layer.self_attention
        hooks = {
            "input": (layer.input_layernorm, "pre", lambda a, o: a[0]),
            "mid": (layer.pre_mlp_layernorm, "pre", lambda a, o: a[0]),
            "out": (layer, "post", lambda a, o: o[0]),
            "attn_raw": (attn, "post", lambda a, o: o[0]),
            "mlp_raw": (layer.mlp, "post", lambda a, o: o[0]),
            "q_raw": (attn.q_layernorm, "pre", lambda a, o: a[0]),
            "q_normed": (attn.q_layernorm, "post", lambda a, o: o),
            "query": (attn.core_attention, "pre", lambda a, o: a[0]),  # [s, b, heads, hd]
            "key": (attn.core_attention, "pre", lambda a, o: a[1]),  # [s, b, groups, hd]
            "value": (attn.core_attention, "pre", lambda a, o: a[2]),
            "core_out": (attn.core_attention, "post", lambda a, o: o),
            "proj_in": (attn.linear_proj, "pre", lambda a, o: a[0]),
        }
        if hasattr(attn, "linear_gate"):
            hooks["gate_logits"] = (attn.linear_gate, "post", lambda a, o: o[0])
        for what, (module, kind, pick) in hooks.items():
            if what not in names:
                continue
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(register(functools.partial(_record, seen[i], what, pick)))
    try:
        with torch.no_grad():
            logits = gpt(*tokens(), None)
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ----------------------------------------------------------------------------------------------
# Module tree


def test_module_tree_hyperp_gated(pg_collection):
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from hyperp_megatron.model.attention import GatedSelfAttention

    gpt, cfg = build(pg_collection, gated_attention=True, head_dim=32)
    m = cfg.model
    assert len(gpt.decoder.layers) == m.num_layers
    for layer in gpt.decoder.layers:
        attn = layer.self_attention
        assert isinstance(attn, GatedSelfAttention)
        assert isinstance(attn.linear_gate, ColumnParallelLinear)
        assert tuple(attn.linear_gate.weight.shape) == (m.num_attention_heads, m.hidden_size)
        assert attn.linear_gate.bias is None
        for norm in (attn.q_layernorm, attn.k_layernorm):
            assert type(norm).__name__ == "RMSNorm" and tuple(norm.weight.shape) == (32,)
        assert attn.core_attention.softmax_scale == pytest.approx(math.sqrt(128) / 32)
    names = [n for n, _ in gpt.named_parameters()]
    assert "decoder.layers.0.self_attention.linear_gate.weight" in names
    assert not gpt.output_layer._forward_hooks  # no logit multiplier under HyperP


def test_module_tree_standard(pg_collection):
    from megatron.core.transformer.attention import SelfAttention

    from hyperp_megatron.model.attention import GatedSelfAttention

    gpt, cfg = build(pg_collection, parameterization="standard")
    attn = gpt.decoder.layers[0].self_attention
    assert isinstance(attn, SelfAttention) and not isinstance(attn, GatedSelfAttention)
    assert attn.core_attention.softmax_scale == pytest.approx(1 / math.sqrt(cfg.model.kv_channels))


# ----------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize("parameterization,num_layers", [("hyperp", 2), ("hyperp", 3), ("standard", 2)])
def test_residual_branch_multiplier(pg_collection, parameterization, num_layers):
    gpt, _ = build(pg_collection, parameterization=parameterization, num_layers=num_layers)
    _, seen = forward_with_hooks(gpt, {"input", "mid", "out", "attn_raw", "mlp_raw"})
    multiplier = 1 / math.sqrt(2 * num_layers) if parameterization == "hyperp" else 1.0
    for layer in seen.values():
        attn_branch = layer["mid"] - layer["input"]
        mlp_branch = layer["out"] - layer["mid"]
        assert layer["attn_raw"].abs().mean() > 1e-3
        assert _rel(attn_branch, multiplier * layer["attn_raw"]) < 1e-5
        assert _rel(mlp_branch, multiplier * layer["mlp_raw"]) < 1e-5


def test_qk_norm_before_rope(pg_collection):
    gpt, cfg = build(pg_collection)
    attn = gpt.decoder.layers[1].self_attention
    with torch.no_grad():
        attn.q_layernorm.weight.fill_(3.0)
    _, seen = forward_with_hooks(gpt, {"q_raw", "q_normed", "query"})
    eps = gpt.config.layernorm_epsilon
    for i, gain in ((0, 1.0), (1, 3.0)):
        q_normed = seen[i]["q_normed"]  # [s, b, heads, head_dim]
        rms = q_normed.pow(2).mean(dim=-1).sqrt()
        raw_ms = seen[i]["q_raw"].pow(2).mean(dim=-1)
        torch.testing.assert_close(rms, gain * (raw_ms / (raw_ms + eps)).sqrt(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rms, torch.full_like(rms, gain), atol=0, rtol=2e-3)  # eps effect only
        query = seen[i]["query"]
        # RoPE after the norm: the identity at position 0 and a rotation (same per-head RMS) elsewhere.
        torch.testing.assert_close(query[0], q_normed[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(query.pow(2).mean(dim=-1).sqrt(), rms, atol=1e-4, rtol=1e-4)
        assert _rel(query[1:], q_normed[1:]) > 1e-2


def _causal_attention(q, k, v, scale):
    """Reference GQA attention: q [s, b, heads, hd], k and v [s, b, groups, hd] -> [s, b, heads * hd]."""
    k, v = (t.repeat_interleave(q.shape[2] // t.shape[2], dim=2) for t in (k, v))
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhst,tbhd->sbhd", probs, v)
    return out.reshape(out.shape[0], out.shape[1], -1)


def test_softmax_scale(pg_collection):
    head_dim = 32
    gpt, _ = build(pg_collection, head_dim=head_dim)
    _, seen = forward_with_hooks(gpt, {"query", "key", "value", "core_out"})
    q, k, v = (seen[0][what] for what in ("query", "key", "value"))
    expected = _causal_attention(q, k, v, math.sqrt(128) / head_dim)
    assert _rel(seen[0]["core_out"], expected) < 1e-5
    assert _rel(seen[0]["core_out"], _causal_attention(q, k, v, 1 / math.sqrt(head_dim))) > 1e-3


def test_gate_per_head(pg_collection):
    gpt, cfg = build(pg_collection, gated_attention=True)
    _, seen = forward_with_hooks(gpt, {"core_out", "proj_in", "gate_logits"})
    heads, head_dim = cfg.model.num_attention_heads, cfg.model.kv_channels
    for layer in seen.values():
        gate = torch.sigmoid(layer["gate_logits"])  # [s, b, heads]: one scalar per head and token
        assert gate.shape == (SEQ, 2, heads)
        assert 0 < gate.min() and gate.max() < 1 and gate.std() > 1e-3
        context = layer["core_out"].view(SEQ, 2, heads, head_dim)
        expected = (context * gate.unsqueeze(-1)).view(SEQ, 2, -1)
        assert _rel(layer["proj_in"], expected) < 1e-6
        assert _rel(layer["proj_in"], layer["core_out"]) > 1e-2


def test_gate_closed_silences_attention(pg_collection):
    gpt, cfg = build(pg_collection, gated_attention=True)
    attn = gpt.decoder.layers[0].self_attention
    x = torch.rand(SEQ, 2, cfg.model.hidden_size, generator=torch.Generator().manual_seed(1)) + 0.5
    with torch.no_grad():
        open_out, _ = attn(x, attention_mask=None)
        attn.linear_gate.weight.fill_(-1.0)  # x > 0: every gate logit <= -0.5 * C
        closed_out, _ = attn(x, attention_mask=None)
    assert open_out.abs().max() > 1e-2
    assert closed_out.abs().max() < 1e-9 * open_out.abs().max()


# ----------------------------------------------------------------------------------------------
# Initialization


def _split_qkv(weight, num_heads, num_groups, head_dim):
    """Megatron's fused QKV rows ``[q_1..q_{H/G}, k, v]`` per query group -> full Q, K, V."""
    per_group = weight.view(num_groups, (num_heads // num_groups + 2) * head_dim, -1)
    q, k, v = per_group.split([num_heads // num_groups * head_dim, head_dim, head_dim], dim=1)
    return [t.reshape(-1, weight.shape[1]) for t in (q, k, v)]


def test_initial_sphere_radii(pg_collection):
    # Wide enough that the sampling spread of ||W|| (relative std sqrt(0.2 / numel)) stays < 0.3%.
    gpt, cfg = build(pg_collection, num_layers=1, hidden_size=1024, num_attention_heads=32, num_query_groups=4,
                     head_dim=32, gated_attention=True)
    m = cfg.model
    attn, mlp = gpt.decoder.layers[0].self_attention, gpt.decoder.layers[0].mlp
    q, k, v = _split_qkv(attn.linear_qkv.weight, m.num_attention_heads, m.num_query_groups, m.kv_channels)
    matrices = {"q": q, "k": k, "v": v, "proj": attn.linear_proj.weight, "gate": attn.linear_gate.weight,
                "fc1": mlp.linear_fc1.weight, "fc2": mlp.linear_fc2.weight}
    assert q.shape == (m.num_attention_heads * m.kv_channels, m.hidden_size)
    assert k.shape == v.shape == (m.num_query_groups * m.kv_channels, m.hidden_size)
    for name, weight in matrices.items():
        fan_out, fan_in = weight.shape
        assert weight.detach().abs().max() <= 1 / math.sqrt(fan_in), name
        radius = float(weight.detach().norm())
        assert abs(radius / math.sqrt(fan_out / 3) - 1) < 0.01, (name, radius, math.sqrt(fan_out / 3))
    assert float(gpt.output_layer.weight.detach().std()) == pytest.approx(0.02, rel=0.01)
    assert float(gpt.embedding.word_embeddings.weight.detach().std()) == pytest.approx(1e-4, rel=0.01)


@pytest.mark.parametrize("parameterization", ["hyperp", "muon"])
def test_output_init_std_sets_the_output_radius(pg_collection, parameterization):
    """model.output_init_std draws the output layer (hence its sphere radius), and nothing else."""
    default, _ = build(pg_collection, num_layers=1, hidden_size=256, parameterization=parameterization)
    wider, _ = build(pg_collection, num_layers=1, hidden_size=256, parameterization=parameterization,
                     output_init_std=0.08)
    assert float(wider.output_layer.weight.detach().std()) == pytest.approx(0.08, rel=0.02)
    ratio = float(wider.output_layer.weight.detach().norm() / default.output_layer.weight.detach().norm())
    assert ratio == pytest.approx(4.0, rel=1e-5)  # the same draw, scaled
    torch.testing.assert_close(wider.embedding.word_embeddings.weight, default.embedding.word_embeddings.weight)
    torch.testing.assert_close(wider.decoder.layers[0].mlp.linear_fc1.weight, default.decoder.layers[0].mlp.linear_fc1.weight)


# ----------------------------------------------------------------------------------------------
# Muon baseline


def test_muon_logit_multiplier(pg_collection):
    from hyperp_megatron.derived import derive
    from hyperp_megatron.transfer import muon_logit_multiplier

    hyperp, _ = build(pg_collection, num_layers=2)
    muon, cfg = build(pg_collection, num_layers=2, parameterization="muon")
    multiplier = derive(cfg, 1, vocab_size=VOCAB).output_logit_multiplier  # what the trainer passes
    assert multiplier == muon_logit_multiplier(2, cfg.hyperp.base_depth) == pytest.approx(8 / 2)
    for name, param in hyperp.state_dict().items():  # same architecture and initial weights
        if isinstance(param, torch.Tensor):
            torch.testing.assert_close(muon.state_dict()[name], param, rtol=0, atol=0)
    hyperp_logits, _ = forward_with_hooks(hyperp, set())
    muon_logits, _ = forward_with_hooks(muon, set())
    torch.testing.assert_close(muon_logits, multiplier * hyperp_logits, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Tensor parallel

GATED = {"model": {"gated_attention": True}, "train": {"steps": 3}}
GATED_LAYOUTS = {"tp2": {"tensor": 2}, "tp2_sp": {"tensor": 2, "sequence_parallel": True}}


def _gated_runs(rank: int, world_size: int, layouts: dict) -> dict:
    runs = {}
    for name, layout in layouts.items():
        result = train_worker(rank, world_size, merge(GATED, {"parallel": layout}), weights=True)
        runs[name] = {key: result[key] for key in ("losses", "weights", "weights_step1", "replica_spread")}
    return runs


@pytest.mark.tier("parallel")
def test_gated_attention_tensor_parallel_matches_single_process(embedded_corpus, measured):
    """Losses and every weight (AdamW; bounds of tests/test_trunk_parallel.py, measured there)."""
    from test_trunk_parallel import FINAL_ADAM_FRO_RTOL, LOSS_RTOL, STEP1_ADAM_FRO_RTOL

    (reference,) = run_distributed(_gated_runs, 1, {"tp1": {}})
    reference = reference["tp1"]
    assert reference["losses"][-1] < reference["losses"][0]
    runs = run_distributed(_gated_runs, 2, GATED_LAYOUTS)[0]
    for name, run in runs.items():
        errors = parity(run, reference, "adamw")
        measured("parity/adamw_trainer", f"gated_attention_{name}", errors)
        assert errors["replica_spread"] == 0.0 and errors["loss_rel"] <= LOSS_RTOL, (name, errors)
        assert errors["step1"]["adam_fro_rel"] <= STEP1_ADAM_FRO_RTOL, (name, errors)
        assert errors["final"]["adam_fro_rel"] <= FINAL_ADAM_FRO_RTOL, (name, errors)


# ----------------------------------------------------------------------------------------------
# Transformer Engine layout (input norm fused into linear_qkv), emulated with local layers


def _fused_norm_linear():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class NormColumnParallelLinear(ColumnParallelLinear):
        """Stand-in for TE's ``TELayerNormColumnParallelLinear``: RMSNorm with its own gain, then the linear."""

        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))

        def forward(self, x, *args, **kwargs):
            normed = torch.nn.functional.rms_norm(x, (x.shape[-1],), self.layer_norm_weight,
                                                  self.config.layernorm_epsilon)
            return super().forward(normed, *args, **kwargs)

    return NormColumnParallelLinear


def test_gate_with_input_norm_fused_into_qkv(pg_collection):
    """With TE the attention gets the un-normalized x; the gate must normalize it with linear_qkv's gain."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.identity_op import IdentityOp

    from hyperp_megatron.model.gpt import transformer_config
    from hyperp_megatron.model.attention import gated_attention_spec
    from hyperp_megatron.model.spec import build_layer_spec

    local, cfg = build(pg_collection, gated_attention=True)
    spec = build_layer_spec(dataclasses.replace(cfg.model, gated_attention=False))
    spec.submodules.input_layernorm = IdentityOp
    spec.submodules.self_attention.submodules.linear_qkv = _fused_norm_linear()
    spec.submodules.self_attention = gated_attention_spec(spec.submodules.self_attention,
                                                          type(local.decoder.layers[0].self_attention.linear_gate),
                                                          normalize_gate_input=True)
    fused = GPTModel(config=transformer_config(cfg, pg_collection), transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=SEQ, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope", pg_collection=pg_collection)
    with torch.no_grad():
        for layer in local.decoder.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    state = {name.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"): value
             for name, value in local.state_dict().items()}
    fused.load_state_dict(state, strict=True)
    local_logits, _ = forward_with_hooks(local, set())
    fused_logits, _ = forward_with_hooks(fused, set())
    torch.testing.assert_close(fused_logits, local_logits, rtol=1e-5, atol=1e-6)
