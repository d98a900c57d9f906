"""Activation recomputation (``model.recompute``: Megatron's selective core-attention and full-layer recompute).

- the config: Megatron's ``recompute_*`` fields per mode; one-line refusals of bad chunkings;
- whole GPT models (dense and MoE, SDPA and Megatron's unfused attention) at TP=1 and TP=2 with sequence
  parallel (2 gloo processes): the loss and every parameter gradient under 'selective' and 'full' (uniform
  and block) equal those without recompute, and the recomputation really runs (the core attention / the
  layers are called again in the backward);
- training: 4 steps under each mode give the losses and final weights of the run without recompute, at TP=1
  and TP=2, and the stability monitor's records are unchanged;
- the planner: activation memory per mode (``budget.stage_activation_bytes``, ``memory_per_gpu``, ``derive``).
"""

import pytest
import torch

from _dist import run_distributed
from trainer_utils import TINY, merge, train_worker

pytestmark = pytest.mark.tier("parallel")

SEQ = 32
VOCAB = 256
MODES = {"none": {"recompute": "none"}, "selective": {"recompute": "selective"},
         "full_uniform": {"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
         "full_uniform2": {"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 2},
         "full_block": {"recompute": "full", "recompute_method": "block", "recompute_num_layers": 1}}
MODEL_CASES = {"dense_sdpa": {"attention_backend": "sdpa"},
               "dense_local": {"attention_backend": "megatron_local"},
               "moe": {"attention_backend": "sdpa", "moe": {"sparsity": 2, "granularity": 2}}}


# ----------------------------------------------------------------------------------------------
# Config


@pytest.mark.tier("unit")
def test_recompute_config_kwargs():
    from hyperp_megatron.config import ModelConfig
    from hyperp_megatron.model.gpt import recompute_config_kwargs

    assert recompute_config_kwargs(ModelConfig()) == {}
    assert recompute_config_kwargs(ModelConfig(recompute="selective")) == {
        "recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    assert recompute_config_kwargs(ModelConfig(recompute="full", recompute_method="block", recompute_num_layers=3)) == {
        "recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 3}


@pytest.mark.tier("unit")
def test_recompute_config_refusals():
    from hyperp_megatron.config import ModelConfig, load_config, validate

    with pytest.raises(ValueError, match="model.recompute must be one of none, selective, full"):
        ModelConfig(recompute="layers")
    with pytest.raises(ValueError, match="model.recompute_method must be one of uniform, block"):
        ModelConfig(recompute_method="all")
    with pytest.raises(ValueError, match="model.recompute_num_layers must be >= 1"):
        ModelConfig(recompute_num_layers=0)
    four_layers = {"model": {"num_layers": 4, "recompute": "full", "recompute_num_layers": 3}}
    with pytest.raises(ValueError, match=r"recompute_num_layers \(3\) must divide the 4 layers"):
        validate(load_config(None, merge(TINY, four_layers)), 1)
    with pytest.raises(ValueError, match=r"recompute_num_layers \(3\) exceeds the 2 layers"):
        validate(load_config(None, merge(TINY, merge(four_layers, {
            "model": {"recompute_method": "block"}, "parallel": {"pipeline": 2}}))), 2)
    validate(load_config(None, merge(TINY, merge(four_layers, {"model": {"recompute_method": "block"}}))), 1)
    # the chunking only matters under full recompute
    validate(load_config(None, merge(TINY, {"model": {"recompute_num_layers": 3}})), 1)


@pytest.mark.tier("unit")
def test_chunking_ignored_without_full_recompute():
    from hyperp_megatron.config import load_config
    from hyperp_megatron.derived import derive, ignored_settings

    cfg = load_config(None, merge(TINY, {"model": {"recompute": "selective", "recompute_num_layers": 2}}))
    lines = ignored_settings(cfg, derive(cfg, 1, vocab_size=VOCAB))
    assert any(line.startswith("model.recompute_num_layers = 2 is ignored") for line in lines), lines
    cfg = load_config(None, merge(TINY, {"model": {"recompute": "full", "recompute_num_layers": 2}}))
    assert not any("recompute" in line for line in ignored_settings(cfg, derive(cfg, 1, vocab_size=VOCAB)))


# ----------------------------------------------------------------------------------------------
# Models: loss and gradients


def _count_calls(model) -> dict:
    """Forward calls of every core attention and every transformer layer (hooks; the counts dict fills)."""
    counts = {"core_attention": 0, "layer": 0}

    def bump(name, *_):
        counts[name] += 1

    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(lambda *a: bump("layer"))
        layer.self_attention.core_attention.register_forward_pre_hook(lambda *a: bump("core_attention"))
    return counts


def _model_worker(rank, world_size, tensor):
    import warnings

    from hyperp_megatron.compat import apply_cpu_patches
    from hyperp_megatron.config import ParallelConfig, load_config
    from hyperp_megatron.model.gpt import build_model
    from hyperp_megatron.parallel import init_model_parallel

    warnings.filterwarnings("ignore")
    apply_cpu_patches()
    parallel = {"tensor": tensor, "sequence_parallel": tensor > 1}
    pg = init_model_parallel(ParallelConfig(**parallel), seed=1234)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    positions = torch.arange(SEQ).expand(2, SEQ)
    results = {}
    for case, model in MODEL_CASES.items():
        runs = {}
        for mode, recompute in MODES.items():
            cfg = load_config(None, merge(TINY, {"model": {"seq_length": SEQ, **model, **recompute},
                                                 "parallel": parallel}))
            (gpt,) = build_model(cfg, pg, VOCAB)
            gpt.train()
            counts = _count_calls(gpt)
            loss = gpt(ids, positions, None, labels=labels).float().mean()
            forward_counts = dict(counts)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in gpt.named_parameters()}
            runs[mode] = (float(loss), grads, forward_counts, dict(counts))
        ref_loss, ref_grads = runs["none"][:2]
        results[case] = {}
        for mode, (loss, grads, forward_counts, counts) in runs.items():
            assert grads.keys() == ref_grads.keys()
            grad_diff = max(float((grads[n] - ref_grads[n]).abs().max()) for n in grads)
            results[case][mode] = {"loss": loss, "ref_loss": ref_loss, "grad_diff": grad_diff,
                                   "grad_max": max(float(g.abs().max()) for g in ref_grads.values()),
                                   "forward_counts": forward_counts, "counts": counts}
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return results


def _check_models(results: dict) -> None:
    layers = TINY["model"]["num_layers"]
    for case, modes in results.items():
        for mode, r in modes.items():
            assert r["loss"] == r["ref_loss"], (case, mode, r["loss"], r["ref_loss"])
            assert r["grad_diff"] == 0.0, (case, mode, r["grad_diff"], r["grad_max"])  # bit for bit on the CPU
            # each layer (and its core attention) runs once in the forward; recomputation runs it again
            assert r["forward_counts"] == {"core_attention": layers, "layer": layers}, (case, mode, r)
            again = {"none": (0, 0), "selective": (layers, 0)}.get(mode, (layers, layers))
            if mode == "full_block":  # only the first recompute_num_layers = 1 layer of the stage
                again = (1, 1)
            assert r["counts"] == {"core_attention": layers + again[0], "layer": layers + again[1]}, (case, mode, r)


def test_models_recompute_tp1():
    _check_models(run_distributed(_model_worker, 1, 1)[0])


def test_models_recompute_tp2_sequence_parallel():
    for rank_results in run_distributed(_model_worker, 2, 2):
        _check_models(rank_results)


# ----------------------------------------------------------------------------------------------
# Training


TRAIN_MODES = ("none", "selective", "full_uniform")


def _train_modes(rank, world_size, overrides, root):
    import json
    from pathlib import Path

    runs = {}
    for mode in TRAIN_MODES:
        run_dir = Path(root) / mode
        runs[mode] = train_worker(rank, world_size, merge(overrides, {"model": MODES[mode],
                                                                       "logging": {"run_dir": str(run_dir)}}),
                                  weights=True)
        if rank == 0:
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            runs[mode]["monitor"] = [{k: v for k, v in json.loads(line).items() if k.startswith("monitor/")}
                                     for line in lines]
    return runs


def _check_training(runs: dict) -> None:
    ref = runs["none"]
    for mode in TRAIN_MODES[1:]:
        run = runs[mode]
        assert run["losses"] == ref["losses"], (mode, run["losses"], ref["losses"])
        if "monitor" in ref:  # the hooks see the recomputed forward too: the same means
            records = [r for r in ref["monitor"] if r]
            assert records and len(records) == len([r for r in run["monitor"] if r]), mode
            for got, want in zip(run["monitor"], ref["monitor"]):
                assert got.keys() == want.keys(), mode
                for key, value in want.items():
                    assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (mode, key, got[key], value)
        assert run["weights_digest"] == ref["weights_digest"], mode
        if ref["weights"] is not None:
            for key, value in ref["weights"].items():
                torch.testing.assert_close(run["weights"][key], value, rtol=0, atol=0, msg=f"{mode}: {key}")


MONITORED = {"monitor": {"interval": 2}, "train": {"threads": 1}}


def test_training_recompute_tp1(tmp_path):
    _check_training(run_distributed(_train_modes, 1, MONITORED, str(tmp_path))[0])


def test_training_recompute_tp2(tmp_path):
    overrides = merge(MONITORED, {"parallel": {"tensor": 2, "sequence_parallel": True}})
    for rank_runs in run_distributed(_train_modes, 2, overrides, str(tmp_path)):
        _check_training(rank_runs)


# ----------------------------------------------------------------------------------------------
# The planner


D8 = dict(depth=8, width=1024, num_heads=16, num_kv_heads=4, head_dim=128, ffn=4096, vocab_size=32000,
          seq_length=4096)


@pytest.mark.tier("unit")
def test_activation_memory_per_recompute_mode():
    from hyperp_megatron import budget

    shape, layout, tokens, gib = budget.ModelShape(**D8), budget.Layout(), 4096, 2**30

    def activations(mode="none", method="uniform", num_layers=1, **kwargs):
        return budget.memory_per_gpu(shape, layout, micro_batch_size=1, recompute=budget.Recompute(
            mode, method, num_layers), **kwargs).activations * gib

    logits = tokens * 6 * 32000
    per_layer = budget.activation_bytes_per_token_layer(shape, layout, "bf16")  # no scores
    assert activations() == pytest.approx(tokens * 8 * per_layer + logits)
    # selective: nothing to free under flash / SDPA; the s x s scores of Megatron's unfused attention
    assert activations("selective") == activations()
    assert activations("selective", attention_backend="megatron_local") == activations()
    assert activations(attention_backend="megatron_local") > activations() + 8 * 16 * tokens**2 * 6 - 1
    # full uniform, one layer per chunk: 8 saved layer inputs (fp32 residual stream, C = 1024) + 1 layer rebuilt
    full = activations("full")
    assert full == pytest.approx(tokens * (8 * 4 * 1024 + per_layer) + logits)
    assert activations("full", "uniform", 2) == pytest.approx(tokens * (4 * 4 * 1024 + 2 * per_layer) + logits)
    # block: n layers recomputed, the others whole; all 8 = uniform by single layers
    assert activations("full", "block", 3) == pytest.approx(tokens * (3 * 4 * 1024 + 5 * per_layer + per_layer) + logits)
    assert activations("full", "block", 8) == pytest.approx(full)
    # full recompute of unfused attention rebuilds one layer's scores only
    local_per_layer = budget.activation_bytes_per_token_layer(shape, layout, "bf16", attention_scores=True)
    assert activations("full", attention_backend="megatron_local") == pytest.approx(
        tokens * (8 * 4 * 1024 + local_per_layer) + logits)
    with pytest.raises(ValueError, match="recompute must be one of none, selective, full"):
        budget.Recompute("layers")


@pytest.mark.tier("unit")
def test_activation_memory_sequence_parallel():
    from hyperp_megatron import budget

    shape = budget.ModelShape(**D8)
    tp2 = budget.Layout(tensor=2, sequence_parallel=True)
    p = budget.activation_bytes_per_token_layer(shape, tp2, "bf16")
    # per micro-batch in flight: the chunk inputs (/ TP under sequence parallel); one chunk rebuilt at a time
    assert budget.stage_activation_bytes(shape, tp2, "bf16", "auto", 4, budget.Recompute("full")) == pytest.approx(
        (4 * 4 * 1024 / 2, p))
    assert budget.stage_activation_bytes(shape, tp2, "bf16", "auto", 4) == pytest.approx((4 * p, 0.0))


@pytest.mark.tier("unit")
def test_derive_follows_model_recompute():
    from hyperp_megatron.config import load_config
    from hyperp_megatron.derived import derive

    def memory(**model):
        cfg = load_config(None, merge(TINY, {"model": {"num_layers": 4, "seq_length": 512, **model}}))
        return derive(cfg, 1, vocab_size=VOCAB).memory.activations

    assert memory(recompute="full") < memory(recompute="selective") == memory()
    assert memory(recompute="full", recompute_method="block", recompute_num_layers=2) < memory()
    assert memory(recompute="full", recompute_method="uniform", recompute_num_layers=2) > memory(recompute="full")
