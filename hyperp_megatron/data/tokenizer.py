"""The tokenizer: a deterministic byte-level BPE (``tokenizers``) saved as a Hugging Face tokenizer directory
(``tokenizer.json`` + ``tokenizer_config.json``) with ``<|endoftext|>`` as end of document, and
``TextTokenizer``, the interface Megatron's ``GPTDataset`` and the trainer use."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

EOD_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192


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
        eod_token = _configured_token(self.path, "eos_token") or EOD_TOKEN
        eod = self._tokenizer.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"tokenizer {self.path} has no end-of-document token {eod_token!r}")
        self.eod = eod
        bos_token = _configured_token(self.path, "bos_token")
        self.bos: int | None = None if bos_token is None else self._tokenizer.token_to_id(bos_token)
        """Beginning-of-sequence id (``bos_token`` of tokenizer_config.json), None when there is none."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included); the model pads its vocab on top."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def tokenizer_json_sha256(self) -> str:
        return self._sha256

    def identity(self) -> dict:
        """What a preprocessed dataset records of its tokenizer (``metadata.py``): content, not path."""
        return {"vocab_size": self.vocab_size, "tokenizer_json_sha256": self._sha256, "eod": self.eod,
                "bos": self.bos}

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


def _configured_token(tokenizer_dir: Path, name: str) -> str | None:
    """``name`` (``eos_token``, ``bos_token``) of ``tokenizer_config.json`` (a string or an AddedToken dict)."""
    config_file = tokenizer_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    token = json.loads(config_file.read_text(encoding="utf-8")).get(name)
    return token.get("content") if isinstance(token, dict) else token


def load_tokenizer(tokenizer_dir: str | Path) -> TextTokenizer:
    """Load a local Hugging Face tokenizer directory (never touches the hub)."""
    return TextTokenizer(tokenizer_dir)
