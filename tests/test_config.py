"""Config loading and validation: each bad input gives a clear error before any heavy work."""

import os
import re
import subprocess
import sys

import pytest

from hyperp_megatron.config import load_config, parse_overrides, validate

pytestmark = pytest.mark.tier("unit")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 6\ntrain:\n  steps: 10\n")
    cfg = load_config(path, ["--train.steps", "100", "--optim.lr=0.01", "--parallel.sequence_parallel", "true",
                             "--parallel.tensor", "2"])
    assert cfg.model.num_layers == 6 and cfg.train.steps == 100 and cfg.optim.lr == 0.01
    assert cfg.parallel.sequence_parallel is True


def test_list_override():
    assert parse_overrides(["--data.prefixes", "[a, b]"]) == {"data": {"prefixes": ["a", "b"]}}
    cfg = load_config(None, ["--data.prefixes", "a,b", "--data.tokenizer", "t", "--data.weights", "[1, 2]"])
    assert cfg.data.prefixes == ["a", "b"] and cfg.data.weights == [1.0, 2.0]


@pytest.mark.parametrize("overrides, world, message", [
    (["--train.stepz", "3"], 1, "did you mean 'train.steps'"),
    (["--modle.num_layers", "3"], 1, "did you mean 'model'"),
    (["--model.num_attention_heads", "3", "--model.num_query_groups", "1", "--model.head_dim", "32",
      "--parallel.tensor", "2"], 2,
     "num_attention_heads (3) is not divisible by parallel.tensor (2)"),
    (["--parallel.tensor", "2", "--parallel.pipeline", "2"], 6, "not divisible by parallel.tensor * parallel.pipeline"),
    (["--model.num_layers", "3", "--parallel.pipeline", "2"], 2, "num_layers (3) is not divisible by parallel.pipeline"),
    (["--data.prefixes", "[/nonexistent/corpus]", "--data.tokenizer", REPO], 1, "data file not found"),
    (["--data.prefixes", "[x]"], 1, "data.tokenizer is missing"),
    (["--data.tokenizer", "/nonexistent/tok"], 1, "tokenizer directory not found"),
    (["--train.global_batch_size", "10", "--train.micro_batch_size", "4"], 1, "must be a multiple"),
    (["--parallel.sequence_parallel", "true"], 1, "needs parallel.tensor > 1"),
    (["--optim.name", "sgd"], 1, "optim.name must be one of"),
    (["--train.steps", "ten"], 1, "train.steps expects int"),
    (["--parallel.expert", "2"], 2, "parallel.expert > 1 needs an MoE model"),
    (["--checkpoint.load", "/nonexistent/ckpt"], 1, "checkpoint not found"),
    # Values Megatron would take unchecked (a crash or a silent default after the model is built).
    (["--model.num_query_groups", "8"], 1, "num_query_groups (8) must be <= model.num_attention_heads (4)"),
    (["--model.head_dim", "15"], 1, "head dimension (15) must be even: RoPE"),
    (["--model.hidden_size", "36", "--model.num_attention_heads", "4", "--model.num_query_groups", "1"], 1,
     "head dimension (9) must be even"),
    (["--model.head_dim", "0"], 1, "model.head_dim must be positive (or unset"),
    (["--model.ffn_hidden_size", "-8"], 1, "model.ffn_hidden_size must be positive"),
    (["--model.vocab_size", "0"], 1, "model.vocab_size must be positive"),
    (["--model.rotary_base", "0"], 1, "model.rotary_base must be positive"),
    (["--model.init_method_std", "-1"], 1, "model.init_method_std must be > 0"),
    (["--parallel.expert_tensor", "0"], 1, "parallel.expert_tensor must be >= 1"),
    (["--parallel.timeout_minutes", "0"], 1, "parallel.timeout_minutes must be >= 1"),
    (["--data.split", "100,0,0"], 1, "leaves no train or no validation data"),
    (["--data.split", "0,1,0"], 1, "leaves no train or no validation data"),
    (["--data.prefixes", "[a, b]", "--data.tokenizer", "t", "--data.weights", "[1, 0]"], 1,
     "data.weights must all be > 0"),
    (["--data.embedded_vocab_size", "100"], 1, "data.embedded_vocab_size must be >= 257"),
    (["--optim.adam_beta1", "1.5"], 1, "optim.adam_beta1 must be in [0, 1)"),
    (["--optim.adam_beta2", "1"], 1, "optim.adam_beta2 must be in [0, 1)"),
    (["--optim.momentum", "-0.1"], 1, "optim.momentum must be in [0, 1)"),
    (["--optim.adam_eps", "0"], 1, "optim.adam_eps must be > 0"),
    (["--train.eval_interval", "-1"], 1, "train.eval_interval must be >= 0"),
    (["--train.threads", "-1"], 1, "train.threads must be >= 0"),
    (["--model.moe.sparsity", "2", "--model.moe.granularity", "2", "--model.moe.shared_expert", "true",
      "--model.ffn_hidden_size", "6", "--parallel.tensor", "2", "--parallel.sequence_parallel", "true",
      "--parallel.expert_tensor", "1"], 2, "shared expert FFN width (ffn / granularity = 3) is not divisible"),
])
def test_bad_input_is_reported(overrides, world, message):
    with pytest.raises(ValueError, match=None) as info:
        validate(load_config(None, overrides), world)
    assert message in str(info.value), str(info.value)


