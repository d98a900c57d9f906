"""Reading one shard of one input as a stream of records, in bounded memory: JSON lines (plain, ``.gz``,
``.zst``), plain text (cut into documents at paragraph breaks, as ``documents.split_into_documents``), Parquet
row groups and rows of a saved Hugging Face dataset.

A record is ``Record(text, reason, line)``: ``text`` for a document, else ``reason`` says why it was skipped
(one of ``SKIP_REASONS``); line-based readers end with ``Record(None, None, lines read)``. ``line`` counts from 1
within the shard's byte range (JSON lines, text; ``pipeline.py`` turns it into a line of the file) or is the
row number in the file (Parquet, Hugging Face).
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from hyperp_megatron.data.documents import PARAGRAPH_BREAK

SKIP_REASONS = ("invalid_utf8", "invalid_json", "missing_key", "not_a_string", "empty", "too_long", "corrupt_file")
_READ_BYTES = 1 << 20
_ROW_BATCH = 1024


@dataclass(frozen=True)
class Record:
    text: str | None
    reason: str | None
    line: int


def missing_package(package: str, purpose: str) -> ValueError:
    return ValueError(f"{purpose} needs the package {package}: pip install 'hyperp-megatron[data]' (or {package})")


def open_binary_stream(raw: BinaryIO, compression: str | None) -> BinaryIO:
    """The bytes of the open file ``raw``, decompressed (``gz``/``zst``); ``raw.tell()`` then counts the
    compressed bytes read."""
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zst":
        try:
            import zstandard
        except ImportError:
            raise missing_package("zstandard", f"{raw.name} (.zst)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=False), _READ_BYTES)
    return raw


def read_lines(stream: BinaryIO, max_bytes: int, end: int | None = None) -> Iterator[bytes | None]:
    """Lines of ``stream`` (newline kept); ``None`` for a line longer than ``max_bytes``, which is read and
    dropped in bounded pieces. With ``end``, stops before the first line that starts at or after ``end``
    (the stream's position counts the bytes)."""
    while end is None or stream.tell() < end:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while (piece := stream.readline(_READ_BYTES)) and not piece.endswith(b"\n"):
                pass
            yield None
        else:
            yield line


def corrupt_errors(compression: str | None) -> tuple[type[BaseException], ...]:
    """What reading a damaged compressed file raises: such a file ends its records with one ``corrupt_file``."""
    if compression == "gz":
        return (gzip.BadGzipFile, EOFError, zlib.error)
    if compression == "zst":
        import zstandard

        return (zstandard.ZstdError,)
    return ()


def _decoded_lines(stream: BinaryIO, max_bytes: int, end: int | None, corrupt_errors: tuple):
    """(line number, text) per line of ``stream``, or (line number, Record) for a line that is too long, not
    UTF-8, or a corrupt compressed stream (which ends the iteration)."""
    line_number = 0
    lines = read_lines(stream, max_bytes, end)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except corrupt_errors:
            yield line_number + 1, Record(None, "corrupt_file", line_number + 1)
            return
        line_number += 1
        if line is None:
            yield line_number, Record(None, "too_long", line_number)
            continue
        try:
            yield line_number, line.decode("utf-8")
        except UnicodeDecodeError:
            yield line_number, Record(None, "invalid_utf8", line_number)


def iter_json_records(stream: BinaryIO, text_key: str, max_bytes: int, end: int | None,
                      corrupt_errors: tuple) -> Iterator[Record]:
    for line_number, text in _decoded_lines(stream, max_bytes, end, corrupt_errors):
        if isinstance(text, Record):
            yield text
            continue
        if not text.strip():
            continue  # a blank line is no record
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            yield Record(None, "invalid_json", line_number)
            continue
        if not isinstance(record, dict) or text_key not in record or record[text_key] is None:
            yield Record(None, "missing_key", line_number)
        elif not isinstance(record[text_key], str):
            yield Record(None, "not_a_string", line_number)
        elif not record[text_key].strip():
            yield Record(None, "empty", line_number)
        else:
            yield Record(record[text_key], None, line_number)
    yield Record(None, None, line_number)  # the end: lines read


class ParagraphSplitter:
    """``documents.split_into_documents`` on a stream: ``feed`` text, take the finished documents; ``close``
    gives the rest. Equal pieces to the whole-text function, plus a cut after the line that takes a document
    past ``max_chars`` (bounded memory for text without paragraph breaks)."""

    def __init__(self, chars_per_document: int, max_chars: int) -> None:
        self.chars_per_document = chars_per_document
        self.max_chars = max_chars
        self._buffer = ""
        self._scan = 0  # matches starting before this are decided
        self._limit = 0  # where the buffer's trailing whitespace starts

    def feed(self, text: str) -> list[str]:
        if text.strip():  # the trailing whitespace run starts after this text's last non-space
            self._limit = len(self._buffer) + len(text.rstrip())
        self._buffer += text
        documents = []
        if self.chars_per_document > 0:
            # A match is final when it starts before the trailing whitespace run: it cannot grow any more.
            start = 0
            for match in PARAGRAPH_BREAK.finditer(self._buffer, self._scan, self._limit):
                if match.end() - start >= self.chars_per_document and self._buffer[start:match.start()].strip():
                    documents.append(self._buffer[start:match.end()])
                    start = match.end()
            if start:
                self._buffer = self._buffer[start:]
                self._limit -= start
            self._scan = self._limit
        if len(self._buffer) > self.max_chars and self._limit:
            documents.append(self._buffer)
            self._buffer, self._scan, self._limit = "", 0, 0
        return documents

    def close(self) -> list[str]:
        rest, self._buffer, self._scan, self._limit = self._buffer, "", 0, 0
        return [rest] if rest.strip() else []


def iter_text_records(stream: BinaryIO, chars_per_document: int, max_bytes: int, end: int | None,
                      corrupt_errors: tuple) -> Iterator[Record]:
    """Plain text in documents; a line that is not UTF-8 (or too long) is dropped and reported."""
    splitter = ParagraphSplitter(chars_per_document, max_bytes)
    for line_number, text in _decoded_lines(stream, max_bytes, end, corrupt_errors):
        if isinstance(text, Record):
            yield text
            continue
        for document in splitter.feed(text):
            yield Record(document, None, line_number)
    for document in splitter.close():
        yield Record(document, None, line_number)
    yield Record(None, None, line_number)  # the end: lines read


def _column_records(values, first_row: int, max_chars: int) -> Iterator[Record]:
    for offset, value in enumerate(values):
        row = first_row + offset
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                yield Record(None, "invalid_utf8", row)
                continue
        if value is None:
            yield Record(None, "missing_key", row)
        elif not isinstance(value, str):
            yield Record(None, "not_a_string", row)
        elif len(value) > max_chars:
            yield Record(None, "too_long", row)
        elif not value.strip():
            yield Record(None, "empty", row)
        else:
            yield Record(value, None, row)


def iter_parquet_records(path: Path, text_key: str, row_groups: list[int], max_chars: int) -> Iterator[Record]:
    """Rows of ``row_groups``, read one batch at a time; ``line`` is the row number in the file (from 1)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise missing_package("pyarrow", f"{path} (.parquet)") from None
    parquet = pq.ParquetFile(path)
    row = 1 + sum(parquet.metadata.row_group(i).num_rows for i in range(row_groups[0]))
    for batch in parquet.iter_batches(batch_size=_ROW_BATCH, row_groups=row_groups, columns=[text_key]):
        values = batch.column(0).to_pylist()
        yield from _column_records(values, row, max_chars)
        row += len(values)


def load_hf_dataset(path: Path, split: str | None):
    """A ``save_to_disk`` directory (``Dataset`` or one split of a ``DatasetDict``), memory-mapped."""
    try:
        import datasets
    except ImportError:
        raise missing_package("datasets", f"the Hugging Face dataset {path}") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} is a DatasetDict with splits {sorted(loaded)}: choose one with --hf-split")
        return loaded[split]
    return loaded


def iter_hf_records(path: Path, split: str | None, text_key: str, start: int, end: int,
                    max_chars: int) -> Iterator[Record]:
    """Rows ``[start, end)`` of a saved Hugging Face dataset; ``line`` is the row number (from 1)."""
    dataset = load_hf_dataset(path, split).select_columns([text_key]).select(range(start, end))
    row = start + 1
    for batch in dataset.iter(batch_size=_ROW_BATCH):
        values = batch[text_key]
        yield from _column_records(values, row, max_chars)
        row += len(values)


_WORD_BOUNDARY = re.compile(r"(?<=\S) (?=\S)")


def cut_long_text(text: str, piece_chars: int) -> list[str]:
    """``text`` in pieces of at most about ``piece_chars`` characters, cut before a single space between two
    words (a pre-token boundary of GPT-2-style byte-level BPE, so the pieces' tokens concatenate to the
    text's), else at a line break, else anywhere. Bounds the tokenizer's memory on very long documents."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        window_start, window_end = start + piece_chars // 2, start + piece_chars
        cut = None
        for match in _WORD_BOUNDARY.finditer(text, window_start, window_end):
            cut = match.start()
        if cut is None:
            newline = text.rfind("\n", window_start, window_end)
            cut = newline + 1 if newline >= 0 else window_end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces
