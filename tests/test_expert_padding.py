"""Expert parallelism for routed-expert counts that EP does not divide: phantom experts (docs/moe.md).

The test model is the paper's MoE shape at toy size: s 2, k 4 with a shared expert, so E = 7 routed experts
(top-3), which EP 2 and EP 4 pad to 8 with one phantom expert (on the last EP rank).

- unit: the padding arithmetic and the layout check (``moe_d8.yaml`` at EP 8 validates and plans, the plan
  describes the padding, the memory estimate holds the phantom experts); a padded MoE layer (one process,
  the phantom expert local) is bitwise the unpadded layer: output, gradients, checkpoint keys and shapes,
  with the phantom expert frozen at zero and never routed;
- parallel: EP 2 and EP 4 (all-to-all; SequentialMLP, the torch grouped experts, the layer-wise distributed
  optimizer) and TP 2 x EP 2 (+SP, expert-TP 2, all-gather) reproduce the EP 1 run (no padding) within
  test_moe.py's bounds; a checkpoint saved at EP 2 resumes at EP 1 and EP 4 (the uninterrupted EP 2 run's
  later losses and final weights); the HF export of the padded EP 2 checkpoint is tensor for tensor the
  export of the same weights saved unpadded.
  Control: phantom experts left routable (a logit of 0 in the top-k) diverge.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from _dist import run_distributed
from test_moe import AUX_RTOL, FINAL_ADAM_FRO_RTOL, FINAL_MATRIX_RTOL, LOSS_RTOL, _aux_rel, check_moe_parity, moe_worker
from trainer_utils import REPO, merge, parity

pytestmark = pytest.mark.tier("unit")

SAVE_AT = 2
MODEL = {"ffn_hidden_size": 256,  # s = 2, k = 4, shared: 7 routed experts of width 64, top-3
         "moe": {"sparsity": 2, "granularity": 4, "shared_expert": True, "gate": "sqrt", "aux_loss_coeff": 0.1},
         "attention_backend": "megatron_local"}  # as test_moe.py (near-tie expert choices under TP)


def overrides(micro_batch_size: int, parallel: dict | None = None, dispatcher: str = "alltoall",
              grouped_gemm: str = "auto", **extra) -> dict:
    model = merge(MODEL, {"moe": {"token_dispatcher": dispatcher, "grouped_gemm": grouped_gemm}})
    return merge({"model": model, "parallel": parallel or {}, "optim": {"name": "sphere_muon", "lr": 0.1},
                  "train": {"steps": 4, "micro_batch_size": micro_batch_size, "global_batch_size": 8}}, extra)


def _saving(run_dir: Path) -> dict:
    return {"logging": {"run_dir": str(run_dir)}, "checkpoint": {"interval": SAVE_AT, "keep": 0}}


def _loading(run_dir: Path, checkpoint: Path) -> dict:
    return {"logging": {"run_dir": str(run_dir)}, "checkpoint": {"load": str(checkpoint)}}


def _checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step_{SAVE_AT:06d}"


# ----------------------------------------------------------------------------------------------
# Unit: arithmetic, layout check, plan, memory


def test_padded_expert_counts_and_layout_check():
    from hyperp_megatron.config import MoEConfig, load_config, validate

    paper = MoEConfig(sparsity=8, granularity=8, shared_expert=True)
    assert [paper.padded_experts(ep) for ep in (1, 2, 4, 8, 16)] == [63, 64, 64, 64, 64]
    assert [paper.phantom_experts(ep) for ep in (1, 3, 7, 8)] == [0, 0, 0, 1]
    toy = MoEConfig(sparsity=2, granularity=4, shared_expert=True)
    assert (toy.num_routed_experts, toy.padded_experts(2), toy.padded_experts(4)) == (7, 8, 8)
    for depth in (8, 12, 16, 20, 24):
        cfg = load_config(os.path.join(REPO, "configs", "hyperp", f"moe_d{depth}.yaml"), {"parallel": {"expert": 8}})
        validate(cfg, world_size=32 * cfg.parallel.tensor)  # EP 8 of DP 32
    # A rank holding only phantom experts is refused, with what to change.
    cfg = load_config(None, {"model": MODEL, "parallel": {"expert": 8}, "train": {"micro_batch_size": 1}})
    with pytest.raises(ValueError, match="only phantom experts.*smaller parallel.expert"):
        validate(cfg, world_size=8)


def test_plan_describes_the_padding_and_counts_its_memory(capsys):
    from hyperp_megatron import plan
    from hyperp_megatron.budget import GIB, Layout, ModelShape, memory_per_gpu
    from hyperp_megatron.config import load_config

    config = os.path.join(REPO, "configs", "hyperp", "moe_d8.yaml")
    assert plan.main(["--config", config, "--ep", "8", "--dp", "32"]) == 0
    out = capsys.readouterr().out
    assert "63 routed experts padded to 64 with 1 phantom expert" in out and "docs/moe.md" in out
    assert plan.main(["--config", config, "--ep", "8", "--dp", "32", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["ep"], row["phantoms"]) == (8, 1)
    assert plan.main(["--config", config, "--dp", "32"]) == 0
    assert "padded to" not in capsys.readouterr().out  # EP 1: no padding note
    # Every EP rank holds 64 / 8 experts: weights, gradients and optimizer state of 8 experts per layer.
    cfg = load_config(config)
    shape = ModelShape.from_model_config(cfg.model, 32000)
    expert = 3 * shape.width * shape.expert_ffn
    ep1, ep8 = (memory_per_gpu(shape, Layout(data=32, expert=ep, distributed_optimizer=True)) for ep in (1, 8))
    per_expert_bytes = {"weights": 2, "grads": 4}  # bf16 weights, fp32 main grads
    for field, size in per_expert_bytes.items():
        difference = (getattr(ep1, field) - getattr(ep8, field)) * GIB
        assert difference == pytest.approx(shape.depth * (63 - 64 / 8) * expert * size), field


# ----------------------------------------------------------------------------------------------
# Unit: a padded layer equals the unpadded one


def _layer(pg_collection, expert_parallel: int, grouped_gemm: str):
    """The HyperP MoE layer of MODEL configured for ``expert_parallel``, built in this one-process world (EP 1):
    configured for EP 2 it holds all 8 padded experts, the phantom one (expert 7) included."""
    from megatron.core.transformer.spec_utils import build_module

    from hyperp_megatron.config import load_config
    from hyperp_megatron.model.gpt import transformer_config
    from hyperp_megatron.model.init import initialize_parameters
    from hyperp_megatron.model.moe import experts_impl
    from hyperp_megatron.model.spec import build_layer_spec

    cfg = load_config(None, {"model": merge(MODEL, {"num_layers": 1, "hidden_size": 64, "num_attention_heads": 4,
                                                    "num_query_groups": 2, "moe": {"grouped_gemm": grouped_gemm}}),
                             "parallel": {"expert": expert_parallel}})
    spec = build_layer_spec(cfg.model, pg_collection=pg_collection, experts=experts_impl(cfg.model.moe, "cpu"))
    layer = build_module(spec.submodules.mlp, config=transformer_config(cfg, pg_collection))
    layer.set_layer_number(1)
    initialize_parameters(layer, cfg, pg_collection)
    return layer


@pytest.mark.parametrize("grouped_gemm", ["false", "true"], ids=["sequential_mlp", "torch_grouped"])
def test_padded_layer_is_the_unpadded_layer(pg_collection, grouped_gemm):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from hyperp_megatron.model.experts import is_phantom

    plain, padded = _layer(pg_collection, 1, grouped_gemm), _layer(pg_collection, 2, grouped_gemm)
    assert (plain.config.num_moe_experts, padded.config.num_moe_experts) == (7, 8)
    assert plain.router.weight.shape == padded.router.weight.shape == (7, 64)
    phantom = {name for name, param in padded.named_parameters() if is_phantom(param)}
    assert len(phantom) == 2 and all("7" in name for name in phantom), phantom  # fc1 and fc2 of expert 7
    assert not any(is_phantom(p) for p in plain.parameters())
    params = dict(padded.named_parameters())
    assert all(not params[name].requires_grad and not params[name].any() for name in phantom)
    # Not in the optimizer: a zero matrix's sphere has R = 0 and its retraction would be 0 / 0.
    from hyperp_megatron.optim.param_groups import assign_parameters

    assigned = {a.name for a in assign_parameters([padded], "sphere_muon", pg_collection)}
    assert assigned == set(params) - phantom
    routing = []
    padded.router.register_forward_hook(lambda module, args, output: routing.append(output[1]))
    x = torch.randn(256, 1, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    outputs = []
    for layer in (plain, padded):
        out, _ = layer(x)
        out.pow(2).sum().backward()
        outputs.append(out.detach())
    assert torch.equal(outputs[0], outputs[1])
    assert routing[0].shape == (256, 8) and not routing[0][:, 7].any() and routing[0].sum() == 256 * 3
    reference = dict(plain.named_parameters())
    for name, param in padded.named_parameters():
        if name in phantom:
            assert param.grad is None
        else:
            assert torch.equal(param.grad, reference[name].grad), name
    # The checkpoint holds the real experts only, under the unpadded layout's keys and shapes.
    shapes = [{k: (v.global_shape, v.global_offset) for k, v in layer.sharded_state_dict().items()
               if isinstance(v, ShardedTensor)} for layer in (plain, padded)]
    assert shapes[0] == shapes[1]


# ----------------------------------------------------------------------------------------------
# Parallel: training parity, resharding, export


def _runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "expert_padding"


@pytest.fixture(scope="module")
def two(embedded_corpus, tmp_path_factory):
    """EP 2 (7 experts padded to 8), saving at step 2; the torch grouped experts; the layer-wise distributed
    sphere Muon; the routable-phantom control."""
    root = _runs_dir(tmp_path_factory)
    root.mkdir(exist_ok=True)
    return run_distributed(moe_worker, 2, {
        "ep2": (overrides(4, {"expert": 2}, **_saving(root / "ep2")), None),
        "ep2_torch_grouped": (overrides(4, {"expert": 2}, grouped_gemm="true"), None),
        "ep2_layer_wise": (overrides(4, {"expert": 2, "distributed_optimizer": True}), None),
        "ep2_phantoms_routable": (overrides(4, {"expert": 2}), "phantom_experts_routable"),
    })[0]


@pytest.fixture(scope="module")
def four(two, tmp_path_factory):
    """EP 4 (2 experts per rank, the last one's second a phantom), TP 2 x EP 2 with expert-TP 2 (+SP,
    all-gather, torch grouped experts), and EP 4 resumed from the EP 2 checkpoint."""
    root = _runs_dir(tmp_path_factory)
    layout = {"tensor": 2, "sequence_parallel": True, "expert": 2}
    return run_distributed(moe_worker, 4, {
        "ep4": (overrides(2, {"expert": 4}), None),
        "tp2_ep2_etp2_sp_allgather_torch_grouped": (overrides(4, layout, "allgather", "true"), None),
        "ep4_from_ep2": (overrides(2, {"expert": 4}, **_loading(root / "ep4_from_ep2", _checkpoint(root / "ep2"))),
                         None),
    })[0]


def single_worker(rank: int, world_size: int, root: str) -> dict:
    """The EP 1 reference, EP 1 resumed from the EP 2 checkpoint, and the EP 2 checkpoint saved again at EP 1."""
    root = Path(root)
    results = moe_worker(rank, world_size, {
        "reference": (overrides(8), None),
        "ep1_from_ep2": (overrides(8, **_loading(root / "ep1_from_ep2", _checkpoint(root / "ep2"))), None),
    })
    _save_unpadded(_checkpoint(root / "ep2"), root / "unpadded" / "checkpoints")
    return results


def _save_unpadded(padded_checkpoint: Path, out_root: Path) -> None:
    """Load the EP 2 checkpoint into an EP 1 model (no phantom expert) and save it there."""
    from megatron.core import parallel_state

    from hyperp_megatron import checkpoint as ckpt
    from hyperp_megatron.config import load_config
    from hyperp_megatron.convert import ours
    from hyperp_megatron.model.gpt import build_model
    from hyperp_megatron.parallel import init_model_parallel

    source = ours.describe(padded_checkpoint)
    meta = json.loads((padded_checkpoint / ckpt.STATE).read_text())
    meta["config"]["parallel"]["expert"] = 1
    cfg = load_config(None, meta["config"])
    pg_collection = init_model_parallel(cfg.parallel, cfg.train.seed)
    try:
        chunks = build_model(cfg, pg_collection, source.vocab_size)
        state, _ = ckpt.load(padded_checkpoint, chunks, None, load_optimizer=False)
        extra = {k: v for k, v in meta.items() if k not in ("train_state", "world_size")}
        ckpt.save(out_root, state, chunks, None, extra=extra)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def single(four, tmp_path_factory):
    root = _runs_dir(tmp_path_factory)
    (result,) = run_distributed(single_worker, 1, str(root))
    return result


def _resumed_reference(uninterrupted: dict) -> dict:
    return {"losses": uninterrupted["losses"][SAVE_AT:], "weights": uninterrupted["weights"],
            "aux_per_layer": uninterrupted["aux_per_layer"][SAVE_AT:]}


@pytest.mark.tier("parallel")
@pytest.mark.parametrize("name", ["ep2", "ep2_torch_grouped", "ep2_layer_wise"])
def test_ep2_padded_matches_ep1(two, single, measured, name):
    check_moe_parity(measured, f"padded_{name}", two[name], single["reference"])


@pytest.mark.tier("parallel")
@pytest.mark.parametrize("name", ["ep4", "tp2_ep2_etp2_sp_allgather_torch_grouped"])
def test_ep4_and_expert_tensor_parallel_padded_match_ep1(four, single, measured, name):
    check_moe_parity(measured, f"padded_{name}", four[name], single["reference"])


@pytest.mark.tier("parallel")
@pytest.mark.parametrize("resumed, runs", [("ep1_from_ep2", "single"), ("ep4_from_ep2", "four")])
def test_checkpoint_saved_at_ep2_resumes_at_ep1_and_ep4(two, four, single, measured, resumed, runs):
    run = {"single": single, "four": four}[runs][resumed]
    reference = _resumed_reference(two["ep2"])
    errors = {**parity(run, reference, "sphere_muon"), "aux_rel": _aux_rel(run, reference)}
    measured("parity/moe_sphere_muon_trainer", f"padded_resume_{resumed}", errors)
    assert len(run["losses"]) == 4 - SAVE_AT
    assert errors["loss_rel"] <= LOSS_RTOL and errors["aux_rel"] <= AUX_RTOL, errors
    assert errors["final"]["matrix_max_rel"] <= FINAL_MATRIX_RTOL, errors
    assert errors["final"]["adam_fro_rel"] <= FINAL_ADAM_FRO_RTOL, errors


@pytest.mark.tier("parallel")
def test_control_phantom_experts_routable_is_caught(two, single, measured):
    """Negative control: phantom experts in the top-k (a logit of 0, zero weights) change the routing."""
    mutant, reference = two["ep2_phantoms_routable"], single["reference"]
    with pytest.raises(AssertionError):
        check_moe_parity(lambda *args: None, "control", mutant, reference)
    errors = parity(mutant, reference, "sphere_muon")
    measured("controls", "phantom_experts_routable/ep2", errors)
    assert errors["loss_rel"] > 100 * LOSS_RTOL, errors


@pytest.mark.tier("parallel")
def test_hf_export_of_padded_checkpoint_equals_unpadded_export(single, tmp_path_factory, tmp_path):
    from safetensors.torch import load_file

    from hyperp_megatron.convert.export import BLOCK, export

    root = _runs_dir(tmp_path_factory)
    padded = export(_checkpoint(root / "ep2"), tmp_path / "padded")
    unpadded = export(root / "unpadded" / "checkpoints", tmp_path / "unpadded")
    assert padded["target"] == unpadded["target"] == "hyperp" and padded["step"] == unpadded["step"] == SAVE_AT
    tensors = [{k: v for path in sorted((tmp_path / name).glob("*.safetensors")) for k, v in load_file(path).items()}
               for name in ("padded", "unpadded")]
    assert tensors[0].keys() == tensors[1].keys()
    experts = {k for k in tensors[0] if ".experts." in k}
    assert {k.split(".experts.")[1].split(".")[0] for k in experts} == {str(j) for j in range(7)}, sorted(experts)
    for key, value in tensors[0].items():
        assert torch.equal(value, tensors[1][key]), key
    configs = [json.loads((tmp_path / name / "config.json").read_text()) for name in ("padded", "unpadded")]
    for config in configs:
        config.pop(BLOCK)
    assert configs[0] == configs[1] and configs[0]["num_experts"] == 7
