"""Parallel preprocessing (``hyperp-preprocess``): inputs -> shards (``shards.py``) tokenized by worker processes
into one ``.bin/.idx`` each under ``<prefix>.shards/``, merged into ``<prefix>.bin/.idx`` plus the sidecar
``<prefix>.meta.json`` (``metadata.py``).

Resumable: a shard is finished when its ``.json`` (written last, with the hashes of its two files) is there; a
rerun with the same inputs and settings verifies and skips finished shards, and an existing output whose sidecar
matches is left alone. Memory per worker is bounded: records are streamed, documents tokenized in batches of
about ``_ENCODE_CHARS`` characters and long documents in pieces (``readers.cut_long_text``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from hyperp_megatron.data import indexed, metadata, readers
from hyperp_megatron.data.documents import DEFAULT_CHARS_PER_DOCUMENT
from hyperp_megatron.data.progress import Progress
from hyperp_megatron.data.shards import INPUT_PATTERNS, Shard, count_lines_before, expand_inputs, plan_shards
from hyperp_megatron.data.tokenizer import TextTokenizer, load_tokenizer

_PIECE_CHARS = 100_000  # a longer document is tokenized in pieces of about this many characters
_ENCODE_CHARS = 1 << 20  # characters per encode_batch call
_ENCODE_DOCUMENTS = 512
_REPORT_SECONDS = 0.5
_EXAMPLES_PER_SHARD = 5
_SHARD_FORMAT = 1


@dataclass(frozen=True)
class PreprocessConfig:
    """What ``hyperp-preprocess`` does (its flags, one to one)."""

    inputs: Sequence[str]
    tokenizer: str
    output_prefix: str
    text_key: str = "text"
    workers: int = 1
    append_eos: bool = True
    """End every document with the tokenizer's EOD token (Megatron's document separator)."""
    prepend_bos: bool = False
    """Start every document with the tokenizer's ``bos_token``."""
    strict: bool = False
    """Stop at the first bad record instead of counting and skipping it."""
    chars_per_document: int = DEFAULT_CHARS_PER_DOCUMENT
    shard_bytes: int = 256 << 20
    max_record_bytes: int = 64 << 20
    """Longer JSON lines / text lines / column values are skipped as ``too_long`` (read in bounded pieces)."""
    hf_split: str | None = None
    patterns: Sequence[str] = INPUT_PATTERNS
    keep_shards: bool = False
    overwrite: bool = False

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.shard_bytes < 4096:
            raise ValueError(f"--shard-mib is too small ({self.shard_bytes} bytes): give at least 0.004 (4 KiB)")
        if self.max_record_bytes < 1024:
            raise ValueError(f"--max-record-mib is too small ({self.max_record_bytes} bytes)")
        if not (self.append_eos or self.prepend_bos):
            raise ValueError("with neither --append-eos nor --prepend-bos documents run together without a "
                             "boundary: keep --append-eos (the default) or add --prepend-bos")


@dataclass
class ShardResult:
    """What one shard holds (also its ``.json``, with the identity and the files' hashes)."""

    documents: int = 0
    tokens: int = 0
    lines: int = 0
    skipped: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)
    """Up to ``_EXAMPLES_PER_SHARD`` (line, reason) of skipped records, lines local to the shard's range."""


@dataclass
class Summary:
    output_prefix: str
    documents: int
    tokens: int
    skipped: dict
    examples: list[str]
    """"<file>:<line>: <reason>" of the first skipped records."""
    shards: int
    reused_shards: int
    input_bytes: int
    seconds: float
    up_to_date: bool = False


def _settings(config: PreprocessConfig, tokenizer: TextTokenizer) -> dict:
    """Everything besides the source range that decides a shard's bytes."""
    return {"format": _SHARD_FORMAT, "tokenizer": tokenizer.identity(), "text_key": config.text_key,
            "append_eos": config.append_eos, "prepend_bos": config.prepend_bos,
            "chars_per_document": config.chars_per_document, "max_record_bytes": config.max_record_bytes}


def _records(shard: Shard, config: PreprocessConfig) -> Iterator[tuple[readers.Record, int]]:
    """The shard's records, each with the input bytes read so far (for progress; estimated for rows)."""
    if shard.kind == "parquet":
        import pyarrow.parquet as pq

        groups = list(range(shard.start, shard.end))
        parquet_metadata = pq.ParquetFile(shard.path).metadata
        first = 1 + sum(parquet_metadata.row_group(i).num_rows for i in range(shard.start))
        rows = max(1, sum(parquet_metadata.row_group(i).num_rows for i in groups))
        for record in readers.iter_parquet_records(Path(shard.path), config.text_key, groups,
                                                   config.max_record_bytes):
            yield record, shard.size_bytes * (record.line - first + 1) // rows
        return
    if shard.kind == "hf":
        rows = max(1, shard.end - shard.start)
        for record in readers.iter_hf_records(Path(shard.path), shard.hf_split, config.text_key, shard.start,
                                              shard.end, config.max_record_bytes):
            yield record, shard.size_bytes * (record.line - shard.start) // rows
        return
    with open(shard.path, "rb") as raw:
        stream = readers.open_binary_stream(raw, shard.compression)
        if shard.start > 0:
            stream.seek(shard.start - 1)
            stream.readline()  # the line holding byte start-1 belongs to the previous shard
        errors = readers.corrupt_errors(shard.compression)
        if shard.kind == "jsonl":
            records = readers.iter_json_records(stream, config.text_key, config.max_record_bytes, shard.end, errors)
        else:
            records = readers.iter_text_records(stream, config.chars_per_document, config.max_record_bytes,
                                                shard.end, errors)
        for record in records:
            yield record, raw.tell() - shard.start


class _ShardTokenizer:
    """Documents -> tokens into an ``IndexedWriter``, in bounded batches; BOS/EOS per the policy."""

    def __init__(self, tokenizer: TextTokenizer, writer: indexed.IndexedWriter, config: PreprocessConfig) -> None:
        self.tokenizer, self.writer = tokenizer, writer
        self.bos = [tokenizer.bos] if config.prepend_bos else []
        self.eos = [tokenizer.eod] if config.append_eos else []
        self.pending: list[tuple[str, bool, bool]] = []  # (piece, first of its document, last of it)
        self.pending_chars = 0
        self.dropped_empty = 0

    def add(self, text: str) -> None:
        pieces = readers.cut_long_text(text, _PIECE_CHARS) if len(text) > _PIECE_CHARS else [text]
        for number, piece in enumerate(pieces):
            self.pending.append((piece, number == 0, number == len(pieces) - 1))
            self.pending_chars += len(piece)
            if self.pending_chars >= _ENCODE_CHARS or len(self.pending) >= _ENCODE_DOCUMENTS:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        encoded = self.tokenizer.tokenize_batch([piece for piece, _, _ in self.pending])
        for (_, first, last), ids in zip(self.pending, encoded):
            self.writer.add_tokens((self.bos if first else []) + ids + (self.eos if last else []))
            if last and not self.writer.end_document():
                self.dropped_empty += 1
        self.pending, self.pending_chars = [], 0


def _resolve_line(shard: Shard, line: int) -> str:
    """``file:line`` of a record of ``shard`` (a later byte range counts the lines before it: error path only)."""
    if shard.kind in ("jsonl", "text") and shard.start > 0:
        line += count_lines_before(shard.path, shard.start - 1) + 1  # + the line holding byte start-1
    return shard.where(line)


def build_shard(shard: Shard, config: PreprocessConfig, shard_prefix: str, report: Callable | None = None) -> dict:
    """Tokenize one shard into ``<shard_prefix>.bin/.idx``, then write ``<shard_prefix>.json`` (last: it marks
    the shard finished) and return it. ``report(documents, tokens, bytes)`` gets progress deltas about every
    half second. With ``config.strict`` the first bad record raises ValueError naming its file and line."""
    tokenizer = load_tokenizer(config.tokenizer)
    temporary = f"{shard_prefix}.tmp-{os.getpid()}"
    writer = indexed.IndexedWriter(temporary, indexed.token_dtype(tokenizer.vocab_size))
    encoder = _ShardTokenizer(tokenizer, writer, config)
    result, skipped = ShardResult(), Counter()
    reported, last_report, position = [0, 0, 0], time.monotonic(), 0
    try:
        for number, (record, position) in enumerate(_records(shard, config)):
            result.lines = record.line
            if record.text is not None:
                encoder.add(record.text)
            elif record.reason is None:
                pass  # the end of a line-based range
            elif config.strict:
                raise ValueError(f"{_resolve_line(shard, record.line)}: {record.reason.replace('_', ' ')} record "
                                 "(--strict; without it bad records are counted and skipped)")
            else:
                skipped[record.reason] += 1
                if len(result.examples) < _EXAMPLES_PER_SHARD:
                    result.examples.append([record.line, record.reason])
            if report and number % 64 == 0 and time.monotonic() - last_report > _REPORT_SECONDS:
                _report(report, writer, reported, position)
                last_report = time.monotonic()
        encoder.flush()
        bin_sha256 = writer.finish()
    except BaseException:
        writer.abort()
        raise
    if report:
        _report(report, writer, reported, shard.size_bytes)
    skipped["empty"] += encoder.dropped_empty
    result.documents, result.tokens = writer.num_documents, writer.num_tokens
    result.skipped = {reason: count for reason, count in sorted(skipped.items()) if count}
    indexed.replace_prefix(temporary, shard_prefix)
    record = {"identity": _shard_identity(shard, config, tokenizer), "result": result.__dict__,
              "bin_sha256": bin_sha256, "idx_sha256": indexed.sha256_file(f"{shard_prefix}.idx")}
    metadata.write_json_atomic(Path(f"{shard_prefix}.json"), record)
    return record


