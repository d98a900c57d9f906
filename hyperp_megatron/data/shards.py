"""Inputs -> shards: files, globs and directories expanded into sources (JSON lines, plain text, compressed or
not, Parquet, saved Hugging Face datasets), each cut into shards of about ``shard_bytes`` that workers tokenize
independently. The plan depends only on the inputs and ``shard_bytes``, never on the number of workers, so the
merged output is the same for any ``--workers``.

Cuts: an uncompressed file by byte ranges (a shard owns the lines that start in its range: the records of JSON
lines are unchanged; plain text gets a document boundary at the cut), Parquet by row groups, a Hugging Face
dataset by row ranges; a compressed file is one shard.
"""

from __future__ import annotations

import glob
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from hyperp_megatron.data import readers

INPUT_PATTERNS = (
    "*.jsonl", "*.json", "*.ndjson", "*.jsonl.gz", "*.json.gz", "*.jsonl.zst", "*.json.zst", "*.parquet",
    "*.txt", "*.txt.gz", "*.txt.zst",
)
"""What a directory is searched for (recursively; names starting with '.' are skipped)."""
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Shard:
    """One unit of work: a range of one source. ``start``/``end``: bytes (uncompressed JSON lines / text), row
    groups (Parquet) or rows (Hugging Face); ``end`` None = to the end of the stream (compressed files)."""

    index: int
    path: str
    kind: str
    """'jsonl', 'text', 'parquet' or 'hf'."""
    compression: str | None
    start: int
    end: int | None
    size_bytes: int
    """Input bytes this shard stands for (progress and MB/s)."""
    fingerprint: str
    """Size and modification time of the source: a changed input invalidates the shard on resume."""
    hf_split: str | None = None

    def identity(self) -> dict:
        return asdict(self)

    def where(self, line: int) -> str:
        unit = "row" if self.kind in ("parquet", "hf") else "line"
        return f"{self.path}:{line}" if unit == "line" else f"{self.path}: {unit} {line}"


def detect_format(path: Path) -> tuple[str, str | None]:
    """(kind, compression) from the name: ``.gz``/``.zst`` compression over ``.jsonl``/``.json``/``.ndjson``
    (JSON lines), ``.parquet``, anything else plain text."""
    name = path.name.lower()
    compression = None
    for suffix, codec in ((".gz", "gz"), (".zst", "zst"), (".zstd", "zst")):
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], codec
            break
    if name.endswith(".parquet"):
        if compression:
            raise ValueError(f"{path}: a compressed .parquet file is not supported: give the .parquet itself")
        return "parquet", None
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl", compression
    return "text", compression


def is_hf_dataset_dir(path: Path) -> bool:
    """A ``datasets.save_to_disk`` directory (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def expand_inputs(inputs: Sequence[str | Path], patterns: Sequence[str] = INPUT_PATTERNS) -> list[Path]:
    """Files, Hugging Face dataset directories, globs and directories (searched recursively for ``patterns``)
    as a list of sources, in the order given (a directory's and a glob's files sorted)."""
    if not inputs:
        raise ValueError("no input given: pass at least one file, glob or directory")
    sources: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file() or (path.is_dir() and is_hf_dataset_dir(path)):
            sources.append(path)
        elif path.is_dir():
            found = sorted({p for pattern in patterns for p in path.rglob(pattern)
                            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)})
            if not found:
                raise ValueError(f"input directory {path} holds no file matching {list(patterns)}")
            sources.extend(found)
        elif _GLOB_CHARS & set(str(raw)):
            matches = sorted(glob.glob(str(raw), recursive=True))
            if not matches:
                raise ValueError(f"input pattern {raw!r} matches no file")
            sources.extend(expand_inputs(matches, patterns))
        else:
            raise ValueError(f"input path {path} does not exist: give an existing file, directory or glob")
    return sources


def _fingerprint(paths: Sequence[Path]) -> str:
    stats = [path.stat() for path in paths]
    return ";".join(f"{stat.st_size}:{stat.st_mtime_ns}" for stat in stats)


def _byte_ranges(path: Path, kind: str, compression: str | None, shard_bytes: int, first: int) -> list[Shard]:
    size = path.stat().st_size
    fingerprint = _fingerprint([path])
    if compression or size <= shard_bytes:
        return [Shard(first, str(path), kind, compression, 0, None, size, fingerprint)]
    count = math.ceil(size / shard_bytes)
    edges = [size * i // count for i in range(count + 1)]
    return [Shard(first + i, str(path), kind, None, edges[i], edges[i + 1], edges[i + 1] - edges[i], fingerprint)
            for i in range(count)]


def _parquet_shards(path: Path, text_key: str, shard_bytes: int, first: int) -> list[Shard]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise readers.missing_package("pyarrow", f"{path} (.parquet)") from None
    try:
        metadata = pq.ParquetFile(path).metadata
        names = pq.read_schema(path).names
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        raise ValueError(f"{path} is not a readable Parquet file ({error})") from None
    if text_key not in names:
        raise ValueError(f"{path} has no column {text_key!r} (columns: {names}): set --text-key")
    sizes = [metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)]
    file_size, total = path.stat().st_size, max(1, sum(sizes))
    groups, current, current_bytes = [], [], 0
    for index, size in enumerate(sizes):
        if current and current_bytes + size > shard_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += size
    if current:
        groups.append(current)
    fingerprint = _fingerprint([path])
    return [Shard(first + i, str(path), "parquet", None, group[0], group[-1] + 1,
                  file_size * sum(sizes[g] for g in group) // total, fingerprint)
            for i, group in enumerate(groups)]


def _hf_shards(path: Path, text_key: str, hf_split: str | None, shard_bytes: int, first: int) -> list[Shard]:
    dataset = readers.load_hf_dataset(path, hf_split)
    if text_key not in dataset.column_names:
        raise ValueError(f"{path} has no column {text_key!r} (columns: {dataset.column_names}): set --text-key")
    files = [Path(entry["filename"]) for entry in dataset.cache_files]
    size = sum(file.stat().st_size for file in files)
    rows = dataset.num_rows
    count = max(1, min(rows, math.ceil(size / shard_bytes)))
    edges = [rows * i // count for i in range(count + 1)]
    fingerprint = _fingerprint(files)
    return [Shard(first + i, str(path), "hf", None, edges[i], edges[i + 1], size // count, fingerprint, hf_split)
            for i in range(count)]


def plan_shards(sources: Sequence[Path], text_key: str, shard_bytes: int, hf_split: str | None = None) -> list[Shard]:
    """Every source cut into shards (numbered in input order). Reads Parquet footers and Hugging Face
    metadata, so a missing text column is refused here, before any tokenization."""
    shards: list[Shard] = []
    for path in sources:
        if path.is_dir():
            shards.extend(_hf_shards(path, text_key, hf_split, shard_bytes, len(shards)))
            continue
        kind, compression = detect_format(path)
        if kind == "parquet":
            shards.extend(_parquet_shards(path, text_key, shard_bytes, len(shards)))
        else:
            shards.extend(_byte_ranges(path, kind, compression, shard_bytes, len(shards)))
    return shards


def count_lines_before(path: str | Path, offset: int) -> int:
    """Newlines in the first ``offset`` bytes of an uncompressed file (to name a line of a later shard)."""
    count, remaining = 0, offset
    with open(path, "rb") as handle:
        while remaining > 0 and (block := handle.read(min(remaining, 1 << 24))):
            count += block.count(b"\n")
            remaining -= len(block)
    return count