def test_vocab_size_below_the_tokenizer_is_reported():
    from hyperp_megatron.config import ConfigError, check_vocab_size

    with pytest.raises(ConfigError, match=r"model.vocab_size \(100\) is smaller than the tokenizer's vocabulary "
                                          r"\(8192\)"):
        check_vocab_size(load_config(None, ["--model.vocab_size", "100"]), 8192)
    check_vocab_size(load_config(None, ["--model.vocab_size", "8192"]), 8192)
    check_vocab_size(load_config(None, []), 8192)  # unset: the tokenizer's


def test_missing_config_file():
    with pytest.raises(ValueError, match="config file not found"):
        load_config("/nonexistent.yaml")


def _shipped_configs() -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, f), os.path.join(REPO, "configs"))
                  for root, _, files in os.walk(os.path.join(REPO, "configs")) for f in files if f.endswith(".yaml"))


def _assert_applied(section: str, written, loaded) -> None:
    if isinstance(written, dict):
        for key, value in written.items():
            _assert_applied(f"{section}.{key}", value, loaded[key])
    elif isinstance(written, float) or isinstance(loaded, float):
        assert loaded == pytest.approx(float(written)), section
    else:
        assert loaded == written, section


@pytest.mark.parametrize("name", _shipped_configs())
def test_every_shipped_config_is_loaded_as_written(name):
    """Every value written in the YAML reaches the typed config unchanged (nothing dropped or renamed);
    the file's depth and run directory match its name; it validates on the layout it declares."""
    import yaml

    path = os.path.join(REPO, "configs", name)
    cfg = load_config(path)
    _assert_applied("", yaml.safe_load(open(path)), cfg.to_dict())
    stem = name.removesuffix(".yaml")
    assert cfg.logging.run_dir == f"runs/{stem}"
    depth = re.search(r"d(\d+)$", stem)
    if depth:
        assert cfg.model.num_layers == int(depth.group(1))
    validate(cfg, cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.expert)


def test_tiny_config_is_the_documented_main_job():
    """configs/tiny.yaml is what the README's main job describes: 4 layers, width 256, GQA 4/2 heads,
    8.1M parameters at the embedded 8192-token vocabulary, sphere Muon lr 0.05 decaying linearly to
    0.1x, 200 steps of 16 x 256 tokens, TP=2 on 2 processes."""
    from hyperp_megatron.derived import derive

    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"))
    m, t = cfg.model, cfg.train
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.seq_length) == (4, 256, 4, 2, 256)
    assert (m.parameterization, m.qk_norm, m.moe.enabled) == ("hyperp", True, False)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.min_lr_ratio) == ("sphere_muon", 0.05, 0.1)
    assert not cfg.hyperp.enabled
    assert (t.steps, t.global_batch_size, cfg.parallel.tensor, cfg.data.prefixes) == (200, 16, 2, [])
    assert cfg.data.embedded_vocab_size == 8192
    validate(cfg, 2)
    run = derive(cfg, 2, vocab_size=8192)
    assert round(run.num_params / 1e6, 1) == 8.1 and run.steps == 200 and run.lr == 0.05