def _report(report: Callable, writer: indexed.IndexedWriter, reported: list, position: int) -> None:
    now = [writer.num_documents, writer.num_tokens, position]
    report(*(a - b for a, b in zip(now, reported)))
    reported[:] = now


def _shard_identity(shard: Shard, config: PreprocessConfig, tokenizer: TextTokenizer) -> dict:
    return {"shard": shard.identity(), **_settings(config, tokenizer)}


def _finished_shard(shard: Shard, config: PreprocessConfig, tokenizer: TextTokenizer, prefix: str) -> dict | None:
    """The record of a finished shard whose identity and files' hashes match, else None (build it again)."""
    record_path = Path(f"{prefix}.json")
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if record.get("identity") != json.loads(json.dumps(_shard_identity(shard, config, tokenizer))):
        return None
    for suffix in ("bin", "idx"):
        path = Path(f"{prefix}.{suffix}")
        if not path.is_file() or indexed.sha256_file(path) != record.get(f"{suffix}_sha256"):
            return None
    return record


def _worker(shard: Shard, config: PreprocessConfig, prefix: str, queue) -> dict:
    """A worker process's task: one shard, progress to ``queue``. One tokenizer thread per worker: the
    processes are the parallelism (the Rust pool would oversubscribe the cores)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return build_shard(shard, config, prefix, lambda *delta: queue.put(delta))


@contextlib.contextmanager
def _exclusive(lock_path: Path, output_prefix: Path) -> Iterator[None]:
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another hyperp-preprocess is writing {output_prefix} (lock {lock_path}): wait for it "
                             "or choose another --output-prefix") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_shards(pending: list[Shard], config: PreprocessConfig, prefixes: dict, progress: Progress) -> dict:
    """Build ``pending`` shards, in this process (``workers`` 1) or a pool of spawned processes."""
    if config.workers == 1 or not pending:
        return {shard.index: build_shard(shard, config, prefixes[shard.index], progress.update) for shard in pending}
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold tokenizer threads
    results = {}
    with context.Manager() as manager, context.Pool(min(config.workers, len(pending))) as pool:
        queue = manager.Queue()
        try:
            running = {shard.index: pool.apply_async(_worker, (shard, config, prefixes[shard.index], queue))
                       for shard in pending}
            while running:
                time.sleep(0.1)
                while not queue.empty():
                    progress.update(*queue.get())
                for index in [index for index, job in running.items() if job.ready()]:
                    results[index] = running.pop(index).get()  # a worker's error is raised here
            while not queue.empty():
                progress.update(*queue.get())
        except BaseException:
            pool.terminate()  # an error (--strict) or Ctrl-C: stop the other shards now
            raise
    return results


def _examples(plan: list[Shard], records: dict) -> list[str]:
    """``file:line: reason`` of the skipped records each shard kept, lines counted from the file's start."""
    examples, lines_before = [], {}
    for shard in plan:
        result = records[shard.index]["result"]
        offset = lines_before.get(shard.path, 0) if shard.kind in ("jsonl", "text") else 0
        examples += [f"{shard.where(offset + line)}: {reason}" for line, reason in result["examples"]]
        lines_before[shard.path] = offset + result["lines"]
    return examples


def _up_to_date(output: Path, identity: dict) -> dict | None:
    """The output's sidecar if the output was made from this plan and its files are intact."""
    try:
        data = metadata.read_metadata(output)
    except ValueError:
        return None
    if data is None or data.get("identity") != identity:
        return None
    for suffix in ("bin", "idx"):
        path = Path(f"{output}.{suffix}")
        if not path.is_file() or indexed.sha256_file(path) != data.get(f"{suffix}_sha256"):
            return None
    return data


def _open_shard_dir(shard_dir: Path, identity: dict) -> None:
    """Create (or take back) ``<prefix>.shards/``: refuse a directory that is not ours, drop partial files."""
    if shard_dir.exists() and not (shard_dir / "plan.json").is_file() and any(shard_dir.iterdir()):
        raise ValueError(f"{shard_dir} exists and was not written by hyperp-preprocess: move it away")
    shard_dir.mkdir(exist_ok=True)
    metadata.write_json_atomic(shard_dir / "plan.json", identity)
    for stale in shard_dir.glob("*.tmp-*"):  # an interrupted run's partial files
        stale.unlink()


