"""Which checkpoint a run starts from (``train.find_checkpoint``): with ``checkpoint.load`` set, a run
starts from that checkpoint, and once it has written its own, a requeue or restart continues from its own
latest one (issue 10's note: it used to reload ``checkpoint.load`` and redo the steps since)."""

import json
from pathlib import Path

import pytest

from hyperp_megatron import checkpoint as ckpt
from hyperp_megatron.config import load_config
from hyperp_megatron.train import RunFinished, _check_before_model, find_checkpoint


def _fake_checkpoint(root: Path, step: int, latest: bool = True) -> Path:
    """A complete checkpoint directory as ``checkpoint.save`` leaves it (manifest over its files)."""
    directory = root / f"step_{step:06d}"
    directory.mkdir(parents=True)
    (directory / ckpt.STATE).write_text(json.dumps({"train_state": {"step": step}}))
    (directory / "weights.bin").write_bytes(bytes(range(step % 256)) * 3)
    ckpt._write_manifest(directory)
    if latest:
        (root / ckpt.LATEST).write_text(directory.name)
    return directory


def _cfg(tmp_path: Path, **checkpoint):
    return load_config(None, {"logging": {"run_dir": str(tmp_path / "run")}, "checkpoint": checkpoint,
                              "train": {"steps": 10}})


@pytest.fixture
def start(tmp_path) -> Path:
    return _fake_checkpoint(tmp_path / "pretrained" / "checkpoints", 4)


def test_load_is_used_until_the_run_has_its_own(tmp_path, start):
    cfg = _cfg(tmp_path, load=str(start))
    assert find_checkpoint(cfg) == start
    assert find_checkpoint(_cfg(tmp_path, load=str(start.parent))) == start  # a checkpoints root


def test_requeued_run_prefers_its_own_latest_over_load(tmp_path, start):
    own = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(own, 6)
    newest = _fake_checkpoint(own, 8)
    assert find_checkpoint(_cfg(tmp_path, load=str(start))) == newest
    assert find_checkpoint(_cfg(tmp_path, load=str(start.parent))) == newest


def test_damaged_own_checkpoint_falls_back_to_load(tmp_path, start):
    own = _fake_checkpoint(tmp_path / "run" / "checkpoints", 6)
    (own / "weights.bin").write_bytes(b"truncated")
    messages = []
    assert find_checkpoint(_cfg(tmp_path, load=str(start)), log=messages.append) == start
    assert any("unusable" in m for m in messages), messages


def test_resume_false_loads_the_named_checkpoint_and_never_its_own(tmp_path, start):
    _fake_checkpoint(tmp_path / "run" / "checkpoints", 8)
    assert find_checkpoint(_cfg(tmp_path, load=str(start), resume=False)) == start
    assert find_checkpoint(_cfg(tmp_path, resume=False)) is None


def test_finished_check_reads_the_own_checkpoint_first(tmp_path, start, pg_collection):
    """The 'nothing to do' check before the model looks where the resume will: the own checkpoint at the
    last step ends the run, ``checkpoint.load``'s step 4 alone does not."""
    from hyperp_megatron.derived import derive

    class Tokenizer:
        vocab_size = 256

    cfg = _cfg(tmp_path, load=str(start))
    derived = derive(cfg, 1, vocab_size=256)
    assert derived.steps == 10
    _check_before_model(cfg, derived, Tokenizer(), [])  # only checkpoint.load's step 4: trains on
    _fake_checkpoint(tmp_path / "run" / "checkpoints", 10)
    with pytest.raises(RunFinished, match="step 10"):
        _check_before_model(cfg, derived, Tokenizer(), [])
