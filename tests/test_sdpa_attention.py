"""The torch-SDPA core attention (``model/sdpa_attention.py``) against Megatron's ``DotProductAttention``.

- the core attention alone, fp32: outputs and q/k/v gradients equal Megatron's for MHA, GQA and MQA, the
  causal default, an explicit boolean mask, no mask, a single query, HyperP's and the default scale;
- GQA reaches SDPA's fused CPU kernel without repeating K/V; the CUDA kernel choice; refusals;
- whole GPT models (dense and gated attention, GQA and MQA) at TP=1 and TP=2 (2 gloo processes): logits and
  every parameter gradient equal the Megatron-attention model's, and the TP=2 logits the TP=1 ones;
- training: 4 steps with either attention give the same losses (rel 1e-6);
- the layer spec and config switch (``model.attention_backend``).
"""

import math
import types

import pytest
import torch

from _dist import run_distributed
from trainer_utils import TINY, merge, train_worker

SEQ = 32
VOCAB = 256


def _attention_pair(config, pg_collection, mask_type, softmax_scale):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from hyperp_megatron.model.sdpa_attention import SDPACoreAttention

    kwargs = dict(config=config, layer_number=1, attn_mask_type=mask_type, attention_type="self",
                  softmax_scale=softmax_scale, pg_collection=pg_collection)
    return SDPACoreAttention(**kwargs), DotProductAttention(**kwargs)


def _config(heads, groups, head_dim=16, **extra):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=head_dim, attention_dropout=0.0,
                             use_cpu_initialization=True, masked_softmax_fusion=False, **extra)


def _run(module, q, k, v, mask, mask_type, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask, attn_mask_type=mask_type)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", ["causal", "bool_mask", "no_mask", "one_query", "default_scale"])
def test_core_attention_matches_megatron(pg_collection, heads, groups, case):
    from megatron.core.transformer.enums import AttnMaskType

    gen = torch.Generator().manual_seed(0)
    seq_q, batch, head_dim = (1 if case == "one_query" else 24), 3, 16
    seq_k = 24
    config = _config(heads, groups, head_dim)
    scale = None if case == "default_scale" else math.sqrt(128) / head_dim
    mask_type = AttnMaskType.padding if case == "no_mask" else AttnMaskType.causal
    sdpa, local = _attention_pair(config, pg_collection, mask_type, scale)
    q = torch.randn(seq_q, batch, heads, head_dim, generator=gen)
    k, v = (torch.randn(seq_k, batch, groups, head_dim, generator=gen) for _ in range(2))
    mask = None
    if case == "bool_mask":  # True = masked; every query keeps key 0
        mask = torch.rand(batch, 1, seq_q, seq_k, generator=gen) > 0.6
        mask[..., 0] = False
    grad_out = torch.randn(seq_q, batch, heads * head_dim, generator=gen)
    got = _run(sdpa, q, k, v, mask, mask_type, grad_out)
    want = _run(local, q, k, v, mask, mask_type, grad_out)
    assert got[0].shape == (seq_q, batch, heads * head_dim)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):  # O(1) values: fp32 rounding is ~1e-6
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=name)
    assert sdpa.softmax_scale == local.softmax_scale