def _remove_shard_dir(shard_dir: Path) -> None:
    """Remove the shards (this plan's and an earlier plan's: the directory is ours), then the directory."""
    for path in shard_dir.iterdir():
        if path.name == "plan.json" or (path.name[:5].isdigit() and path.suffix in (".bin", ".idx", ".json")):
            path.unlink()
    with contextlib.suppress(OSError):
        shard_dir.rmdir()


def _merge(plan: list[Shard], records: dict, prefixes: dict, output: Path, sidecar: dict) -> dict:
    """Shards -> ``output`` (``.bin``, ``.idx``, then the sidecar, each renamed into place); the sidecar."""
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    info, bin_sha256 = indexed.merge_indexed([prefixes[shard.index] for shard in plan], temporary)
    metadata.metadata_path(output).unlink(missing_ok=True)  # (--overwrite) never a sidecar of other files
    indexed.replace_prefix(temporary, output)
    skipped = Counter()
    for record in records.values():
        skipped.update(record["result"]["skipped"])
    sidecar = {**sidecar, "dtype": info.dtype.name, "documents": info.num_documents, "tokens": info.num_tokens,
               "skipped": dict(sorted(skipped.items())), "input_bytes": sum(shard.size_bytes for shard in plan),
               "inputs": sorted({shard.path for shard in plan}), "bin_sha256": bin_sha256,
               "idx_sha256": indexed.sha256_file(f"{output}.idx")}
    metadata.write_json_atomic(metadata.metadata_path(output), sidecar)
    return sidecar


def run_preprocess(config: PreprocessConfig, progress_stream=None, progress_interval: float = 1.0) -> Summary:
    """Tokenize ``config.inputs`` into ``<output_prefix>.bin/.idx`` + ``.meta.json`` (see the module doc).
    ``progress_stream``: where the progress line goes (None: nowhere)."""
    start = time.monotonic()
    tokenizer = load_tokenizer(config.tokenizer)  # bad tokenizer / inputs: one line, before any work
    if config.prepend_bos and tokenizer.bos is None:
        raise ValueError(f"--prepend-bos: tokenizer {config.tokenizer} names no bos_token in tokenizer_config.json")
    plan = plan_shards(expand_inputs(config.inputs, config.patterns), config.text_key, config.shard_bytes,
                       config.hf_split)
    output = Path(config.output_prefix)
    output.parent.mkdir(parents=True, exist_ok=True)
    identity = json.loads(json.dumps({"settings": _settings(config, tokenizer),
                                      "shards": [shard.identity() for shard in plan]}))
    shard_dir = Path(f"{output}.shards")
    with _exclusive(output.parent / f".{output.name}.lock", output):
        existing = _up_to_date(output, identity)
        if existing is not None:
            return Summary(str(output), existing["documents"], existing["tokens"], existing["skipped"], [],
                           len(plan), len(plan), existing["input_bytes"], time.monotonic() - start, up_to_date=True)
        present = [str(p) for p in (Path(f"{output}.bin"), Path(f"{output}.idx"), metadata.metadata_path(output))
                   if p.exists()]
        if present and not config.overwrite:
            raise ValueError(f"{present[0]} exists (from other inputs or settings): pass --overwrite to replace it "
                             "or choose another --output-prefix")
        _open_shard_dir(shard_dir, identity)
        prefixes = {shard.index: str(shard_dir / f"{shard.index:05d}") for shard in plan}
        records = {}
        for shard in plan:
            record = _finished_shard(shard, config, tokenizer, prefixes[shard.index])
            if record is not None:
                records[shard.index] = record
        reused = len(records)
        progress = Progress(progress_stream, sum(shard.size_bytes for shard in plan),
                            sum(shard.size_bytes for shard in plan if shard.index in records), progress_interval)
        records.update(_run_shards([shard for shard in plan if shard.index not in records], config, prefixes,
                                   progress))
        progress.close()
        sidecar = _merge(plan, records, prefixes, output, {
            "format": metadata.FORMAT, "identity": identity,
            "tokenizer": {**tokenizer.identity(), "path": str(config.tokenizer)},
            "policy": {"append_eos": config.append_eos, "prepend_bos": config.prepend_bos}})
        if not config.keep_shards:
            _remove_shard_dir(shard_dir)
    return Summary(str(output), sidecar["documents"], sidecar["tokens"], sidecar["skipped"], _examples(plan, records),
                   len(plan), reused, sidecar["input_bytes"], time.monotonic() - start)
