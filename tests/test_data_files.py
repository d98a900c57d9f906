"""A dataset's ``.idx`` and ``.bin`` must agree (issue 21): a truncated ``.bin``, one from another preprocessing
run or an unreadable ``.idx`` is one line before any model is built (it used to surface as a traceback, or as
garbage samples, deep in the data loader)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperp_megatron.config import ConfigError, load_config

pytestmark = pytest.mark.tier("unit")


def _write_dataset(prefix: Path, documents: list[list[int]]) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for document in documents:
        builder.add_item(torch.tensor(document))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture
def prefix(tmp_path) -> str:
    return _write_dataset(tmp_path / "good", [list(range(1, 40 + i)) for i in range(12)])


def test_an_intact_dataset_passes(prefix):
    from hyperp_megatron.data.datasets import check_data_files

    assert check_data_files(prefix) == 12


def _damage(prefix: str, how: str, tmp_path: Path) -> None:
    binary = Path(f"{prefix}.bin")
    if how == "truncated_bin":
        binary.write_bytes(binary.read_bytes()[:-10])
    elif how == "longer_bin":
        binary.write_bytes(binary.read_bytes() + b"\0" * 8)
    elif how == "other_run_bin":
        other = _write_dataset(tmp_path / "other", [list(range(1, 30))] * 5)
        shutil.copy(f"{other}.bin", binary)
    elif how == "garbage_idx":
        Path(f"{prefix}.idx").write_bytes(b"not an index at all")


@pytest.mark.parametrize("how, message", [
    ("truncated_bin", "bytes but {p}.idx describes"),
    ("longer_bin", "bytes but {p}.idx describes"),
    ("other_run_bin", "come from different preprocessing runs or one is truncated"),
    ("garbage_idx", "{p}.idx is not a readable index (bad header, not a Megatron .idx file)"),
])
def test_disagreeing_files_are_one_line_before_the_model(prefix, tmp_path, how, message, pg_collection):
    from hyperp_megatron.derived import derive
    from hyperp_megatron.train import _check_before_model

    class Tokenizer:
        vocab_size = 256

    _damage(prefix, how, tmp_path)
    cfg = load_config(None, {"logging": {"run_dir": str(tmp_path / "run")}, "train": {"steps": 4},
                             "data": {"prefixes": [prefix], "tokenizer": str(tmp_path)}})
    with pytest.raises(ConfigError) as error:
        _check_before_model(cfg, derive(cfg, 1, vocab_size=256), Tokenizer(), [prefix])
    text = str(error.value)
    assert text.startswith("data.prefixes: ") and message.format(p=prefix) in text and "\n" not in text