def test_layer_scaling_keeps_the_net_scale(pg_collection):
    """apply_query_key_layer_scaling: Megatron divides the scale by the layer number and its softmax
    multiplies it back; SDPA applies the net factor at once."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from hyperp_megatron.model.sdpa_attention import SDPACoreAttention

    config = _config(4, 2, apply_query_key_layer_scaling=True)
    kwargs = dict(config=config, layer_number=3, attn_mask_type=AttnMaskType.causal, attention_type="self",
                  softmax_scale=0.3, pg_collection=pg_collection)
    sdpa, local = SDPACoreAttention(**kwargs), DotProductAttention(**kwargs)
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(16, 2, 4, 16, generator=gen), *(torch.randn(16, 2, 2, 16, generator=gen) for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(q, k, v, None), local(q, k, v, None), rtol=1e-5, atol=1e-5)


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_gqa_uses_the_fused_kernel_without_repeating_kv(pg_collection):
    from megatron.core.transformer.enums import AttnMaskType

    sdpa, _ = _attention_pair(_config(8, 2), pg_collection, AttnMaskType.causal, None)
    q = torch.randn(32, 2, 8, 16, requires_grad=True)
    k, v = (torch.randn(32, 2, 2, 16, requires_grad=True) for _ in range(2))
    with _OpNames() as ops:
        sdpa(q, k, v, None).sum().backward()
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in ops.names, sorted(ops.names)
    assert not any(name.startswith(("aten.repeat", "aten.bmm", "aten.baddbmm", "aten._softmax"))
                   for name in ops.names), sorted(ops.names)
    assert k.grad.shape == k.shape


def test_cuda_gqa_kernel_choice():
    """enable_gqa only where CUDA's flash / cuDNN kernels take it: fp16/bf16 without a mask tensor."""
    from hyperp_megatron.model.sdpa_attention import _kernel_takes_gqa

    def fake(is_cuda, dtype):
        return types.SimpleNamespace(is_cuda=is_cuda, dtype=dtype)

    assert _kernel_takes_gqa(fake(True, torch.bfloat16), None)
    assert _kernel_takes_gqa(fake(True, torch.float16), None)
    assert not _kernel_takes_gqa(fake(True, torch.float32), None)  # memory-efficient kernel: no GQA
    assert not _kernel_takes_gqa(fake(True, torch.bfloat16), torch.ones(1, dtype=torch.bool))
    assert _kernel_takes_gqa(fake(False, torch.float32), torch.ones(1, dtype=torch.bool))  # CPU


def test_unsupported_inputs_are_refused(pg_collection):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from hyperp_megatron.model.sdpa_attention import SDPACoreAttention

    sdpa, _ = _attention_pair(_config(4, 2), pg_collection, AttnMaskType.causal, None)
    q, k = torch.randn(8, 1, 4, 16), torch.randn(8, 1, 2, 16)
    with pytest.raises(ValueError, match="packed sequences"):
        sdpa(q, k, k, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(ValueError, match="attention_bias"):
        sdpa(q, k, k, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="boolean"):
        sdpa(q, k, k, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="sq == sk"):
        sdpa(q, torch.randn(9, 1, 2, 16), torch.randn(9, 1, 2, 16), None)
    for extra, match in (({"attention_dropout": 0.1}, "dropout"), ({"window_size": (8, 0)}, "sliding-window")):
        config = _config(4, 2, **{k: v for k, v in extra.items() if k != "attention_dropout"})
        if "attention_dropout" in extra:
            config.attention_dropout = extra["attention_dropout"]
        with pytest.raises(ValueError, match=match):
            SDPACoreAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pg_collection)


# ----------------------------------------------------------------------------------------------
# Spec and config


def test_backend_selection_and_spec(pg_collection):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from hyperp_megatron.config import ModelConfig
    from hyperp_megatron.model.sdpa_attention import SDPACoreAttention, core_attention_impl
    from hyperp_megatron.model.spec import build_layer_spec
    from hyperp_megatron.config import ATTENTION_BACKENDS

    assert [core_attention_impl(b, use_te=False) for b in ATTENTION_BACKENDS] == ["sdpa", "sdpa", "megatron_local"]
    assert [core_attention_impl(b, use_te=True) for b in ATTENTION_BACKENDS] == ["te", "sdpa", "megatron_local"]
    for backend, expected in (("auto", SDPACoreAttention), ("sdpa", SDPACoreAttention),
                              ("megatron_local", DotProductAttention)):
        for gated in (False, True):
            spec = build_layer_spec(ModelConfig(attention_backend=backend, gated_attention=gated))
            assert spec.submodules.self_attention.submodules.core_attention is expected
    with pytest.raises(ValueError, match="model.attention_backend"):
        ModelConfig(attention_backend="flash")


