"""``derived.derive``: every derived value once; the config is never changed; ``derived.json`` beside
``config.yaml``; one warning line per ignored setting."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from hyperp_megatron.config import load_config
from hyperp_megatron.derived import derive, ignored_settings, read_derived, write_derived

pytestmark = pytest.mark.tier("unit")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "seq_length": 64}
# T0 = 3 global batches of 8 x 64 tokens at d = d0: the default token budget trains 3 steps, not train.steps.
DEFAULT_TOKENS = {"enabled": True, "default_tokens": True, "base_depth": 2, "base_tokens": 1536,
                  "base_batch_tokens": 512}


def _cfg(**sections):
    return load_config(None, {"model": MODEL, "train": {"steps": 50, "micro_batch_size": 2, "global_batch_size": 8},
                              **sections})


def test_default_tokens_derives_the_steps_without_changing_the_config():
    cfg = _cfg(hyperp=DEFAULT_TOKENS, optim={"name": "sphere_muon"})
    before = cfg.to_dict()
    run = derive(cfg, 1, vocab_size=256)
    assert (run.steps, run.tokens, run.trained_tokens) == (3, 1536.0, 1536)
    assert cfg.to_dict() == before  # nothing is written back (train.steps stays 50)
    assert run.lr_at(0) == run.lr and run.lr_at(2) < run.lr


def test_each_ignored_setting_gets_one_line_and_defaults_none():
    assert ignored_settings(_cfg(), derive(_cfg(), 1, vocab_size=256)) == []
    cfg = _cfg(optim={"name": "adamw", "lr": 0.02, "momentum": 0.9, "ns_mode": "distributed"}, hyperp=DEFAULT_TOKENS)
    lines = ignored_settings(cfg, derive(cfg, 1, vocab_size=256))
    keys = [line.split(" = ")[0] for line in lines]
    assert keys == ["optim.lr", "optim.momentum", "optim.ns_mode", "train.steps"], lines  # token_rule: default
    assert all(" is ignored: " in line and "\n" not in line for line in lines)
    assert "3 steps" in lines[-1]


def test_derived_json_round_trip(tmp_path):
    cfg = _cfg(hyperp=DEFAULT_TOKENS, optim={"name": "muon", "weight_decay": 0.1})
    run = derive(cfg, 1, vocab_size=256)
    write_derived(tmp_path, run, ["x is ignored: y"])
    saved = read_derived(tmp_path)
    assert saved["steps"] == 3 and saved["lr"] == run.lr and saved["decay_peak_lr"] == run.lr
    assert saved["weight_decay"] == run.weight_decay and saved["ignored_settings"] == ["x is ignored: y"]
    assert read_derived(tmp_path / "missing") is None


def test_run_directory_records_what_ran(tmp_path, embedded_corpus):
    """End to end (one process, the entry point): under hyperp.default_tokens the run trains the derived
    steps; config.yaml keeps the user's train.steps, derived.json and the checkpoint say what ran, and
    each ignored setting is one warning line."""
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": MODEL, "data": {"cache_dir": os.path.join(REPO, "data")},
        "train": {"steps": 50, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 0, "eval_iters": 1,
                  "log_interval": 1},
        "optim": {"name": "adamw", "lr": 0.02}, "hyperp": DEFAULT_TOKENS,
        "logging": {"progress": False, "tensorboard": False, "run_dir": str(run_dir)},
        "checkpoint": {"save_final": True, "resume": False}}))
    out = subprocess.run([sys.executable, "-m", "hyperp_megatron.train", "--config", str(config)],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in out.stdout.splitlines() if line.startswith("[hyperp] warning: ")]
    assert [w.split(" = ")[0] for w in warnings] == ["[hyperp] warning: optim.lr", "[hyperp] warning: train.steps"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 50
    derived = json.loads((run_dir / "derived.json").read_text())
    assert derived["steps"] == 3 and len(derived["ignored_settings"]) == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in rows if "loss" in row) == 3
    state = json.loads((run_dir / "checkpoints" / "step_000003" / "train_state.json").read_text())
    assert state["train_state"]["step"] == 3 and state["derived"]["steps"] == 3
    assert state["config"]["train"]["steps"] == 50 and state["derived"]["lr"] == derived["lr"]


def test_output_init_std_and_logit_capacity():
    """derived.json carries the output layer's init std and the logit capacity std * C * multiplier; the
    'standard' parameterization ignores model.output_init_std (one warning line)."""
    run = derive(_cfg(model={**MODEL, "output_init_std": 0.04}), 1)
    assert run.output_init_std == 0.04 and run.logit_capacity == pytest.approx(0.04 * 64)
    assert run.to_dict()["logit_capacity"] == pytest.approx(2.56)
    muon = derive(_cfg(model={**MODEL, "num_layers": 4, "parameterization": "muon"},
                       hyperp={"enabled": True, "base_depth": 2}, optim={"name": "muon"}), 1)
    assert muon.logit_capacity == pytest.approx(0.02 * 64 * 2 / 4)  # the baseline's logit multiplier d0/d
    cfg = _cfg(model={**MODEL, "parameterization": "standard", "output_init_std": 0.04})
    standard = derive(cfg, 1)
    assert standard.output_init_std == cfg.model.init_method_std
    assert any(line.startswith("model.output_init_std = 0.04 is ignored") for line in ignored_settings(cfg, standard))
    with pytest.raises(ValueError, match="model.output_init_std must be > 0"):
        _cfg(model={**MODEL, "output_init_std": 0.0})


def test_plan_shows_the_output_std_and_capacity():
    from hyperp_megatron.plan import plan_rows

    rows = plan_rows(_cfg(model={**MODEL, "output_init_std": 0.04}), [2, 4], tokens="config")
    assert [row["output_std"] for row in rows] == [0.04, 0.04]
    assert rows[1]["logit_capacity"] == pytest.approx(0.04 * 128)  # the family at d 4 has C 128


def test_hf_export_config_carries_the_output_init_std():
    """The HyperP HF config records lm_head's init std, and the HF class draws lm_head with it."""
    import torch

    from hyperp_megatron.convert.hf_modeling.modeling_hyperp import HyperPConfig, HyperPForCausalLM
    from hyperp_megatron.convert.hyperp import HyperPTarget
    from hyperp_megatron.convert.targets import SpecialTokens

    cfg = _cfg(model={**MODEL, "output_init_std": 0.5})
    hf = HyperPTarget().hf_config(cfg, 128, SpecialTokens(None, None), "float32")
    assert hf["output_initializer_range"] == 0.5
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "output_initializer_range")
    torch.manual_seed(0)
    model = HyperPForCausalLM(HyperPConfig(**{k: hf[k] for k in keys}))
    assert float(model.lm_head.weight.detach().std()) == pytest.approx(0.5, rel=0.05)
