"""Checkpoint safety (issue 21), in one process: nothing a checkpoint holds runs code, ``latest`` is followed only
inside its checkpoints root, the fallback message says what is really tried next, and a full disk during a save
says so and leaves no ``.tmp`` behind.

The code-execution tests use a harmless payload: a pickle whose ``__reduce__`` would create a marker file.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from hyperp_megatron import checkpoint as ckpt

pytestmark = pytest.mark.tier("unit")


class _Payload:
    """Unpickling this creates ``marker`` (what a planted payload in a checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _fake_checkpoint(root: Path, step: int, latest: bool = True) -> Path:
    directory = root / f"step_{step:06d}"
    directory.mkdir(parents=True)
    (directory / ckpt.STATE).write_text(json.dumps({"train_state": {"step": step}}))
    (directory / "weights.bin").write_bytes(bytes(range(step % 256)) * 3)
    ckpt._write_manifest(directory)
    if latest:
        (root / ckpt.LATEST).write_text(directory.name)
    return directory


def test_rng_file_with_a_pickled_payload_is_refused_and_never_runs(tmp_path, pg_collection):
    from hyperp_megatron.parallel import layout_key

    marker = tmp_path / "payload_ran"
    key = layout_key(pg_collection, torch.device("cpu"))
    torch.save({"key": key, "state": _Payload(marker)}, tmp_path / "rng_rank00000.pt")
    assert not marker.exists()
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_rng(tmp_path, 0, key, torch.device("cpu"))
    assert not marker.exists()
    message = str(error.value)
    assert "\n" not in message and "refusing to load" in message and "rng_rank00000.pt" in message
    # Control: the same file unpickled the way the old code did runs the payload.
    torch.load(tmp_path / "rng_rank00000.pt", weights_only=False)
    assert marker.exists()


def test_rng_state_is_plain_data(tmp_path, pg_collection):
    """What save_rng writes loads with weights_only=True (tensors, numbers, strings only)."""
    from hyperp_megatron.parallel import layout_key

    key = layout_key(pg_collection, torch.device("cpu"))
    ckpt.save_rng(tmp_path, 0, key, torch.device("cpu"))
    saved = torch.load(tmp_path / "rng_rank00000.pt", weights_only=True)
    assert saved["key"] == key and isinstance(saved["state"]["numpy"]["keys"], torch.Tensor)
    assert ckpt.load_rng(tmp_path, 0, key, torch.device("cpu")) is None


def test_no_torch_load_without_weights_only_in_the_repository():
    repo = Path(__file__).resolve().parents[1]
    offenders = []
    files = [path for folder in ("hyperp_megatron", "tests", "bench", "tools", "launch")
             for path in (repo / folder).rglob("*.py")]
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "torch.load(" in code and "weights_only=True" not in code and path.name != Path(__file__).name:
                offenders.append(f"{path.relative_to(repo)}:{number}")
    assert offenders == []


@pytest.mark.parametrize("name", ["../..", "../../elsewhere", "/etc", "step_000002/../../x", "link"])
def test_latest_is_followed_only_inside_the_root(tmp_path, name):
    root = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(root, 2)
    outside = _fake_checkpoint(tmp_path / "other" / "checkpoints", 4, latest=False)
    if name == "link":
        (root / "step_000009").symlink_to(outside)
        name = "step_000009"
    (root / ckpt.LATEST).write_text(name)
    with pytest.raises(ckpt.CheckpointError, match="refusing to follow it") as error:
        ckpt.find_resumable(root, log=lambda line: None)
    assert "\n" not in str(error.value)


def test_latest_inside_the_root_is_followed(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2)
    _fake_checkpoint(root, 4, latest=False)
    assert ckpt.find_resumable(root) == root / "step_000002"  # latest names step 2, not the newest


def test_the_fallback_message_names_what_is_tried(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2)
    newest = _fake_checkpoint(root, 4)
    (newest / "weights.bin").write_bytes(b"x")
    messages = []
    assert ckpt.find_resumable(root, log=messages.append) == root / "step_000002"
    assert messages == [f"[hyperp] checkpoint {newest} is unusable (truncated file weights.bin (1 of 12 bytes)); "
                        "trying step_000002"]
    (root / "step_000002" / "weights.bin").write_bytes(b"y" * 6)
    messages.clear()
    found = ckpt.scan(root, log=messages.append)
    assert found.intact is None and len(found.damaged) == 2
    assert messages[-1].endswith("no other checkpoint to try") and "previous" not in " ".join(messages)


# ----------------------------------------------------------------------------------------------
# A full disk during a save


@pytest.fixture(scope="module")
def tiny_model(pg_collection):
    from hyperp_megatron.config import load_config
    from hyperp_megatron.convert import ours

    cfg = load_config(None, {"model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                       "num_query_groups": 2, "head_dim": 16, "seq_length": 16,
                                       "vocab_size": 64}})
    return ours.build(cfg, pg_collection, 64)


