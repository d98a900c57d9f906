"""Conversion with the real trainer (gloo processes, tests/_dist.py):

- checkpoints trained at TP=2 (sphere Muon), PP=2, TP=2+SP and EP=2 export (one CPU process) to HF models
  whose logits equal the logits computed in the training layout (1e-5); each layout covers one target;
- an HF Qwen3 / Llama built locally (from_config) imports to our model with the HF loss (1e-5) and the trainer
  continues from it at TP=2 with sphere Muon, whose sphere radii are the imported weights' norms.

Set HYPERP_CONVERT_RESULTS=bench/results/convert_parity.json to record the measured numbers.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from _dist import run_distributed
from test_convert import merge_results
from trainer_utils import REPO, TINY, merge

VOCAB = 8192
STEPS = 2
LAYOUTS = {  # name: (overrides of tests/trainer_utils.TINY, the target auto must pick)
    "tp2_sphere_muon": ({"parallel": {"tensor": 2}, "optim": {"name": "sphere_muon", "lr": 0.02}}, "qwen3"),
    "pp2_no_qk_norm": ({"parallel": {"pipeline": 2}, "model": {"qk_norm": False}}, "llama"),
    "tp2_sp_gated": ({"parallel": {"tensor": 2, "sequence_parallel": True}, "model": {"gated_attention": True}},
                     "qwen3_next"),
    "ep2_moe_sqrt_top2": ({"parallel": {"expert": 2}, "model": {"moe": {"sparsity": 2, "granularity": 2}}}, "hyperp"),
}
RESULTS: dict = {}
COMMAND = ("HYPERP_CONVERT_RESULTS=bench/results/convert_parity.json .venv/bin/python -m pytest -q "
           "tests/test_convert.py tests/test_convert_trainer.py")


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    path = os.environ.get("HYPERP_CONVERT_RESULTS")
    if path and RESULTS:
        merge_results(Path(path), RESULTS, COMMAND)


def eval_tokens(seq_length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_length), generator=torch.Generator().manual_seed(3))


def _collect_logits(tokens, data_iterator, model):
    next(data_iterator)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions, None), None  # no loss function: the schedule keeps the output


@torch.no_grad()
def logits_in_layout(cfg, ckpt_dir: Path, tokens: torch.Tensor):
    """Load ``ckpt_dir`` into a model built in the current (training) layout and run Megatron's pipeline
    schedule forward; the full-vocabulary logits on the last stage, None elsewhere."""
    import functools

    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.process_groups_config import ProcessGroupCollection

    from hyperp_megatron import checkpoint as ckpt
    from hyperp_megatron.model.gpt import build_model

    pg = ProcessGroupCollection.use_mpu_process_groups()
    chunks = build_model(cfg, pg, VOCAB)
    ckpt.load(ckpt_dir, chunks, None, load_optimizer=False)
    for chunk in chunks:
        chunk.eval()
    outputs = get_forward_backward_func()(
        forward_step_func=functools.partial(_collect_logits, tokens), data_iterator=iter([None]), model=chunks,
        num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True)
    if pg.pp.rank() != pg.pp.size() - 1:
        return None
    local = outputs[0].contiguous()  # [b, s, V / TP]: this rank's vocabulary slice
    parts = [torch.empty_like(local) for _ in range(pg.tp.size())]
    dist.all_gather(parts, local, group=pg.tp)  # TP group: the vocab-parallel output layer's slices
    return torch.cat(parts, dim=-1)


def layouts_worker(rank: int, world_size: int, root: str, cases: dict) -> dict:
    """Train each layout for a few steps (saving the final checkpoint), then compute its logits in that layout."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megatron.core import parallel_state

    from hyperp_megatron.compat import apply_cpu_patches
    from hyperp_megatron.config import load_config, validate
    from hyperp_megatron.train import train

    apply_cpu_patches()
    results = {}
    for name, overrides in cases.items():
        run_dir = Path(root) / name
        cfg = load_config(None, merge(TINY, merge(overrides, {
            "train": {"steps": STEPS}, "logging": {"run_dir": str(run_dir)}, "checkpoint": {"save_final": True}})))
        validate(cfg, world_size)
        try:
            losses = train(cfg, world_size, rank)["losses"]
            final = run_dir / "checkpoints" / f"step_{STEPS:06d}"
            logits = logits_in_layout(cfg, final, eval_tokens(cfg.model.seq_length))
        finally:
            parallel_state.destroy_model_parallel()
        results[name] = {"losses": losses, "logits": logits}
    return results