def test_entry_point_reports_one_line_error_before_heavy_work(tmp_path):
    """A bad key fails fast with one line on stderr and exit code 2, without importing megatron."""
    out = subprocess.run([sys.executable, "-m", "hyperp_megatron.train", "--config",
                          os.path.join(REPO, "configs", "tiny.yaml"), "--train.stepz", "3"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: unknown config key 'train.stepz' (did you mean 'train.steps'?)"]


def test_docs_config_reference_is_current():
    """docs/config.md is the generator's output (python -m hyperp_megatron.config_docs > docs/config.md), and it
    documents every config field."""
    from hyperp_megatron.config_docs import document, markdown

    committed = open(os.path.join(REPO, "docs", "config.md")).read()
    assert committed == document(), "docs/config.md is stale: run python -m hyperp_megatron.config_docs > docs/config.md"
    for row in markdown().splitlines()[2:]:
        assert row in committed, row


@pytest.mark.parametrize("text, message", [
    ("- model\n- train\n", "must be a mapping of sections (model:, train:, ...) at the top level, not a list"),
    ("just a string\n", "at the top level, not a str"),
    ("train:\n  steps: 10\n  steps: 20\n", "duplicate key 'steps' (line 3, first on line 2): keep one"),
    ("train:\n  steps: 10\nmodel: {}\ntrain:\n  seed: 3\n", "duplicate key 'train' (line 4, first on line 1)"),
    ("train: [steps, 3]\n", "config section 'train' must be a mapping"),
    ("train:\n  steps: 10\n bad indent: 1\n", "is not valid YAML"),
])
def test_bad_yaml_is_one_line(tmp_path, text, message):
    """Issue 21: a top-level list with overrides was 'dictionary update sequence element #0' (a traceback in the
    trainer); duplicate keys were accepted silently (the last one won)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        load_config(path, ["--train.steps", "5"])
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert str(path) in str(error.value) or "config section" in str(error.value)


def test_non_utf8_config_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"train:\n  steps: \xff\xfe\n")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_config(path)


def test_override_of_a_value_and_its_keys_is_one_line():
    with pytest.raises(ValueError, match="'train' was given a value earlier"):
        parse_overrides(["--train", "5", "--train.steps", "3"])


def test_entry_point_duplicate_key_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 10\ntrain:\n  steps: 20\n")
    out = subprocess.run([sys.executable, "-m", "hyperp_megatron.train", "--config", str(path),
                          "--logging.run_dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: config file {path}: duplicate key 'train' (line 3, first on line 1): keep one"], out.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_config_files_state_only_what_differs_from_the_defaults():
    """Every YAML file in configs/ sets only keys whose value differs from the dataclass default, so a reader
    sees what is particular to it (defaults: docs/config.md)."""
    import glob

    import yaml

    from hyperp_megatron.config.load import redundant_keys

    files = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
    assert len(files) >= 10
    redundant = {os.path.relpath(path, REPO): redundant_keys(yaml.safe_load(open(path).read()))
                 for path in files}
    assert all(not keys for keys in redundant.values()), {path: keys for path, keys in redundant.items() if keys}


def test_redundant_keys_finds_a_default_restated():
    """Control: a key equal to its default is reported (after coercion: '4' for an int, 2**21 for a float, a
    nested section); a key that differs, an unknown key and a bad value are not."""
    from hyperp_megatron.config.load import redundant_keys

    data = {"model": {"num_layers": "4", "hidden_size": 128, "moe": {"gate": "sqrt", "sparsity": 2}, "nope": 1},
            "hyperp": {"base_batch_tokens": 2097152.0, "base_lr": "x"}, "train": {"steps": 200}}
    assert redundant_keys(data) == ["model.num_layers", "model.moe.gate", "hyperp.base_batch_tokens",
                                    "train.steps"]