@pytest.mark.parametrize("failure", ["enospc", "zip_writer"])
def test_disk_full_during_save_says_so_and_removes_the_tmp(tmp_path, tiny_model, monkeypatch, failure):
    root = tmp_path / "checkpoints"
    first = ckpt.save(root, ckpt.TrainState(step=1), [tiny_model], None, {}, keep=2)
    manifest = (first / ckpt.MANIFEST).read_text()

    def full_disk(ckpt_dir, rank, key, device):
        (Path(ckpt_dir) / "rng_rank00000.pt").write_bytes(b"partial")
        if failure == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt, "save_rng", full_disk)
    if failure == "zip_writer":  # the writer lost the errno: the file system's free space tells
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 0})())
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.save(root, ckpt.TrainState(step=2), [tiny_model], None, {}, keep=2)
    message = str(error.value)
    assert message.startswith(f"no space left on {root}") and "\n" not in message
    assert "previous checkpoint step_000001 is intact" in message
    assert not (root / "step_000002.tmp").exists() and not (root / "step_000002").exists()
    assert (root / ckpt.LATEST).read_text() == "step_000001" and ckpt.verify(first) is None
    assert (first / ckpt.MANIFEST).read_text() == manifest


def test_another_write_error_is_not_called_a_full_disk(tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "checkpoints"

    def broken(ckpt_dir, rank, key, device):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ckpt, "save_rng", broken)
    with pytest.raises(ckpt.CheckpointError, match="writing checkpoint step 3 into .* failed") as error:
        ckpt.save(root, ckpt.TrainState(step=3), [tiny_model], None, {}, keep=2)
    assert "no space" not in str(error.value) and not (root / "step_000003.tmp").exists()


def test_an_existing_step_directory_is_set_aside_not_overwritten(tmp_path, tiny_model):
    root = tmp_path / "checkpoints"
    damaged = _fake_checkpoint(root, 5)
    (damaged / "weights.bin").write_bytes(b"damaged")
    messages = []
    ckpt.save(root, ckpt.TrainState(step=5), [tiny_model], None, {}, keep=1, log=messages.append)
    kept = root / "step_000005.kept-1"
    assert (kept / "weights.bin").read_bytes() == b"damaged"
    assert ckpt.verify(root / "step_000005") is None and "kept as step_000005.kept-1" in messages[0]
    ckpt.save(root, ckpt.TrainState(step=6), [tiny_model], None, {}, keep=1)  # pruning leaves it alone
    assert kept.is_dir() and not (root / "step_000005").exists()


def test_a_failing_background_writer_is_reported_and_the_tmp_removed(tmp_path, tiny_model, monkeypatch):
    """``checkpoint.async_save``: the writer process (forked, after the loop went on) hits a full disk. The error
    reaches the loop at the next wait/poll as the one-line full-disk message (the errno is found inside torch's
    per-rank ``CheckpointException``), the ``.tmp`` is removed and the previous checkpoint stays ``latest``; the
    saver can save again afterwards."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    root = tmp_path / "checkpoints"
    first = ckpt.save(root, ckpt.TrainState(step=1), [tiny_model], None, {}, keep=2)
    original = filesystem_async._write_item

    def full_disk(*args, **kwargs):  # in the forked writer, while it writes a tensor
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(filesystem_async, "_write_item", full_disk)
    saver = ckpt.AsyncSaver()
    saver.save(root, ckpt.TrainState(step=2), [tiny_model], None, {}, keep=2)
    with pytest.raises(ckpt.CheckpointError) as error:
        saver.wait()
    message = str(error.value)
    assert message.startswith(f"no space left on {root}: checkpoint step 2 not written") and "\n" not in message
    assert "previous checkpoint step_000001 is intact" in message
    assert not (root / "step_000002.tmp").exists() and not (root / "step_000002").exists()
    assert (root / ckpt.LATEST).read_text() == "step_000001" and ckpt.verify(first) is None
    monkeypatch.setattr(filesystem_async, "_write_item", original)
    saver.save(root, ckpt.TrainState(step=3), [tiny_model], None, {}, keep=2)
    saver.close()
    assert (root / ckpt.LATEST).read_text() == "step_000003" and ckpt.verify(root / "step_000003") is None