# ----------------------------------------------------------------------------------------------
# Whole models at TP=1 and TP=2 (gloo processes)

MODEL_CASES = {
    "dense_gqa": {},
    "gated_gqa": {"gated_attention": True},
    "dense_mqa": {"num_query_groups": 1},
    "standard_gqa": {"parameterization": "standard"},
}


def _model_parity_worker(rank, world_size, tensor):
    import warnings

    import torch.distributed as dist

    from hyperp_megatron.compat import apply_cpu_patches
    from hyperp_megatron.config import ParallelConfig, load_config
    from hyperp_megatron.model.gpt import build_model
    from hyperp_megatron.parallel import init_model_parallel

    warnings.filterwarnings("ignore")
    apply_cpu_patches()
    pg = init_model_parallel(ParallelConfig(tensor=tensor), seed=1234)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(2, SEQ)
    results = {}
    for case, model in MODEL_CASES.items():
        runs = {}
        for backend in ("sdpa", "megatron_local"):
            cfg = load_config(None, merge(TINY, {"model": {"seq_length": SEQ, "attention_backend": backend, **model}}))
            (gpt,) = build_model(cfg, pg, VOCAB)
            logits = gpt(ids, positions, None)  # [b, s, vocab / TP]
            logits.pow(2).mean().backward()
            gathered = [torch.empty_like(logits) for _ in range(tensor)]
            dist.all_gather(gathered, logits.detach().contiguous(), group=pg.tp)
            runs[backend] = (torch.cat(gathered, dim=-1), {n: p.grad.clone() for n, p in gpt.named_parameters()})
        (logits, grads), (ref_logits, ref_grads) = runs["sdpa"], runs["megatron_local"]
        assert grads.keys() == ref_grads.keys()
        grad_diff = max(float((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-30))
                        for n in grads)
        results[case] = {"logits": logits, "logits_diff": float((logits - ref_logits).abs().max()),
                         "grad_diff": grad_diff, "num_grads": len(grads)}
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def tp1_models():
    return run_distributed(_model_parity_worker, 1, 1)[0]


def test_models_match_megatron_attention_tp1(tp1_models):
    for case, result in tp1_models.items():
        assert result["logits_diff"] < 1e-5 * float(result["logits"].abs().max()), (case, result["logits_diff"])
        assert result["grad_diff"] < 5e-5, (case, result["grad_diff"])  # relative to each gradient's max entry


def test_models_match_megatron_attention_tp2(tp1_models):
    for rank_results in run_distributed(_model_parity_worker, 2, 2):
        for case, result in rank_results.items():
            assert result["logits_diff"] < 1e-5 * float(result["logits"].abs().max()), (case, result["logits_diff"])
            assert result["grad_diff"] < 5e-5, (case, result["grad_diff"])
            torch.testing.assert_close(result["logits"], tp1_models[case]["logits"], rtol=1e-4, atol=1e-5,
                                       msg=f"{case}: TP=2 vs TP=1")


# ----------------------------------------------------------------------------------------------
# Training


def _train_both(rank, world_size, overrides):
    return {backend: train_worker(rank, world_size, merge(overrides, {"model": {"attention_backend": backend}}))
            for backend in ("sdpa", "megatron_local")}


def test_training_losses_match_megatron_attention(embedded_corpus, tmp_path):
    """4 AdamW steps of the tiny gated model (GQA, QK-norm, HyperP scale): the same losses to 1e-6 relative
    (measured: 3e-8)."""
    (runs,) = run_distributed(_train_both, 1, {"model": {"gated_attention": True},
                                               "logging": {"run_dir": str(tmp_path)}})
    sdpa, local = runs["sdpa"]["losses"], runs["megatron_local"]["losses"]
    assert len(sdpa) == len(local) == 4 and sdpa[-1] < sdpa[0]
    for a, b in zip(sdpa, local):
        assert math.isclose(a, b, rel_tol=1e-6), (sdpa, local)