@pytest.fixture(scope="module")
def trained_layouts(embedded_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    per_rank = run_distributed(layouts_worker, 2, str(root), {name: case for name, (case, _) in LAYOUTS.items()})
    out = {}
    for name in LAYOUTS:
        logits = [r[name]["logits"] for r in per_rank if r[name]["logits"] is not None]
        for other in logits[1:]:  # every last-stage rank holds the same full logits
            torch.testing.assert_close(other, logits[0], rtol=0, atol=0)
        out[name] = {"run": root / name, "logits": logits[0], "losses": per_rank[0][name]["losses"]}
    return out


@pytest.fixture(scope="module")
def world():
    from hyperp_megatron.convert import ours

    with ours.single_process_world() as pg_collection:
        yield pg_collection


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_export_matches_training_layout_logits(trained_layouts, world, layout, tmp_path):
    from hyperp_megatron.convert.export import export
    from hyperp_megatron.convert.verify import compare, load_hf

    case = trained_layouts[layout]
    assert all(math.isfinite(x) for x in case["losses"]) and len(case["losses"]) == STEPS
    summary = export(case["run"], tmp_path / "hf")
    assert summary["target"] == LAYOUTS[layout][1] and summary["step"] == STEPS
    with torch.no_grad():
        hf = load_hf(tmp_path / "hf", "eager", dtype=torch.float32)(input_ids=eval_tokens(case["logits"].shape[1]))
    parity = compare(case["logits"], hf.logits)
    assert parity["max_rel_error"] < 1e-5 and parity["top1_agreement"] == 1.0, parity
    RESULTS.setdefault("layouts", {})[layout] = {"target": summary["target"], "max_rel_error": parity["max_rel_error"],
                                                 "kl": parity["kl"], "top1_agreement": parity["top1_agreement"]}


# ----------------------------------------------------------------------------------------------
# Import of HF models built locally, and continued training


def hf_checkpoint(kind: str, directory: Path, tokenizer_dir: Path) -> Path:
    """A small random HF model (from_config, non-trivial norm gains) with the embedded corpus's tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
    if kind == "qwen3":
        config = Qwen3Config(**common, head_dim=32, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    else:
        config = LlamaConfig(**common, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    model.save_pretrained(str(directory))
    for path in tokenizer_dir.iterdir():
        shutil.copy2(path, directory / path.name)
    return directory


def corpus_tokens(corpus, batch: int = 4, seq_length: int = 64) -> torch.Tensor:
    """Real text tokens: the first documents of the embedded corpus."""
    import numpy as np

    data = np.fromfile(str(corpus.data_prefix) + ".bin", dtype=np.uint16, count=batch * seq_length)
    return torch.from_numpy(data.astype(np.int64)).view(batch, seq_length)


@pytest.mark.parametrize("kind,parameterization", [("qwen3", None), ("llama", "hyperp")])
def test_import_step0_loss_equals_hf(world, embedded_corpus, kind, parameterization, tmp_path):
    from transformers import AutoModelForCausalLM

    from hyperp_megatron.convert import ours
    from hyperp_megatron.convert.importer import import_hf

    hf_dir = hf_checkpoint(kind, tmp_path / "hf", embedded_corpus.tokenizer_dir)
    summary = import_hf(hf_dir, tmp_path / "run", parameterization=parameterization)
    assert summary["parameterization"] == (parameterization or "standard") and not summary["from_our_export"]
    source = ours.describe(tmp_path / "run")
    assert source.cfg.model.norm_epsilon == 1e-5 and source.meta["weights_only"]
    tokens = corpus_tokens(embedded_corpus)
    ours_loss = ours.lm_loss(ours.load(source, world), tokens)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hf_loss = float(hf(input_ids=tokens, labels=tokens).loss)
    assert abs(ours_loss - hf_loss) <= 1e-5 * hf_loss, (ours_loss, hf_loss)
    RESULTS.setdefault("import_step0_loss", {})[f"{kind}_{parameterization or 'standard'}"] = {
        "ours": ours_loss, "hf": hf_loss, "rel_error": abs(ours_loss - hf_loss) / hf_loss}


def continue_worker(rank: int, world_size: int, config: dict) -> dict:
    from trainer_utils import train_worker

    return train_worker(rank, world_size, config)


def test_trainer_continues_from_import_with_imported_radii(world, embedded_corpus, tmp_path):
    """The import (saved at TP=1, weights only) resumes at TP=2 with a fresh sphere Muon; every sphere keeps the
    radius it was imported with (R is measured at the first step)."""
    from hyperp_megatron.convert import ours
    from hyperp_megatron.convert.importer import import_hf

    hf_dir = hf_checkpoint("qwen3", tmp_path / "hf", embedded_corpus.tokenizer_dir)
    run = tmp_path / "run"
    import_hf(hf_dir, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["logging"]["run_dir"] == str(run.resolve())
    overrides = merge(config, {"parallel": {"tensor": 2}, "optim": {"name": "sphere_muon", "lr": 0.02},
                               "train": {"steps": 3, "eval_interval": 0},
                               "data": {"cache_dir": os.path.join(REPO, "data")},
                               "checkpoint": {"save_final": True, "resume": True, "keep": 0}})
    overrides["data"].pop("tokenizer")  # the embedded corpus, tokenized with this same tokenizer
    results = run_distributed(continue_worker, 2, overrides)
    losses = results[0]["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    imported = {n: p.detach().clone() for n, p in ours.load(ours.describe(run / "checkpoints" / "step_000000"),
                                                             world).named_parameters()}
    trained = {n: p.detach().clone() for n, p in ours.load(ours.describe(run / "checkpoints" / "step_000003"),
                                                            world).named_parameters()}
    cfg = ours.describe(run).cfg.model
    worst = 0.0
    for name, before in imported.items():
        if before.ndim != 2 or "word_embeddings" in name:
            continue  # norm gains and the embedding are AdamW parameters, not on a sphere
        pieces = [(before, trained[name])]
        if name.endswith("linear_qkv.weight"):  # Q, K and V are separate spheres
            pieces = list(zip(ours.split_qkv(before, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels),
                              ours.split_qkv(trained[name], cfg.num_attention_heads, cfg.num_query_groups,
                                             cfg.kv_channels)))
        for b, t in pieces:
            assert float((t - b).norm() / b.norm()) > 1e-3, f"{name} did not train"
            worst = max(worst, abs(float(t.norm() / b.norm()) - 1.0))
    assert worst < 1e-5, worst
    RESULTS["import_continue_training"] = {"qwen3_tp2_sphere_muon": {"losses": losses, "max_rel_radius_change": worst}}
