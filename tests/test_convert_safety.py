"""Conversion safety (issue 21): ``convert verify`` runs the Python files an HF directory ships only for our own
hyperp export or with ``--trust-remote-code``; ``convert export`` never writes into (or, with ``--overwrite``,
deletes) the run it reads; an import ``config.json`` that is not an object is one line.

The code-execution test uses a harmless payload: an ``auto_map`` module that would create a marker file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hyperp_megatron import checkpoint as ckpt

pytestmark = pytest.mark.tier("unit")

PAYLOAD = '''
from pathlib import Path
Path({marker!r}).touch()
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
'''


def _hf_dir_with_code(directory: Path, marker: Path, block: dict | None = None) -> Path:
    directory.mkdir(parents=True)
    config = {"architectures": ["EvilForCausalLM"], "model_type": "evil", "vocab_size": 16,
              "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                           "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    if block is not None:
        config["hyperp_megatron"] = block
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "modeling_evil.py").write_text(PAYLOAD.format(marker=str(marker)))
    return directory


def test_verify_does_not_run_code_from_an_unknown_directory(tmp_path):
    from hyperp_megatron.convert.verify import load_hf

    marker = tmp_path / "payload_ran"
    hf_dir = _hf_dir_with_code(tmp_path / "hf", marker)
    with pytest.raises(ValueError) as error:
        load_hf(hf_dir)
    assert not marker.exists()
    message = str(error.value)
    assert "\n" not in message and "modeling_evil.py" in message and "--trust-remote-code" in message
    # Posing as our export (the config block) is not enough: the modeling file must be ours.
    posing = _hf_dir_with_code(tmp_path / "posing", marker, block={"target": "hyperp", "format_version": 1})
    with pytest.raises(ValueError, match="not this version's hyperp export"):
        load_hf(posing)
    assert not marker.exists()


def test_trust_remote_code_is_what_runs_it(tmp_path):
    """Control: with --trust-remote-code (what verify always passed before) the payload runs."""
    from hyperp_megatron.convert.verify import load_hf

    marker = tmp_path / "payload_ran"
    hf_dir = _hf_dir_with_code(tmp_path / "hf", marker)
    with pytest.raises(Exception):  # the payload defines no model class; importing it is enough
        load_hf(hf_dir, trust_remote_code=True)
    assert marker.exists()


def _our_export_files(directory: Path) -> Path:
    from hyperp_megatron.convert.hyperp import MODELING_FILE

    directory.mkdir(parents=True)
    config = {"architectures": ["HyperPForCausalLM"], "model_type": "hyperp",
              "auto_map": {"AutoConfig": "modeling_hyperp.HyperPConfig",
                           "AutoModelForCausalLM": "modeling_hyperp.HyperPForCausalLM"},
              "hyperp_megatron": {"target": "hyperp", "format_version": 1}}
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy2(MODELING_FILE, directory / MODELING_FILE.name)
    return directory


def test_our_hyperp_export_is_recognised_by_block_and_hash(tmp_path):
    from hyperp_megatron.convert.verify import remote_code_allowed

    ours = _our_export_files(tmp_path / "ours")
    assert remote_code_allowed(ours) is True
    edited = _our_export_files(tmp_path / "edited")
    with (edited / "modeling_hyperp.py").open("a") as handle:
        handle.write("\nimport os  # one changed line\n")
    with pytest.raises(ValueError, match="not this version's hyperp export"):
        remote_code_allowed(edited)
    extra = _our_export_files(tmp_path / "extra")
    (extra / "helpers.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="helpers.py"):
        remote_code_allowed(extra)
    no_block = _our_export_files(tmp_path / "no_block")
    config = json.loads((no_block / "config.json").read_text())
    del config["hyperp_megatron"]
    (no_block / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError):
        remote_code_allowed(no_block)
    assert remote_code_allowed(no_block, trust_remote_code=True) is True


def test_standard_directory_needs_no_code(tmp_path):
    from hyperp_megatron.convert.verify import remote_code_allowed

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    assert remote_code_allowed(tmp_path) is False


# ----------------------------------------------------------------------------------------------
# Export output inside the source run


def _fake_run(run_dir: Path) -> Path:
    step = run_dir / "checkpoints" / "step_000004"
    step.mkdir(parents=True)
    (step / ckpt.STATE).write_text(json.dumps({"train_state": {"step": 4}}))
    ckpt._write_manifest(step)
    (run_dir / "checkpoints" / ckpt.LATEST).write_text(step.name)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    return step


@pytest.mark.parametrize("where, relation", [(".", "is"), ("hf", "lies inside"), ("checkpoints", "lies inside"),
                                             ("..", "contains")])
@pytest.mark.parametrize("given", ["run", "checkpoints", "step"])
def test_export_never_writes_into_its_source_run(tmp_path, where, relation, given):
    """Issue 21: ``export --checkpoint RUN --output RUN --overwrite`` deleted the run."""
    from hyperp_megatron.convert.export import export

    run_dir = tmp_path / "work" / "run"
    step = _fake_run(run_dir)
    checkpoint = {"run": run_dir, "checkpoints": run_dir / "checkpoints", "step": step}[given]
    output = (run_dir / where) if where != ".." else tmp_path / "work"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError) as error:
        export(checkpoint, output, overwrite=True)
    message = str(error.value)
    assert "\n" not in message and f"{relation} the source's run directory {run_dir.resolve()}" in message
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_import_config_that_is_a_json_list_is_one_line(tmp_path):
    from hyperp_megatron.convert.importer import import_hf

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json must hold a JSON object \(a model config\), not a list"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_command_line_one_line(tmp_path, capsys):
    from hyperp_megatron.convert.__main__ import main

    run_dir = tmp_path / "run"
    _fake_run(run_dir)
    assert main(["export", "--checkpoint", str(run_dir), "--output", str(run_dir), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: --output {run_dir} is the source's run directory")
    assert (run_dir / "metrics.jsonl").is_file()
    marker = tmp_path / "payload_ran"
    hf_dir = _hf_dir_with_code(tmp_path / "hf", marker)
    assert main(["verify", "--checkpoint", str(run_dir), "--hf", str(hf_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "modeling_evil.py" in err and not marker.exists()
