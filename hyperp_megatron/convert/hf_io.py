"""Hugging Face directory I/O: atomic output directories, sharded safetensors with an index, reading
tensors lazily, tokenizer files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@contextlib.contextmanager
def staged_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling directory that becomes ``final`` only when the block completes; removed on any
    error, so ``final`` is never half-written."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise ValueError(f"output {final} already exists: remove it or choose another directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


class ShardWriter:
    """Writes tensors into ``model-0000k-of-0000n.safetensors`` files of at most ``max_shard_bytes`` each
    (a larger single tensor gets its own shard) plus ``model.safetensors.index.json``. Holds at most one
    shard in memory."""

    def __init__(self, directory: Path, dtype: torch.dtype, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.directory, self.dtype, self.max_shard_bytes = Path(directory), dtype, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name in self.pending or any(name in shard for shard in self.shards):
                raise AssertionError(f"tensor {name} written twice")
            value = tensor.detach().to(self.dtype).contiguous()
            size = value.numel() * value.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self.pending[name] = value
            self.pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self.directory / f"shard-{len(self.shards):05d}.part"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> dict:
        """Name the shards, write the index; returns the index."""
        if self.pending:
            self._flush()
        total = len(self.shards)
        weight_map = {}
        umask = os.umask(0)
        os.umask(umask)
        for k, names in enumerate(self.shards):
            file_name = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.directory / f"shard-{k:05d}.part", self.directory / file_name)
            os.chmod(self.directory / file_name, 0o666 & ~umask)  # safetensors writes 0600 files
            weight_map.update({name: file_name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return index


class TensorReader:
    """Lazy access to the tensors of an HF directory (sharded with an index, or one ``model.safetensors``),
    each returned as fp32 and checked against the expected shape. A file is opened (memory-mapped) per read
    and closed again, so the mapped pages of tensors already converted do not stay in this process."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        index_file, single = self.directory / INDEX, self.directory / "model.safetensors"
        if index_file.is_file():
            self.weight_map = json.loads(index_file.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(str(single), framework="pt") as handle:
                self.weight_map = {name: single.name for name in handle.keys()}
        else:
            raise ValueError(f"{self.directory} has no safetensors weights ({INDEX} or model.safetensors)")
        missing = sorted(f for f in set(self.weight_map.values()) if not (self.directory / f).is_file())
        if missing:
            raise ValueError(f"{self.directory} is incomplete: missing weight file(s) {', '.join(missing)}")
        self.read_names: set[str] = set()

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        from safetensors import safe_open

        file_name = self.weight_map.get(name)
        if file_name is None:
            raise ValueError(f"tensor {name} is missing from the checkpoint")
        try:
            with safe_open(str(self.directory / file_name), framework="pt") as handle:
                tensor = handle.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"cannot read tensor {name} from {file_name}: {exc}") from None
        if shape and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"shape mismatch for {name}: the checkpoint has {tuple(tensor.shape)}, its config "
                             f"implies {tuple(shape)}")
        self.read_names.add(name)
        return tensor.float()

    def unread(self) -> list[str]:
        return sorted(set(self.weight_map) - self.read_names)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_files(directory: Path) -> list[Path]:
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def copy_tokenizer(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer files (ValueError when there is no ``tokenizer.json``: we need a fast tokenizer)."""
    if not (source / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer {source} has no tokenizer.json (a Hugging Face fast tokenizer is needed)")
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in tokenizer_files(source):
        shutil.copy2(path, destination / path.name)
        copied.append(path.name)
    return copied


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def special_token_ids(tokenizer_dir: Path) -> tuple[int | None, int | None, int]:
    """(bos id, eos id, vocabulary size incl. added tokens) of a tokenizer directory."""
    import tokenizers

    from hyperp_megatron.data.tokenizer import EOD_TOKEN

    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    config_file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    ids = []
    for key in ("bos_token", "eos_token"):
        # Without a configured token the trainer uses EOD_TOKEN as end of document (data.tokenizer.TextTokenizer).
        content = _token_content(config.get(key)) or (EOD_TOKEN if key == "eos_token" else None)
        ids.append(tokenizer.token_to_id(content) if content else None)
    return ids[0], ids[1], tokenizer.get_vocab_size(with_added_tokens=True)
