"""Grouped-GEMM routed experts without Transformer Engine (``model/experts.py``: ``TorchGroupedMLP``).

- the experts module against Megatron's ``SequentialMLP`` on the same weights (fp32): outputs, input and
  weight gradients, with the per-expert loop and with ``torch._grouped_mm`` (which torch also runs on CPU),
  including an expert that gets no token and a single local expert;
- the HyperP MoE layer with ``model.moe.grouped_gemm: true`` equals the SequentialMLP layer (same
  layout-invariant init: the grouped weights are SequentialMLP's experts);
- its checkpoint layout is SequentialMLP's (sharded keys, offsets, replica ids, SwiGLU factories), and
  SequentialExperts requests the same keys (no empty ``_extra_state``; resumes across the two:
  ``tests/test_experts_checkpoint.py``);
- ``model.moe.grouped_gemm`` resolution, the CUDA kernel choice, refusals;
- one sphere per expert under sphere Muon (each ``weight{i}`` keeps its own radius, which its norm keeps).
EP=2 and TP=2 x EP=2 training with these experts: ``tests/test_moe.py``.
"""

import math
import re
import types

import pytest
import torch

from trainer_utils import TINY, merge

pytestmark = pytest.mark.tier("unit")

HIDDEN = 64


def _grouped_mm_on_cpu() -> bool:
    try:
        torch._grouped_mm(torch.ones(2, 8), torch.ones(1, 8, 8), offs=torch.tensor([2], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def _config(num_experts, expert_ffn=32, expert_tp=1, **extra):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=num_experts,
                             moe_ffn_hidden_size=expert_ffn, moe_router_topk=2, gated_linear_unit=True,
                             activation_func=torch.nn.functional.silu, add_bias_linear=False,
                             use_cpu_initialization=True, bias_activation_fusion=False,
                             expert_tensor_parallel_size=expert_tp, **extra)


def _pair(pg_collection, num_experts):
    """(TorchGroupedMLP, SequentialMLP) with the same expert weights."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    from hyperp_megatron.model.experts import TorchGroupedMLP

    config = _config(num_experts)
    grouped = TorchGroupedMLP(num_experts, config, pg_collection=pg_collection)
    spec = get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False).submodules.experts
    sequential = build_module(spec, num_experts, config, pg_collection=pg_collection)
    with torch.no_grad():
        for i, expert in enumerate(sequential.local_experts):
            grouped.linear_fc1.weights()[i].copy_(expert.linear_fc1.weight)
            grouped.linear_fc2.weights()[i].copy_(expert.linear_fc2.weight)
    return grouped, sequential


def _forward_backward(module, x, counts, probs, grad_out):
    x = x.detach().clone().requires_grad_()
    probs = probs.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out, bias = module(x, counts, probs)
    assert bias is None
    out.backward(grad_out)
    return out.detach(), x.grad, probs.grad


@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
@pytest.mark.parametrize("counts", [[5, 0, 17, 3], [25], [0, 0]], ids=["four_experts", "one_expert", "no_tokens"])
def test_experts_match_sequential_mlp(pg_collection, kernel, counts):
    if kernel == "grouped_mm" and not _grouped_mm_on_cpu():
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm on CPU")
    grouped, sequential = _pair(pg_collection, len(counts))
    grouped.kernel = kernel
    gen = torch.Generator().manual_seed(0)
    tokens = sum(counts)
    x, probs = torch.randn(tokens, HIDDEN, generator=gen), torch.rand(tokens, generator=gen)
    grad_out = torch.randn(tokens, HIDDEN, generator=gen)
    counts = torch.tensor(counts)
    got = _forward_backward(grouped, x, counts, probs, grad_out)
    want = _forward_backward(sequential, x, counts, probs, grad_out)
    for name, a, b in zip(("out", "dx", "dprobs"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    for i, expert in enumerate(sequential.local_experts):
        for fc in ("linear_fc1", "linear_fc2"):
            torch.testing.assert_close(getattr(grouped, fc).weights()[i].grad, getattr(expert, fc).weight.grad,
                                       rtol=1e-6, atol=1e-6, msg=f"{fc} of expert {i}")
    if counts.numel() > 1:  # an expert without tokens gets a zero gradient, not None
        assert grouped.linear_fc1.weights()[1].grad.abs().max() == 0


def test_parameters_are_per_expert_with_megatron_attributes(pg_collection):
    from hyperp_megatron.model.params import role_of

    grouped, _ = _pair(pg_collection, 3)
    names = [name for name, _ in grouped.named_parameters()]
    assert names == [f"linear_fc{fc}.weight{i}" for fc in (1, 2) for i in range(3)]
    for name, param in grouped.named_parameters():
        assert role_of(f"decoder.layers.0.mlp.experts.{name}").name == "routed_expert"
        assert param.tensor_model_parallel and param.partition_dim == (0 if "fc1" in name else 1)
        assert param.allreduce  # EP = 1: DDP reduces it with the dense gradients, as Megatron's experts
    assert grouped.linear_fc1.weight0.shape == (2 * 32, HIDDEN) and grouped.linear_fc2.weight0.shape == (HIDDEN, 32)


def test_checkpoint_layout_is_sequential_mlps(pg_collection):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    grouped, sequential = _pair(pg_collection, 3)
    prefix = "decoder.layers.0.mlp.experts."
    ours = grouped.sharded_state_dict(prefix, sharded_offsets=((0, 0, 1),))
    theirs = sequential.sharded_state_dict(prefix, sharded_offsets=((0, 0, 1),))
    theirs = {k: v for k, v in theirs.items() if not k.endswith("_extra_state")}
    assert len(ours) == len(theirs) == 6

    def signature(value):
        if isinstance(value, ShardedTensorFactory):
            built = value.build()  # the SwiGLU split: gate and up halves as separate sharded tensors
            parts = built.values() if isinstance(built, dict) else built
            return ("factory", value.key, value.replica_id, tuple(signature(t) for t in parts))
        assert isinstance(value, ShardedTensor)
        return (value.key, value.global_shape, value.global_offset, value.axis_fragmentations, value.replica_id)

    def local_name(key):  # SequentialMLP's local_experts.{i}.linear_fc{1,2}.weight -> ours
        match = re.search(r"local_experts\.(\d+)\.(linear_fc[12])\.weight$", key)
        return f"{prefix}{match.group(2)}.weight{match.group(1)}"

    for key, value in theirs.items():
        mine = ours[local_name(key)]
        assert signature(mine) == signature(value), key
        assert torch.equal(mine.data, value.data)


def test_sequential_experts_save_what_the_grouped_experts_save(pg_collection):
    """SequentialExperts leaves out SequentialMLP's empty ``_extra_state`` objects, which the grouped experts do
    not have: the two request the same sharded keys (a load in either direction finds all of them), and the
    linears' load fills the left-out state with None."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from hyperp_megatron.model.experts import SequentialExperts

    grouped, plain = _pair(pg_collection, 3)
    spec = get_moe_module_spec(use_te=False, num_experts=3, moe_grouped_gemm=False).submodules.experts
    sequential = SequentialExperts(3, plain.config, spec.submodules, pg_collection)
    offsets = ((0, 0, 1),)

    def ident(value):  # sharded key and offsets of a tensor (of a factory's parts), unique key of an object
        if isinstance(value, ShardedObject):
            return value.unique_key
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            return tuple(ident(part) for part in (built.values() if isinstance(built, dict) else built))
        return value.key, value.global_offset

    keys = [{ident(value) for value in module.sharded_state_dict("e.", offsets).values()}
            for module in (grouped, sequential, plain)]
    assert keys[0] == keys[1] and len(keys[0]) == 6
    assert len(keys[2] - keys[1]) == 6 and all("_extra_state" in key for key in keys[2] - keys[1])
    state = {k: v for k, v in sequential.state_dict().items() if not k.endswith("_extra_state")}
    sequential.load_state_dict(state)  # strict: the left-out _extra_state entries are filled in


def test_moe_layer_with_grouped_experts_matches_sequential(pg_collection):
    from megatron.core.transformer.spec_utils import build_module

    from hyperp_megatron.config import load_config
    from hyperp_megatron.model.experts import TorchGroupedMLP
    from hyperp_megatron.model.gpt import transformer_config
    from hyperp_megatron.model.init import initialize_parameters
    from hyperp_megatron.model.moe import experts_impl
    from hyperp_megatron.model.spec import build_layer_spec

    runs = {}
    for grouped_gemm in ("false", "true"):
        moe = {"sparsity": 3, "granularity": 3, "shared_expert": True, "grouped_gemm": grouped_gemm}
        cfg = load_config(None, {"model": {"num_layers": 1, "hidden_size": HIDDEN, "num_attention_heads": 4,
                                           "num_query_groups": 2, "ffn_hidden_size": 96, "moe": moe}})
        spec = build_layer_spec(cfg.model, pg_collection=pg_collection, experts=experts_impl(cfg.model.moe, "cpu"))
        layer = build_module(spec.submodules.mlp, config=transformer_config(cfg, pg_collection))
        layer.set_layer_number(1)
        initialize_parameters(layer, cfg, pg_collection)
        assert isinstance(layer.experts, TorchGroupedMLP) == (grouped_gemm == "true")
        x = torch.randn(128, 1, HIDDEN, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out, _ = layer(x)
        out.pow(2).sum().backward()
        grads = {}
        for name, param in layer.named_parameters():
            match = re.search(r"experts\.linear_fc([12])\.weight(\d+)$", name)
            if match:  # the grouped name of SequentialMLP's expert
                name = f"experts.local_experts.{match.group(2)}.linear_fc{match.group(1)}.weight"
            grads[name] = (param.detach().clone(), param.grad.clone())
        runs[grouped_gemm] = (out.detach(), x.grad.clone(), grads)
    (out, dx, grads), (ref_out, ref_dx, ref_grads) = runs["true"], runs["false"]
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 8 + 3
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-6, atol=1e-7)
    for name, (weight, grad) in grads.items():
        torch.testing.assert_close(weight, ref_grads[name][0], rtol=0, atol=0, msg=name)  # the same init
        torch.testing.assert_close(grad, ref_grads[name][1], rtol=1e-6, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------------------------
# Selection


def test_grouped_gemm_resolution(monkeypatch):
    from hyperp_megatron.config import MoEConfig
    from hyperp_megatron.model import moe

    def resolve(setting, on_gpu, te):
        monkeypatch.setattr(moe, "te_grouped_gemm_importable", lambda: te)
        return moe.experts_impl(MoEConfig(sparsity=2, granularity=2, grouped_gemm=setting),
                                "cuda:0" if on_gpu else "cpu")

    assert resolve("false", True, True) == "sequential"
    assert resolve("auto", True, True) == resolve("true", True, True) == "te_grouped"
    assert resolve("auto", True, False) == resolve("true", True, False) == "torch_grouped"
    assert resolve("auto", False, False) == "sequential"  # the CPU default stays SequentialMLP
    assert resolve("true", False, False) == "torch_grouped"
    assert MoEConfig(grouped_gemm=True).grouped_gemm == "true"  # YAML booleans
    with pytest.raises(ValueError, match="model.moe.grouped_gemm"):
        MoEConfig(grouped_gemm="te")


def test_cuda_kernel_choice(monkeypatch):
    from hyperp_megatron.model import experts

    monkeypatch.setattr(experts, "_hopper_or_newer", lambda index: index != 1)

    def fake(dtype=torch.bfloat16, width=64, is_cuda=True, index=0):
        return types.SimpleNamespace(is_cuda=is_cuda, dtype=dtype, shape=(10, width),
                                     device=types.SimpleNamespace(index=index))

    weights = [fake(), fake()]
    assert experts.grouped_mm_usable(fake(), weights)
    assert not experts.grouped_mm_usable(fake(is_cuda=False), weights)  # CPU: the loop
    assert not experts.grouped_mm_usable(fake(torch.float32), weights)  # bf16 only
    assert not experts.grouped_mm_usable(fake(), [fake(torch.float32)])
    assert not experts.grouped_mm_usable(fake(width=60), weights)  # rows not 16-byte aligned
    assert not experts.grouped_mm_usable(fake(index=1), weights)  # pre-Hopper


def test_unsupported_configs_are_refused(pg_collection):
    from hyperp_megatron.model.experts import TorchGroupedMLP

    for extra, match in (({"add_bias_linear": True}, "biases"),
                         ({"bias_activation_fusion": True, "activation_func": torch.nn.functional.gelu,
                           "gated_linear_unit": False}, "fused activation")):
        config = _config(2)
        for key, value in extra.items():
            setattr(config, key, value)
        with pytest.raises(ValueError, match=match):
            TorchGroupedMLP(2, config, pg_collection=pg_collection)
    grouped, _ = _pair(pg_collection, 2)
    grouped.kernel = "cutlass"
    with pytest.raises(ValueError, match="kernel"):
        grouped(torch.randn(4, HIDDEN), torch.tensor([2, 2]), torch.rand(4))


# ----------------------------------------------------------------------------------------------
# One sphere per expert under sphere Muon


def test_each_grouped_expert_is_its_own_sphere(pg_collection, embedded_corpus, tmp_path):
    from hyperp_megatron.model.params import unwrap
    from hyperp_megatron.config import load_config
    from hyperp_megatron.optim.sphere_muon import sphere_optimizers
    from hyperp_megatron.train import _train_iterator, setup

    cfg = load_config(None, merge(TINY, {
        "model": {"moe": {"sparsity": 2, "granularity": 2, "grouped_gemm": "true"}},
        "optim": {"name": "sphere_muon", "lr": 0.1, "clip_grad": 0.0}, "train": {"global_batch_size": 4},
        "logging": {"run_dir": str(tmp_path)}}))
    session = setup(cfg, 1, 0)
    iterator = _train_iterator(session, 0)
    model = unwrap(session.model_chunks[0])
    experts = {name: param for name, param in model.named_parameters() if ".experts.linear_fc" in name}
    assert len(experts) == 2 * 2 * 4  # 2 layers x fc1/fc2 x 4 experts, each its own parameter
    initial = {name: param.detach().clone() for name, param in experts.items()}
    for _ in range(3):
        assert not session.runner.train_step(iterator)["skipped"]
    (sphere,) = [s for s in sphere_optimizers(session.optimizer) if any(p is experts[next(iter(experts))]
                                                                          for g in s.param_groups for p in g["params"])]
    for name, param in experts.items():
        radius = sphere.state[param]["radius"]
        assert radius.shape == (1,), name  # one sphere per expert matrix
        assert math.isclose(float(radius), float(initial[name].norm()), rel_tol=1e-6), name
        assert math.isclose(float(param.detach().norm()), float(radius), rel_tol=1e-6), name
        assert float((param.detach() - initial[name]).norm()) > 1e-3 * float(radius), name  # it did move
