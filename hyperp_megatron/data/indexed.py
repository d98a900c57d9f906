"""Megatron's indexed dataset format (``<prefix>.bin`` + ``<prefix>.idx``), written with numpy and streamed:
a writer that takes one document in pieces (so a long document never sits in memory as token ids), a merge that
concatenates shards without loading them, and a reader of the ``.idx`` header for verification.

The layout is ``megatron.core.datasets.indexed_dataset``'s (``_IndexWriter``): header ``MMIDIDX\\0\\0``, version 1
(u64), dtype code (u8), sequence count (u64), document count (u64, one more than documents: it starts with 0), then
``int32`` sequence lengths, ``int64`` byte pointers and ``int64`` document indices. One sequence per document.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
_COPY_BYTES = 8 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron's ``DType.optimal_dtype``: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_COPY_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _write_index_header(handle, dtype: np.dtype, num_sequences: int) -> None:
    handle.write(INDEX_HEADER)
    handle.write(struct.pack("<Q", 1))
    handle.write(struct.pack("<B", _DTYPE_CODES[np.dtype(dtype)]))
    handle.write(struct.pack("<Q", num_sequences))
    handle.write(struct.pack("<Q", num_sequences + 1))


@dataclass(frozen=True)
class IndexInfo:
    """What an ``.idx`` says about its ``.bin``."""

    dtype: np.dtype
    num_documents: int
    num_tokens: int

    @property
    def bin_bytes(self) -> int:
        return self.num_tokens * self.dtype.itemsize


def read_index(idx_path: str | Path) -> tuple[IndexInfo, np.ndarray]:
    """Header and sequence lengths of an ``.idx`` written by this module (one sequence per document).

    ValueError (one line) for a file that is not such an index: wrong header, truncated, inconsistent counts.
    """
    idx_path = Path(idx_path)
    raw = idx_path.read_bytes()
    codes = {code: dtype for dtype, code in _DTYPE_CODES.items()}
    if len(raw) < 34 or raw[:9] != INDEX_HEADER or raw[17] not in codes:
        raise ValueError(f"{idx_path} is not a Megatron .idx of uint16/int32 tokens")
    num_sequences, num_doc_indices = struct.unpack("<QQ", raw[18:34])
    expected = 34 + num_sequences * (4 + 8) + num_doc_indices * 8
    if len(raw) != expected or num_doc_indices != num_sequences + 1:
        raise ValueError(f"{idx_path} is truncated or not one sequence per document ({len(raw)} bytes, "
                         f"expected {expected})")
    lengths = np.frombuffer(raw, dtype=np.int32, count=num_sequences, offset=34)
    info = IndexInfo(codes[raw[17]], int(num_sequences), int(lengths.sum(dtype=np.int64)))
    return info, lengths


class IndexedWriter:
    """Write documents to ``<prefix>.bin``; ``finish`` writes ``<prefix>.idx``. Tokens go to disk piece by piece.

    ``add_tokens`` appends to the current document, ``end_document`` closes it. ``bin_sha256`` is hashed while
    writing. The caller names temporary prefixes and renames (``.bin`` first, so a complete ``.idx`` implies a
    complete ``.bin``).
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._bin = open(f"{self.prefix}.bin", "wb")
        self._digest = hashlib.sha256()
        self._lengths: list[int] = []
        self._current = 0
        self.num_tokens = 0

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def add_tokens(self, tokens: np.ndarray | Sequence[int]) -> None:
        data = np.asarray(tokens, dtype=self.dtype).tobytes()
        self._bin.write(data)
        self._digest.update(data)
        count = len(data) // self.dtype.itemsize
        self._current += count
        self.num_tokens += count

    def end_document(self) -> bool:
        """Close the current document; False (and nothing recorded) when it holds no token."""
        if self._current >= 2**31:
            raise ValueError(f"a document of {self._current} tokens exceeds the format's int32 sequence length")
        if self._current == 0:
            return False
        self._lengths.append(self._current)
        self._current = 0
        return True

    def finish(self) -> str:
        """Close the ``.bin``, write the ``.idx``; returns the ``.bin``'s sha256."""
        assert self._current == 0, "finish() inside a document: call end_document() first"
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        with open(f"{self.prefix}.idx", "wb") as handle:
            _write_index_header(handle, self.dtype, len(lengths))
            handle.write(lengths.tobytes())
            handle.write((pointers * self.dtype.itemsize).tobytes())
            handle.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Close and remove what was written."""
        self._bin.close()
        for suffix in (".bin", ".idx"):
            Path(f"{self.prefix}{suffix}").unlink(missing_ok=True)


def merge_indexed(shard_prefixes: Sequence[str | Path], output_prefix: str | Path) -> tuple[IndexInfo, str]:
    """Concatenate shards into ``output_prefix`` (``.bin`` + ``.idx``), streaming; returns the merged info and
    the ``.bin``'s sha256. Equal bytes to writing every document of every shard, in order, with one writer."""
    infos = [read_index(f"{prefix}.idx")[0] for prefix in shard_prefixes]
    if not infos:
        raise ValueError("nothing to merge: no shard")
    dtype = infos[0].dtype
    assert all(info.dtype == dtype for info in infos), "shards of one plan have one token dtype"
    digest = hashlib.sha256()
    with open(f"{output_prefix}.bin", "wb") as out:
        for prefix in shard_prefixes:
            with open(f"{prefix}.bin", "rb") as source:
                while block := source.read(_COPY_BYTES):
                    digest.update(block)
                    out.write(block)
    num_documents = sum(info.num_documents for info in infos)
    with open(f"{output_prefix}.idx", "wb") as out:
        _write_index_header(out, dtype, num_documents)
        for prefix in shard_prefixes:  # the three sections one after the other, one shard's arrays at a time
            out.write(read_index(f"{prefix}.idx")[1].tobytes())
        offset = 0
        for prefix in shard_prefixes:
            lengths = read_index(f"{prefix}.idx")[1].astype(np.int64)
            pointers = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1], out=pointers[1:])
            out.write(((pointers + offset) * dtype.itemsize).tobytes())
            offset += int(lengths.sum())
        out.write(np.arange(num_documents + 1, dtype=np.int64).tobytes())
    return IndexInfo(dtype, num_documents, sum(info.num_tokens for info in infos)), digest.hexdigest()


def replace_prefix(temporary: str | Path, final: str | Path) -> None:
    """Rename ``<temporary>.bin/.idx`` to ``<final>.bin/.idx``, ``.bin`` first."""
    for suffix in (".bin", ".idx"):
        os.replace(f"{temporary}{suffix}", f"{final}{suffix}")
