"""Checkpoint conversion to / from Hugging Face (hyperp_megatron.convert), in one process:

- every model variant exports to the most standard exact class, reloads with AutoModelForCausalLM (eager and
  sdpa) and gives our fp32 logits within 1e-5 relative; every inexact target is refused naming the exact one;
- negative control: Qwen3-Next forced onto SqrtGate with top-k = 2 is measurably off;
- export -> import gives our weights back (1e-6) and the same run config;
- the exported tokenizer encodes like the trainer's; bad input fails with one line and writes nothing.

Set HYPERP_CONVERT_RESULTS=bench/results/convert_parity.json to record the measured parity numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_utils import REPO, job_env

VOCAB = 8192  # the embedded corpus's tokenizer
SEQ = 32
BASE_MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "head_dim": 32, "seq_length": SEQ}
MOE_SHARED = {"sparsity": 2, "granularity": 2, "shared_expert": True}
VARIANTS = {  # name: (model overrides, the exact target auto must pick)
    "hyperp_dense": ({}, "qwen3"),
    "muon_dense": ({"parameterization": "muon"}, "qwen3"),
    "standard_dense": ({"parameterization": "standard"}, "qwen3"),
    "no_qk_norm": ({"qk_norm": False}, "llama"),
    "gated_attention": ({"gated_attention": True}, "qwen3_next"),
    "moe_plain_gate": ({"moe": {"sparsity": 2, "granularity": 2, "gate": "plain"}}, "qwen3_next"),
    "moe_sqrt_top1_shared_gated": ({"gated_attention": True, "moe": MOE_SHARED}, "qwen3_next"),
    "moe_sqrt_top1_no_shared": ({"moe": {"sparsity": 4, "granularity": 1}}, "qwen3_next"),
    "moe_sqrt_top2": ({"moe": {"sparsity": 2, "granularity": 2}}, "hyperp"),
    "moe_sqrt_top2_no_qk_norm_gated": ({"qk_norm": False, "gated_attention": True, "ffn_hidden_size": 192,
                                        "moe": MOE_SHARED | {"granularity": 3}}, "hyperp"),
}
TARGETS = ("qwen3", "llama", "qwen3_next", "hyperp")
RESULTS: dict = {}


def record(section: str, name: str, values: dict) -> None:
    RESULTS.setdefault(section, {})[name] = values


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    path = os.environ.get("HYPERP_CONVERT_RESULTS")
    if path and RESULTS:
        merge_results(Path(path), RESULTS, "HYPERP_CONVERT_RESULTS=bench/results/convert_parity.json "
                      ".venv/bin/python -m pytest -q tests/test_convert.py tests/test_convert_layouts.py")


def merge_results(path: Path, results: dict, command: str) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    for section, values in results.items():
        data.setdefault(section, {}).update(values)
    data["command"] = command
    data["machine"] = "CPU, fp32 unless noted; max_rel_error = max over tokens of ||l_ours - l_hf|| / ||l_ours||"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def world():
    from hyperp_megatron.convert import ours

    with ours.single_process_world() as pg_collection:
        yield pg_collection


def make_config(model: dict, **sections):
    from hyperp_megatron.config import load_config

    return load_config(None, {"model": {**BASE_MODEL, **model}, "data": {"cache_dir": os.path.join(REPO, "data")},
                              **sections})


def save_checkpoint(pg_collection, cfg, run_dir: Path, seed: int = 0):
    """A checkpoint as the trainer writes it, of a model whose weights are all non-trivial (norm gains
    away from 1, embeddings of unit scale) so that every fold is exercised."""
    from hyperp_megatron import checkpoint as ckpt
    from hyperp_megatron.convert import ours

    model = ours.build(cfg, pg_collection, VOCAB)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            elif "word_embeddings" in name:
                param.normal_(0.0, 0.5, generator=generator)
    extra = {"config": cfg.to_dict(), "derived": {"shape": {"vocab_size": cfg.model.vocab_size or VOCAB}}}
    ckpt.save(run_dir / "checkpoints", ckpt.TrainState(step=7), [model], None, extra)
    return model


def tokens(batch=2, seed=1):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_dir: Path, ids: torch.Tensor, attn: str = "eager") -> torch.Tensor:
    from hyperp_megatron.convert.verify import load_hf

    with torch.no_grad():
        return load_hf(hf_dir, attn, dtype=torch.float32)(input_ids=ids).logits


@pytest.fixture(scope="module")
def exported(world, embedded_corpus, tmp_path_factory):
    """Every variant: our logits, its checkpoint and its auto export."""
    from hyperp_megatron.convert import ours
    from hyperp_megatron.convert.export import export

    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name, (model, _) in VARIANTS.items():
        cfg = make_config(model)
        ours_model = save_checkpoint(world, cfg, root / name)
        summary = export(root / name, root / f"{name}_hf")
        out[name] = {"cfg": cfg, "run": root / name, "hf": root / f"{name}_hf", "summary": summary,
                     "logits": ours.logits(ours_model, tokens(), VOCAB)}
    return out


# ----------------------------------------------------------------------------------------------
# Every variant, exact


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_exports_exactly(exported, name):
    from hyperp_megatron.convert.verify import compare

    case = exported[name]
    assert case["summary"]["target"] == VARIANTS[name][1] and case["summary"]["exact"]
    config = json.loads((case["hf"] / "config.json").read_text())
    assert config["architectures"] == [case["summary"]["architecture"]]
    assert config["bos_token_id"] == config["eos_token_id"] == 0  # <|endoftext|>
    index = json.loads((case["hf"] / "model.safetensors.index.json").read_text())
    assert all((case["hf"] / f).is_file() for f in set(index["weight_map"].values()))
    measured = {}
    for attn in ("eager", "sdpa"):
        parity = compare(case["logits"], hf_logits(case["hf"], tokens(), attn))
        assert parity["max_rel_error"] < 1e-5, (attn, parity)
        assert parity["top1_agreement"] == 1.0
        measured[attn] = parity["max_rel_error"]
    record("variants", name, {"target": case["summary"]["target"], "max_rel_error_eager": measured["eager"],
                              "max_rel_error_sdpa": measured["sdpa"]})


@pytest.mark.parametrize("name", list(VARIANTS))
def test_inexact_targets_refused(exported, name, tmp_path):
    from hyperp_megatron.convert.export import export
    from hyperp_megatron.convert.registry import registry

    cfg, exact = exported[name]["cfg"], VARIANTS[name][1]
    for target in TARGETS:
        reason = registry()[target].inexact_reason(cfg)
        if reason is None:
            continue
        with pytest.raises(ValueError, match=f"cannot reproduce this model exactly: .*--target {exact} is exact"):
            export(exported[name]["run"], tmp_path / target, target=target)
        assert not (tmp_path / target).exists()


def test_negative_control_qwen3_next_on_sqrt_gate_top2(exported, tmp_path):
    """SqrtGate with k = 2 forced onto Qwen3-Next (softmax gates, no sqrt) is measurably off; auto (hyperp) is exact."""
    from hyperp_megatron.convert.export import export
    from hyperp_megatron.convert.verify import compare

    case = exported["moe_sqrt_top2"]
    forced = export(case["run"], tmp_path / "forced", target="qwen3_next", allow_inexact=True)
    assert not forced["exact"]
    config = json.loads((tmp_path / "forced" / "config.json").read_text())
    assert config["hyperp_megatron"]["exact"] is False and "SqrtGate" in config["hyperp_megatron"]["inexact_reason"]
    parity = compare(case["logits"], hf_logits(tmp_path / "forced", tokens()))
    assert parity["max_rel_error"] > 1e-3, parity
    record("negative_control", "moe_sqrt_top2_forced_qwen3_next", {"max_rel_error": parity["max_rel_error"],
                                                                   "kl": parity["kl"]})


def test_hyperp_target_for_a_standard_variant(exported, tmp_path):
    """The custom class also reproduces what Qwen3 can (its multipliers in config.json, weights unfolded)."""
    from hyperp_megatron.convert.export import export
    from hyperp_megatron.convert.verify import compare

    case = exported["muon_dense"]
    export(case["run"], tmp_path / "custom", target="hyperp")
    config = json.loads((tmp_path / "custom" / "config.json").read_text())
    assert config["logit_multiplier"] == 4.0 and config["hyperp_megatron"]["folds"]["lm_head"] == 1.0
    assert (tmp_path / "custom" / "modeling_hyperp.py").is_file()
    assert compare(case["logits"], hf_logits(tmp_path / "custom", tokens()))["max_rel_error"] < 1e-5


def test_verify_and_bf16(exported, tmp_path):
    from hyperp_megatron.convert.export import export
    from hyperp_megatron.convert.verify import verify

    case = exported["hyperp_dense"]
    fp32 = verify(case["run"], case["hf"], batch=2, seq_length=SEQ)
    assert fp32["max_rel_error"] < 1e-5 and fp32["kl"] < 1e-9 and fp32["top1_agreement"] == 1.0
    export(case["run"], tmp_path / "bf16", dtype="bf16")
    from safetensors import safe_open

    shard = next((tmp_path / "bf16").glob("model-*.safetensors"))
    with safe_open(str(shard), framework="pt") as handle:
        assert all(handle.get_tensor(k).dtype == torch.bfloat16 for k in handle.keys())
    bf16 = verify(case["run"], tmp_path / "bf16", batch=2, seq_length=SEQ, attn_implementation="sdpa")
    assert bf16["hf_dtype"] == "bfloat16" and bf16["kl"] < 1e-2, bf16
    record("bf16", "hyperp_dense_untrained", {k: bf16[k] for k in ("max_rel_error", "kl", "top1_agreement")})


# ----------------------------------------------------------------------------------------------
# Round trip


def _params(pg_collection, run):
    from hyperp_megatron.convert import ours

    source = ours.describe(run)
    model = ours.load(source, pg_collection)
    return source, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["muon_dense", "no_qk_norm", "moe_sqrt_top1_shared_gated", "moe_plain_gate",
                                  "moe_sqrt_top2"])
def test_round_trip_gives_our_weights_back(world, exported, name, tmp_path):
    from hyperp_megatron.convert.importer import import_hf

    case = exported[name]
    summary = import_hf(case["hf"], tmp_path / "run")
    assert summary["from_our_export"]
    original_source, original = _params(world, case["run"])
    source, imported = _params(world, tmp_path / "run")
    assert source.cfg.model == dataclasses.replace(original_source.cfg.model, vocab_size=VOCAB)
    assert set(imported) == set(original)
    worst = 0.0
    for key, value in original.items():
        error = float((imported[key] - value).abs().max() / value.abs().max().clamp(min=1e-30))
        assert error <= 1e-6, (key, error)
        worst = max(worst, error)
    record("round_trip", name, {"target": case["summary"]["target"], "max_rel_weight_error": worst})


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_exported_tokenizer_encodes_like_the_trainer(exported, embedded_corpus):
    from transformers import AutoTokenizer

    from hyperp_megatron.data.tokenizer import load_tokenizer

    ours_tok = load_tokenizer(embedded_corpus.tokenizer_dir)
    hf_tok = AutoTokenizer.from_pretrained(str(exported["hyperp_dense"]["hf"]), local_files_only=True)
    texts = ["To be, or not to be: that is the question.", "  leading spaces\tand\ttabs\n\nnew lines",
             "Ünïcödé — “quotes” 日本語 🙂", "<|endoftext|>between<|endoftext|>"]
    for text in texts:
        assert hf_tok(text)["input_ids"] == ours_tok.tokenize(text), text
        assert hf_tok.decode(ours_tok.tokenize(text)) == text
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == ours_tok.eod


# ----------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def test_bad_checkpoints(world, exported, tmp_path):
    import shutil

    from hyperp_megatron.convert.export import export

    with pytest.raises(ValueError, match="checkpoint not found"):
        export(tmp_path / "missing", tmp_path / "out")
    partial = tmp_path / "partial"
    shutil.copytree(exported["hyperp_dense"]["run"], partial)
    step = next((partial / "checkpoints").glob("step_*"))
    (step / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"not usable \(no manifest"):
        export(partial, tmp_path / "out")
    truncated = tmp_path / "truncated"
    shutil.copytree(exported["hyperp_dense"]["run"], truncated)
    data_file = next(p for p in (next((truncated / "checkpoints").glob("step_*"))).glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated file"):
        export(truncated, tmp_path / "out")
    with pytest.raises(ValueError, match="already exists"):
        export(exported["hyperp_dense"]["run"], exported["muon_dense"]["hf"])
    with pytest.raises(ValueError, match="unknown target"):
        export(exported["hyperp_dense"]["run"], tmp_path / "out", target="gpt2")
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_and_missing_tokenizer(world, tmp_path):
    from hyperp_megatron.convert.export import export

    small = make_config({"vocab_size": 4096})
    save_checkpoint(world, small, tmp_path / "small")
    with pytest.raises(ValueError, match="vocab mismatch: tokenizer .* has 8192 tokens but the model only 4096"):
        export(tmp_path / "small", tmp_path / "out")
    nowhere = make_config({}, data={"cache_dir": str(tmp_path / "empty_cache")})
    save_checkpoint(world, nowhere, tmp_path / "no_tok")
    with pytest.raises(ValueError, match="missing tokenizer: .*pass --tokenizer DIR"):
        export(tmp_path / "no_tok", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_bad_hf_directories(exported, tmp_path):
    import shutil

    from hyperp_megatron.convert.importer import import_hf

    def variant(name, edit=None, drop=()):
        directory = tmp_path / name
        shutil.copytree(exported["hyperp_dense"]["hf"], directory)
        config = json.loads((directory / "config.json").read_text())
        if edit:
            edit(config)
        (directory / "config.json").write_text(json.dumps(config))
        for file_name in drop:
            (directory / file_name).unlink()
        return directory

    cases = {
        "unknown_arch": (variant("a", lambda c: c.update(architectures=["GPT2LMHeadModel"])),
                         "unsupported architecture"),
        "vocab": (variant("b", lambda c: c.update(vocab_size=4096)), "vocab mismatch"),
        "no_tokenizer": (variant("c", drop=["tokenizer.json"]), "missing tokenizer"),
        "shape": (variant("d", lambda c: c["hyperp_megatron"]["config"]["model"].update(ffn_hidden_size=128)),
                  r"shape mismatch for model.layers.0.mlp.gate_proj.weight: the checkpoint has \(256, 64\)"),
        "no_weights": (variant("e", drop=[p.name for p in exported["hyperp_dense"]["hf"].glob("*.safetensors")]),
                       "incomplete: missing weight file"),
    }
    for name, (directory, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            import_hf(directory, tmp_path / f"run_{name}")
        assert not (tmp_path / f"run_{name}").exists() and not list(tmp_path.glob(f".run_{name}.tmp-*")), name


def test_failure_midway_leaves_nothing(exported, tmp_path, monkeypatch):
    from hyperp_megatron.convert import hf_io
    from hyperp_megatron.convert.export import export

    def fail(self, tensors):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io.ShardWriter, "add", fail)
    with pytest.raises(OSError):
        export(exported["hyperp_dense"]["run"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_command_line(exported, tmp_path, capsys):
    from hyperp_megatron.convert.__main__ import main

    assert main(["verify", "--checkpoint", str(exported["gated_attention"]["run"]), "--hf",
                 str(exported["gated_attention"]["hf"]), "--json", "--attn", "sdpa"]) == 0
    parity = json.loads(capsys.readouterr().out)
    assert parity["max_rel_error"] < 1e-5 and parity["architecture"] == "Qwen3NextForCausalLM"
    assert main(["export", "--checkpoint", str(exported["gated_attention"]["run"]), "--output", str(tmp_path / "x"),
                 "--target", "qwen3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: target qwen3 cannot reproduce") and "qwen3_next" in err
    # A fresh process: one line on stderr, status 2, before megatron-core is even imported.
    proc = subprocess.run([sys.executable, "-m", "hyperp_megatron.convert", "import", "--hf", str(tmp_path / "nope"),
                           "--output", str(tmp_path / "y")], cwd=REPO, env=job_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "has no config.json" in proc.stderr and not (tmp_path / "y").exists()
