"""Training data for the loop: train/valid/test ``GPTDataset`` splits (``BlendedMegatronDatasetBuilder``) and
micro-batches for one data-parallel rank, resumable from ``consumed_samples`` (``PretrainingSampler``, as
Megatron's ``MegatronPretrainingSampler``)."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

from hyperp_megatron.data.metadata import check_tokenizer_matches
from hyperp_megatron.data.tokenizer import TextTokenizer

SPLIT_NAMES = ("train", "valid", "test")


class DatasetSplits(NamedTuple):
    """One dataset (or None when its split weight is 0 or it is not built on this rank) per split."""

    train: torch.utils.data.Dataset | None
    valid: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset | None


def _check_prefix(prefix: str) -> None:
    missing = [f"{prefix}{suffix}" for suffix in (".bin", ".idx") if not os.path.isfile(f"{prefix}{suffix}")]
    if missing:
        raise ValueError(f"dataset prefix {prefix!r} is incomplete, missing {missing}: run hyperp-preprocess")


def check_data_files(prefix: str) -> int:
    """The number of documents of ``prefix``, after checking that its ``.idx`` reads and that its ``.bin`` has
    exactly the bytes the index points to (a ``.bin`` from another preprocessing run, or a truncated copy, would
    otherwise be read as garbage or fail deep in the data loader); ValueError (one line)."""
    _check_prefix(prefix)
    with open(f"{prefix}.idx", "rb") as stream:
        header = stream.read(len(_INDEX_HEADER))
    if header != _INDEX_HEADER:  # (checked here: a half-built IndexedDataset complains again in __del__)
        raise ValueError(f"{prefix}.idx is not a readable index (bad header, not a Megatron .idx file): "
                         "preprocess the data again")
    try:
        dataset = IndexedDataset(prefix)
    except (AssertionError, ValueError, struct.error, IndexError, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{prefix}.idx is not a readable index ({detail}): preprocess the data again") from None
    index = dataset.index
    lengths, pointers = index.sequence_lengths, index.sequence_pointers
    expected = int(pointers[-1]) + int(lengths[-1]) * index.dtype_size if len(lengths) else 0
    actual = os.path.getsize(f"{prefix}.bin")
    if actual != expected:
        raise ValueError(f"{prefix}.bin has {actual} bytes but {prefix}.idx describes {expected} "
                         f"({len(lengths)} sequences of {index.dtype.__name__}): the two files come from different "
                         "preprocessing runs or one is truncated; preprocess the data again")
    return int(index.document_count) - 1 if index.document_count else 0


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

    A prefix with a ``hyperp-preprocess`` sidecar (``<prefix>.meta.json``) must have been tokenized with
    ``tokenizer`` (``metadata.check_tokenizer_matches``). Every split draws from all prefixes, each divided by
    ``split``; ``weights`` (default: in
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
        check_tokenizer_matches(prefix, tokenizer)
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
