"""The data pipeline: tokenizer, .bin/.idx round trip, GPTDataset samples, resumable DP iteration."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import pytest
import torch
from _dist import run_distributed
from megatron.core.datasets.indexed_dataset import IndexedDataset

from hyperp_megatron.data import corpus, datasets, documents, preprocess, tokenizer

SEQ_LENGTH = 32
VOCAB_SIZE = 512
UNICODE_TEXT = "Café déjà vu — naïve coöperation ✓ 🎭\r\n\tTabs,  double  spaces . and ,odd ' x\n\n" * 3


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Four Shakespeare works, a Unicode text and a JSONL file."""
    root = tmp_path_factory.mktemp("corpus")
    for source in corpus.shakespeare_text_files()[:4]:
        (root / source.name.replace("_gut", "")).write_text(source.read_text())
    (root / "unicode.txt").write_text(UNICODE_TEXT, encoding="utf-8")
    records = [{"text": f"Record {i}: {'to be or not to be ' * (i + 1)}", "id": i} for i in range(20)]
    (root / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(corpus_dir, tmp_path_factory) -> Path:
    files = documents.collect_input_files([corpus_dir])
    return tokenizer.train_bpe_tokenizer(documents.iter_documents(files), tmp_path_factory.mktemp("tok") / "bpe",
                                         VOCAB_SIZE)


@pytest.fixture(scope="module")
def dataset_prefix(corpus_dir, tokenizer_dir, tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("bin") / "corpus_text_document"
    preprocess.preprocess_to_indexed_dataset([corpus_dir], tokenizer_dir, prefix, chars_per_document=500)
    return prefix


@pytest.fixture(scope="module")
def splits(dataset_prefix, tokenizer_dir, tmp_path_factory) -> datasets.DatasetSplits:
    return datasets.build_datasets(
        [dataset_prefix],
        tokenizer.load_tokenizer(tokenizer_dir),
        seq_length=SEQ_LENGTH,
        seed=1234,
        num_samples=[96, 16, 8],
        cache_dir=tmp_path_factory.mktemp("cache"),
        split="949,50,1",
    )


def test_split_into_documents_is_lossless():
    text = "".join(f"Para {i}.\nline two\n\n  \n" for i in range(200))
    pieces = documents.split_into_documents(text, chars_per_document=100)
    assert "".join(pieces) == text
    assert len(pieces) > 20
    assert all(doc.strip() for doc in pieces)
    assert documents.split_into_documents(text, 0) == [text]
    assert documents.split_into_documents(" \n\n ", 10) == []


def test_tokenizer_training_is_deterministic(corpus_dir, tokenizer_dir, tmp_path):
    files = documents.collect_input_files([corpus_dir])
    again = tokenizer.train_bpe_tokenizer(documents.iter_documents(files), tmp_path / "again", VOCAB_SIZE)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    assert tokenizer.load_tokenizer(again).vocab_size == VOCAB_SIZE
    with pytest.raises(ValueError, match="already exists"):
        tokenizer.train_bpe_tokenizer(["abc"], again, VOCAB_SIZE)


def test_tokenizer_loads_offline_with_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ours = tokenizer.load_tokenizer(tokenizer_dir)
    assert hf.eos_token == tokenizer.EOD_TOKEN and hf.eos_token_id == ours.eod
    assert len(hf) == ours.vocab_size
    ids = ours.tokenize(UNICODE_TEXT)
    assert hf.encode(UNICODE_TEXT, add_special_tokens=False) == ids
    assert hf.decode(ids) == UNICODE_TEXT == ours.detokenize(ids)


def test_text_to_bin_idx_round_trip(corpus_dir, tokenizer_dir, dataset_prefix):
    tok = tokenizer.load_tokenizer(tokenizer_dir)
    indexed = IndexedDataset(str(dataset_prefix))
    docs = [indexed[i] for i in range(len(indexed))]
    assert all(doc[-1] == tok.eod and tok.eod not in doc[:-1] for doc in docs)
    decoded = [tok.detokenize(doc[:-1]) for doc in docs]
    expected = list(documents.iter_documents(documents.collect_input_files([corpus_dir]), chars_per_document=500))
    assert decoded == expected
    # Plain text comes back byte for byte, Unicode included; JSONL records come back whole.
    assert "".join(decoded).count(UNICODE_TEXT) == 1
    for path in sorted(corpus_dir.glob("*.txt")):
        assert path.read_bytes().decode("utf-8") in "".join(decoded)
    assert "Record 19: " + "to be or not to be " * 20 in decoded


def test_gpt_dataset_samples_are_shifted_by_one(splits, tokenizer_dir):
    assert len(splits.train) >= 96 and len(splits.valid) >= 16 and len(splits.test) >= 8
    for index in range(8):
        raw, _ = splits.train._query_document_sample_shuffle_indices(index)
        sample = splits.train[index]
        assert raw.shape == (SEQ_LENGTH + 1,)
        assert torch.equal(sample["tokens"], torch.from_numpy(raw[:-1]))
        assert torch.equal(sample["labels"], torch.from_numpy(raw[1:]))
        assert torch.equal(sample["position_ids"], torch.arange(SEQ_LENGTH))
        assert sample["loss_mask"].sum() == SEQ_LENGTH
    iterator = datasets.build_data_iterator(splits.train, consumed_samples=0, micro_batch_size=4, dp_rank=0, dp_size=1)
    batch = datasets.get_batch(iterator, torch.device("cpu"))
    assert batch["tokens"].shape == batch["labels"].shape == (4, SEQ_LENGTH)
    assert batch["attention_mask"] is None
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])


