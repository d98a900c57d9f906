"""Preprocessing: text / JSONL documents -> Megatron ``.bin/.idx`` with one end-of-document token per document."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from hyperp_megatron.data.documents import (
    DEFAULT_CHARS_PER_DOCUMENT,
    DEFAULT_INPUT_PATTERNS,
    collect_input_files,
    iter_documents,
)
from hyperp_megatron.data.tokenizer import TextTokenizer, load_tokenizer

_ENCODE_BATCH_DOCUMENTS = 256


@dataclass(frozen=True)
class PreprocessStats:
    """What ``preprocess_to_indexed_dataset`` wrote."""

    num_documents: int
    num_tokens: int
    """Tokens written, the EOD of every document included."""


def write_indexed_dataset(
    documents: Iterable[str], tokenizer: TextTokenizer, output_prefix: str | Path
) -> PreprocessStats:
    """Tokenize ``documents`` (EOD appended to each) into ``<prefix>.bin`` / ``<prefix>.idx``.

    One sequence per document, so Megatron's document split and sequence count agree. Both files
    are written under temporary names and renamed, ``.bin`` first: a complete ``.idx`` implies a
    complete ``.bin``. Tokens are stored as uint16 when the vocabulary fits.
    """
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_prefix.with_name(f".{output_prefix.name}.tmp-{os.getpid()}")
    builder = IndexedDatasetBuilder(f"{temporary}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    num_documents = num_tokens = 0
    documents = iter(documents)
    try:
        while batch := list(itertools.islice(documents, _ENCODE_BATCH_DOCUMENTS)):
            for ids in tokenizer.tokenize_batch(batch):
                ids.append(tokenizer.eod)
                builder.add_item(torch.tensor(ids, dtype=torch.int64))
                builder.end_document()
                num_documents += 1
                num_tokens += len(ids)
        builder.finalize(f"{temporary}.idx")
        if num_documents == 0:
            raise ValueError("the inputs hold no non-empty document: nothing to write")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(f"{temporary}{suffix}").unlink(missing_ok=True)
        raise
    os.replace(f"{temporary}.bin", f"{output_prefix}.bin")
    os.replace(f"{temporary}.idx", f"{output_prefix}.idx")
    return PreprocessStats(num_documents=num_documents, num_tokens=num_tokens)


def preprocess_to_indexed_dataset(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    output_prefix: str | Path,
    json_key: str = "text",
    chars_per_document: int = DEFAULT_CHARS_PER_DOCUMENT,
    patterns: Sequence[str] = DEFAULT_INPUT_PATTERNS,
) -> PreprocessStats:
    """Text files / directories / JSONL -> Megatron ``.bin/.idx`` at ``output_prefix``."""
    tokenizer = load_tokenizer(tokenizer_dir)  # fail on a bad tokenizer before reading any input
    files = collect_input_files(inputs, patterns)
    return write_indexed_dataset(iter_documents(files, json_key, chars_per_document), tokenizer, output_prefix)
