"""Which checkpoint a run starts from (``train.find_checkpoint``): with ``checkpoint.load`` set, a run
starts from that checkpoint, and once it has written its own, a requeue or restart continues from its own
latest one (issue 10's note: it used to reload ``checkpoint.load`` and redo the steps since)."""

import json
from pathlib import Path

import pytest

from hyperp_megatron import checkpoint as ckpt
from hyperp_megatron.config import load_config
from hyperp_megatron.train import RunFinished, _check_before_model, find_checkpoint

pytestmark = pytest.mark.tier("unit")


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


@pytest.mark.parametrize("load", [False, True])
def test_damaged_only_checkpoint_stops_the_run_and_is_left_alone(tmp_path, start, load):
    """Issue 21: the run's only checkpoint is damaged: one error naming the damage and the way out, nothing
    touched (it used to restart from step 0, or from checkpoint.load, over its own step_* directories)."""
    own = _fake_checkpoint(tmp_path / "run" / "checkpoints", 6)
    (own / "weights.bin").write_bytes(b"truncated")
    before = sorted((p.name, p.read_bytes()) for p in own.parent.rglob("*") if p.is_file())
    messages = []
    with pytest.raises(ckpt.CheckpointError) as error:
        find_checkpoint(_cfg(tmp_path, **({"load": str(start)} if load else {})), log=messages.append)
    message = str(error.value)
    assert "\n" not in message and f"no intact checkpoint in {own.parent}" in message
    assert "truncated file weights.bin" in message and "--logging.run_dir NEW_DIR" in message
    assert messages == [f"[hyperp] checkpoint {own} is unusable (truncated file weights.bin (9 of 18 bytes)); "
                        "no other checkpoint to try"]
    assert sorted((p.name, p.read_bytes()) for p in own.parent.rglob("*") if p.is_file()) == before


def test_damaged_newest_falls_back_to_an_intact_earlier_one_and_is_set_aside(tmp_path):
    own = tmp_path / "run" / "checkpoints"
    earlier = _fake_checkpoint(own, 4)
    newest = _fake_checkpoint(own, 6)
    (newest / "weights.bin").write_bytes(b"truncated")
    damaged = []
    assert find_checkpoint(_cfg(tmp_path), log=lambda line: None, damaged=damaged) == earlier
    assert damaged == [newest]
    aside = ckpt.set_aside(newest, log=lambda line: None)
    assert aside.name == "step_000006.kept-1" and (aside / "weights.bin").read_bytes() == b"truncated"
    assert ckpt.complete_checkpoints(own) == [earlier]  # no prune or resume sees it again


def test_resume_false_loads_the_named_checkpoint_and_never_its_own(tmp_path, start):
    assert find_checkpoint(_cfg(tmp_path, load=str(start), resume=False)) == start
    assert find_checkpoint(_cfg(tmp_path, resume=False)) is None
    _fake_checkpoint(tmp_path / "run" / "checkpoints", 8)  # ... and refuses to mix with an earlier run's
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.resume is false but .* already holds checkpoints"):
        find_checkpoint(_cfg(tmp_path, load=str(start), resume=False))


@pytest.mark.parametrize("content", ["empty", "unrelated", "damaged"])
def test_load_without_an_intact_checkpoint_is_an_error(tmp_path, content):
    """Issue 21: ``--checkpoint.load DIR`` with no checkpoint in DIR trained from random weights without a word."""
    load = tmp_path / "elsewhere"
    load.mkdir()
    if content == "unrelated":
        (load / "notes.txt").write_text("not a checkpoint")
    if content == "damaged":
        (_fake_checkpoint(load, 3) / "weights.bin").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint.load {load}: ") as error:
        find_checkpoint(_cfg(tmp_path, load=str(load)), log=lambda line: None)
    assert ("no intact checkpoint" if content == "damaged" else "no checkpoint in it") in str(error.value)


def test_load_accepts_a_run_directory(tmp_path, start):
    assert find_checkpoint(_cfg(tmp_path, load=str(start.parent.parent))) == start


def test_load_of_a_damaged_named_checkpoint_is_an_error(tmp_path, start):
    (start / "weights.bin").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match="is damaged \\(truncated file weights.bin"):
        find_checkpoint(_cfg(tmp_path, load=str(start)))


def _meta(**config) -> dict:
    return {"train_state": {"step": 4}, "config": load_config(None, config).to_dict()}


def test_resume_with_another_shape_or_optimizer_names_the_keys(tmp_path):
    from hyperp_megatron.resume import config_changes

    saved = _meta(model={"hidden_size": 64}, optim={"name": "adamw"})
    cfg = load_config(None, {"model": {"hidden_size": 128, "num_layers": 2}, "optim": {"name": "sphere_muon"}})
    with pytest.raises(ckpt.CheckpointError) as error:
        config_changes(cfg, saved, tmp_path / "step_000004")
    message = str(error.value)
    assert "\n" not in message
    assert "model.num_layers 4 -> 2, model.hidden_size 64 -> 128, optim.name 'adamw' -> 'sphere_muon'" in message
    # A weights-only checkpoint (an import) starts a fresh optimizer: only the shape counts.
    cfg = load_config(None, {"model": {"hidden_size": 64}, "optim": {"name": "sphere_muon"}})
    assert config_changes(cfg, {**saved, "weights_only": True}, tmp_path) == {}


def test_resume_with_changed_data_settings_is_reported(tmp_path):
    from hyperp_megatron.resume import config_changes

    saved = _meta(train={"seed": 1, "global_batch_size": 16, "steps": 10})
    cfg = load_config(None, {"train": {"seed": 2, "global_batch_size": 32, "steps": 20},
                             "optim": {"lr": 0.1}})  # steps and lr: legitimate changes, not reported
    assert config_changes(cfg, saved, tmp_path) == {"train.seed": [1, 2], "train.global_batch_size": [16, 32]}


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