def _collect(dataset, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> list[torch.Tensor]:
    iterator = datasets.build_data_iterator(
        dataset, consumed_samples=consumed, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size
    )
    return [batch["tokens"] for batch in iterator]


@pytest.mark.parametrize("dp_size", [1, 2])
def test_resume_yields_the_uninterrupted_batches(splits, dp_size):
    micro_batch_size, steps_done = 2, 5
    consumed = steps_done * micro_batch_size * dp_size
    for dp_rank in range(dp_size):
        full = _collect(splits.train, 0, micro_batch_size, dp_rank, dp_size)
        resumed = _collect(splits.train, consumed, micro_batch_size, dp_rank, dp_size)
        assert len(resumed) == len(full) - steps_done > 0
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[steps_done:]))


def test_dp_ranks_get_disjoint_slices_of_each_step():
    per_rank = [list(datasets.PretrainingSampler(100, 8, 3, rank, 2)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == (100 - 8) // 6
    flat = [set(i for batch in batches for i in batch) for batches in per_rank]
    assert not flat[0] & flat[1]
    assert flat[0] | flat[1] == set(range(8, 8 + 6 * len(per_rank[0])))
    assert per_rank[0][0] == [8, 9, 10] and per_rank[1][0] == [11, 12, 13]
    with pytest.raises(ValueError, match="dp_rank"):
        datasets.PretrainingSampler(100, 0, 2, 2, 2)
    with pytest.raises(ValueError, match="consumed_samples"):
        datasets.PretrainingSampler(100, 101, 2, 0, 1)


def _two_rank_blend(rank: int, world_size: int, prefixes: list[str], tokenizer_dir: str, cache_dir: str) -> dict:
    """On each gloo rank: build a 2-prefix blend (collective), read this DP rank's micro-batches."""
    splits = datasets.build_datasets(
        prefixes, tokenizer.load_tokenizer(tokenizer_dir), seq_length=SEQ_LENGTH, seed=7,
        num_samples=[40, 8, 4], cache_dir=cache_dir, split="90,8,2", weights=[0.7, 0.3],
    )
    iterator = datasets.build_data_iterator(
        splits.train, consumed_samples=0, micro_batch_size=2, dp_rank=rank, dp_size=world_size
    )
    return {"tokens": [batch["tokens"] for batch in iterator]}


def test_two_dp_ranks_read_disjoint_samples_of_one_blend(corpus_dir, tokenizer_dir, dataset_prefix, tmp_path):
    second = tmp_path / "records_text_document"
    comedy = corpus_dir / "comedy_of_errors.txt"
    preprocess.preprocess_to_indexed_dataset([comedy], tokenizer_dir, second, chars_per_document=300)
    prefixes = [str(dataset_prefix), str(second)]
    results = run_distributed(_two_rank_blend, 2, prefixes, str(tokenizer_dir), str(tmp_path / "cache"), timeout=240)
    per_rank = [torch.cat(result["tokens"]) for result in results]
    assert per_rank[0].shape == per_rank[1].shape and per_rank[0].shape[0] >= 20
    rows = [{tuple(row.tolist()) for row in tokens} for tokens in per_rank]
    assert not rows[0] & rows[1]
    # Together the two ranks read exactly the samples of a single-rank reader, interleaved per step.
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        reference = torch.cat(_two_rank_blend(0, 1, prefixes, str(tokenizer_dir), str(tmp_path / "cache"))["tokens"])
    finally:
        torch.distributed.destroy_process_group()
    interleaved = torch.stack([per_rank[0].view(-1, 2, SEQ_LENGTH), per_rank[1].view(-1, 2, SEQ_LENGTH)], 1)
    assert torch.equal(interleaved.reshape(-1, SEQ_LENGTH), reference[: interleaved.shape[0] * 4])


def test_clear_errors_for_missing_paths(corpus_dir, tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        preprocess.preprocess_to_indexed_dataset([tmp_path / "nope.txt"], tokenizer_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="tokenizer directory .* does not exist"):
        preprocess.preprocess_to_indexed_dataset([corpus_dir], tmp_path / "no_tokenizer", tmp_path / "out")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        tokenizer.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        datasets.build_datasets([tmp_path / "nothing"], tokenizer.load_tokenizer(tokenizer_dir), seq_length=8, seed=0,
                            num_samples=[1, 1, 1], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no key 'content'"):
        preprocess.preprocess_to_indexed_dataset([corpus_dir / "records.jsonl"], tokenizer_dir, tmp_path / "o", "content")
    tiny = tmp_path / "tiny"
    preprocess.preprocess_to_indexed_dataset([corpus_dir / "unicode.txt"], tokenizer_dir, tiny, chars_per_document=0)
    with pytest.raises(ValueError, match="0 of the 1 documents"):
        datasets.build_datasets([tiny], tokenizer.load_tokenizer(tokenizer_dir), seq_length=8, seed=0,
                            num_samples=[1, 1, 1], cache_dir=tmp_path)
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file may be left behind"


def test_preprocess_cli_reports_errors_without_traceback(tmp_path, capsys):
    import importlib.util

    script = Path(__file__).parents[1] / "tools" / "preprocess_data.py"
    spec = importlib.util.spec_from_file_location("preprocess_data", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit, match="error: tokenizer directory"):
        cli.main(["--input", str(tmp_path), "--tokenizer", str(tmp_path / "t"), "--output-prefix", str(tmp_path / "o")])


def test_embedded_corpus_is_idempotent_and_deterministic(tmp_path):
    built = corpus.prepare_embedded_corpus(tmp_path / "a", vocab_size=VOCAB_SIZE)
    manifest = built.data_prefix.parent / "manifest.json"
    stamp = {path: path.stat().st_mtime_ns for path in built.data_prefix.parent.rglob("*")}
    assert corpus.prepare_embedded_corpus(tmp_path / "a", vocab_size=VOCAB_SIZE) == built
    assert stamp == {path: path.stat().st_mtime_ns for path in built.data_prefix.parent.rglob("*")}
    assert built.num_documents > 2000 and built.num_tokens > 1_000_000
    assert tokenizer.load_tokenizer(built.tokenizer_dir).vocab_size == VOCAB_SIZE
    assert datasets.check_split_documents(str(built.data_prefix), "969,30,1")[2] >= 1
    # A damaged file is detected and rebuilt; a second root gets the same bytes.
    built.data_prefix.with_suffix(".bin").write_bytes(b"")
    assert corpus.load_embedded_corpus(tmp_path / "a", VOCAB_SIZE) is None
    rebuilt = corpus.prepare_embedded_corpus(tmp_path / "a", vocab_size=VOCAB_SIZE)
    assert rebuilt == built
    other = corpus.prepare_embedded_corpus(tmp_path / "b", vocab_size=VOCAB_SIZE)
    assert (other.data_prefix.parent / "manifest.json").read_bytes() == manifest.read_bytes()
