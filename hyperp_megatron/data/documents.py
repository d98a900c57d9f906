"""Reading training text: files and directories -> documents (JSONL records whole, plain text cut at paragraph
breaks). Shared by tokenizer training (``tokenizer.py``) and preprocessing (``preprocess.py``).

Long plain-text works are cut into many documents at blank lines, because Megatron's split string divides
*documents* between train/valid/test and a split with zero documents makes ``GPTDataset`` loop forever.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Sequence

DEFAULT_CHARS_PER_DOCUMENT = 2000
"""Plain text is cut at the first blank line after this many characters (~600 tokens)."""
DEFAULT_INPUT_PATTERNS = ("*.txt", "*.jsonl")

# A blank line (possibly holding spaces) plus all whitespace after it: the paragraph boundary.
PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def collect_input_files(paths: Sequence[str | Path], patterns: Sequence[str] = DEFAULT_INPUT_PATTERNS) -> list[Path]:
    """Expand files and directories (searched recursively for ``patterns``) into a sorted file list."""
    if not paths:
        raise ValueError("no input given: pass at least one text/JSONL file or directory")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted({p for pattern in patterns for p in path.rglob(pattern) if p.is_file()})
            if not found:
                raise ValueError(f"input directory {path} holds no file matching {list(patterns)}")
            files.extend(found)
        else:
            raise ValueError(f"input path {path} does not exist: give an existing file or directory")
    return files


def split_into_documents(text: str, chars_per_document: int = DEFAULT_CHARS_PER_DOCUMENT) -> list[str]:
    """Cut ``text`` at the first paragraph break after every ``chars_per_document`` characters.

    The pieces concatenate back to ``text`` exactly; ``chars_per_document <= 0`` keeps one document.
    Whitespace-only text gives no document.
    """
    if not text.strip():
        return []
    if chars_per_document <= 0:
        return [text]
    documents, start = [], 0
    for match in PARAGRAPH_BREAK.finditer(text):
        long_enough = match.end() - start >= chars_per_document and text[start : match.start()].strip()
        if long_enough and match.end() < len(text):
            documents.append(text[start : match.end()])
            start = match.end()
    documents.append(text[start:])
    return documents


def _not_utf8(path: Path, data: bytes, error: UnicodeDecodeError, first_line: int = 1,
              within: str = "file") -> ValueError:
    """One line naming the file, line and byte of the first byte of ``data`` that is not UTF-8."""
    line = first_line + data.count(b"\n", 0, error.start)
    return ValueError(f"{path}:{line}: not valid UTF-8 (byte {data[error.start]:#04x} at offset {error.start} of the "
                      f"{within}); convert the file to UTF-8 or drop the line "
                      "(hyperp-preprocess skips and counts such lines)")


def _read_text(path: Path) -> str:
    """The file's text with line endings untouched (CRLF stays CRLF), so decoding gives its bytes back."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, data, error) from None


def iter_jsonl_documents(path: Path, json_key: str = "text") -> Iterator[str]:
    """Yield ``record[json_key]`` of every non-empty line of a JSON-lines file."""
    with path.open("rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(path, raw, error, line_number, "line") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not a JSON object ({error})") from error
            if not isinstance(record, dict) or json_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{line_number}: no key {json_key!r} (found {keys}); set --json-key")
            if not isinstance(record[json_key], str):
                raise ValueError(f"{path}:{line_number}: {json_key!r} must be a string")
            if record[json_key].strip():
                yield record[json_key]


def iter_documents(
    files: Sequence[Path], json_key: str = "text", chars_per_document: int = DEFAULT_CHARS_PER_DOCUMENT
) -> Iterator[str]:
    """Yield the documents of ``files`` in order: JSONL records whole, plain text cut into pieces."""
    for path in files:
        if path.suffix in (".jsonl", ".json"):
            yield from iter_jsonl_documents(path, json_key)
        else:
            yield from split_into_documents(_read_text(path), chars_per_document)
