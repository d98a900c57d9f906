"""hyperp-preprocess: parallel output = --workers 1 = a single-pass build with Megatron's own builder; JSON lines,
gz, zst, Parquet, Hugging Face datasets and plain text; bad records counted with file and line; resume after an
interruption; the BOS/EOS policy and the tokenizer recorded and checked by the trainer."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from hyperp_megatron.data import corpus, datasets, documents, metadata, readers, tokenizer
from hyperp_megatron.data.pipeline import PreprocessConfig, run_preprocess

pytestmark = pytest.mark.tier("unit")

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 400
SHARD_BYTES = 1 << 16  # many shards from small files


def _records(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "Café", "naïve", "✓", "🎭", "\n", ",", "."]
    return [{"text": " ".join(rng.choice(words, size=int(rng.integers(3, 120)))) + f" #{i}", "id": i}
            for i in range(count)]


def _write_jsonl(path: Path, records: list) -> bytes:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(data)
    return data


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    text = corpus.shakespeare_text_files()[0].read_text()[:200_000]
    return tokenizer.train_bpe_tokenizer([text], tmp_path_factory.mktemp("tok") / "bpe", VOCAB_SIZE)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A directory of clean inputs: a multi-shard JSONL, its gz and zst copies, and a small plain text."""
    root = tmp_path_factory.mktemp("inputs")
    data = _write_jsonl(root / "a.jsonl", _records(1200))
    (root / "b.jsonl.gz").write_bytes(gzip.compress(_write_jsonl(root / "b_source.json", _records(300, 1))))
    (root / "b_source.json").unlink()
    import zstandard

    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data[:50_000].rsplit(b"\n", 1)[0] + b"\n"))
    (root / "d.txt").write_text(corpus.shakespeare_text_files()[1].read_text()[:40_000])
    return root


def _config(inputs, tok_dir, prefix, **extra) -> PreprocessConfig:
    return PreprocessConfig(inputs=[str(p) for p in inputs], tokenizer=str(tok_dir), output_prefix=str(prefix),
                            shard_bytes=extra.pop("shard_bytes", SHARD_BYTES), **extra)


def _files(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def _reference_documents(root: Path) -> list[str]:
    """The documents of ``inputs``, read independently of the pipeline (sorted file order, as a directory)."""
    import zstandard

    docs = [r["text"] for r in map(json.loads, (root / "a.jsonl").read_text().splitlines())]
    docs += [json.loads(line)["text"] for line in gzip.decompress((root / "b.jsonl.gz").read_bytes()).splitlines()]
    raw = zstandard.ZstdDecompressor().stream_reader((root / "c.jsonl.zst").read_bytes()).read()
    docs += [json.loads(line)["text"] for line in raw.splitlines()]
    text = (root / "d.txt").read_bytes().decode("utf-8")  # line endings as they are
    return docs + documents.split_into_documents(text, documents.DEFAULT_CHARS_PER_DOCUMENT)


@pytest.fixture(scope="module")
def single(inputs, tok_dir, tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("single") / "out"
    summary = run_preprocess(_config([inputs], tok_dir, prefix, workers=1, keep_shards=True))
    assert summary.shards >= 4 and summary.reused_shards == 0 and not summary.skipped
    return prefix


def test_parallel_output_is_byte_identical_to_one_worker(inputs, tok_dir, single, tmp_path):
    summary = run_preprocess(_config([inputs], tok_dir, tmp_path / "par", workers=2))
    assert _files(tmp_path / "par") == _files(single)
    assert summary.shards >= 4
    assert not (tmp_path / "par.shards").exists(), "the shards are removed after the merge (no --keep-shards)"


def test_merge_equals_a_single_pass_build_with_megatrons_builder(inputs, tok_dir, single, tmp_path):
    tok = tokenizer.load_tokenizer(tok_dir)
    reference = tmp_path / "megatron"
    builder = IndexedDatasetBuilder(f"{reference}.bin", dtype=DType.optimal_dtype(tok.vocab_size))
    for doc in _reference_documents(inputs):
        builder.add_item(torch.tensor(tok.tokenize(doc) + [tok.eod]))
        builder.end_document()
    builder.finalize(f"{reference}.idx")
    assert _files(single) == _files(reference)
    dataset = IndexedDataset(str(single))  # Megatron's own reader
    assert len(dataset) == len(_reference_documents(inputs)) and dataset[0][-1] == tok.eod
    meta = metadata.read_metadata(single)
    assert meta["documents"] == len(dataset) and meta["tokens"] == int(dataset.sequence_lengths.sum())
    assert meta["tokenizer"]["tokenizer_json_sha256"] == tok.tokenizer_json_sha256
    assert meta["policy"] == {"append_eos": True, "prepend_bos": False}


def test_parquet_and_hf_dataset_inputs_equal_jsonl(tok_dir, tmp_path):
    import datasets as hf_datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = _records(700, 3)
    _write_jsonl(tmp_path / "r.jsonl", records)
    table = pa.table({"text": [r["text"] for r in records], "id": [r["id"] for r in records]})
    pq.write_table(table, tmp_path / "r.parquet", row_group_size=64)
    hf_datasets.Dataset.from_dict(table.to_pydict()).save_to_disk(str(tmp_path / "hf"), max_shard_size="40KB")
    outputs = {}
    for name, source in (("jsonl", "r.jsonl"), ("parquet", "r.parquet"), ("hf", "hf")):
        summary = run_preprocess(_config([tmp_path / source], tok_dir, tmp_path / f"out_{name}", workers=2,
                                         shard_bytes=16_000))
        assert summary.shards > 2, (name, summary)
        outputs[name] = _files(tmp_path / f"out_{name}")
    assert outputs["parquet"] == outputs["jsonl"] == outputs["hf"]
    # A null value is a record without text; a missing column is refused before any work.
    pq.write_table(pa.table({"text": ["one", None, "  ", "four"]}), tmp_path / "nulls.parquet")
    summary = run_preprocess(_config([tmp_path / "nulls.parquet"], tok_dir, tmp_path / "nulls"))
    assert summary.documents == 2 and summary.skipped == {"empty": 1, "missing_key": 1}
    assert summary.examples == [f"{tmp_path / 'nulls.parquet'}: row 2: missing_key",
                                f"{tmp_path / 'nulls.parquet'}: row 3: empty"]
    with pytest.raises(ValueError, match="has no column 'content'"):
        run_preprocess(_config([tmp_path / "r.parquet"], tok_dir, tmp_path / "x", text_key="content"))


def test_bad_records_are_counted_with_file_and_line(tok_dir, tmp_path):
    lines = [json.dumps(r).encode() for r in _records(3000, 5)]
    lines[1] = b'{"content": "no text key"}'
    lines[2] = b"not json"
    lines[3] = b'{"text": "   "}'
    lines[4] = b'{"text": 7}'
    lines[2900] = '{"text": "caf\u00e9"}'.encode("latin-1")  # not UTF-8, in a later shard
    lines[2950] = b'{"text": "' + b"x" * 5000 + b'"}'  # longer than max_record_bytes
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    config = _config([path], tok_dir, tmp_path / "out", workers=2, shard_bytes=40_000, max_record_bytes=4096)
    summary = run_preprocess(config)
    assert summary.shards > 3
    assert summary.skipped == {"empty": 1, "invalid_json": 1, "invalid_utf8": 1, "missing_key": 1,
                               "not_a_string": 1, "too_long": 1}
    assert summary.documents == 3000 - 6
    assert summary.examples == [f"{path}:2: missing_key", f"{path}:3: invalid_json", f"{path}:4: empty",
                                f"{path}:5: not_a_string", f"{path}:2901: invalid_utf8", f"{path}:2951: too_long"]
    assert metadata.read_metadata(tmp_path / "out")["skipped"] == summary.skipped
    strict = _config([path], tok_dir, tmp_path / "strict", shard_bytes=40_000, strict=True, overwrite=True)
    with pytest.raises(ValueError, match=rf"^{path}:2: missing key record \(--strict"):
        run_preprocess(strict)
    del lines[1:5]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=rf"^{path}:2897: invalid utf8 record"):  # counted in a later shard
        run_preprocess(strict)
    # A truncated .gz: the records before the damage are kept, the damage is one skipped record.
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in _records(400, 6)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    summary = run_preprocess(_config([tmp_path / "cut.jsonl.gz"], tok_dir, tmp_path / "cut"))
    assert summary.skipped == {"corrupt_file": 1} and 0 < summary.documents < 400


def test_cli_one_line_error_for_non_utf8_and_strict(tok_dir, tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    command = [sys.executable, "-m", "hyperp_megatron.data", "--input", str(tmp_path / "latin1.jsonl"),
               "--tokenizer", str(tok_dir), "--output-prefix", str(tmp_path / "o"), "--workers", "1", "--strict"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'latin1.jsonl'}:2: invalid utf8 record (--strict; without it bad records are "
        "counted and skipped)"], proc.stderr
    proc = subprocess.run(command[:-1], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped {tmp_path / 'latin1.jsonl'}:2: invalid_utf8" in proc.stderr
    assert "1 documents" in proc.stdout and "invalid_utf8 1" in proc.stdout
    # The library reader that tokenizer training uses names the file and line too (issue 21).
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        list(documents.iter_documents([tmp_path / "latin1.jsonl"]))


def test_resume_skips_verified_shards_and_equals_uninterrupted(inputs, tok_dir, single, tmp_path):
    prefix = tmp_path / "resumed"
    run_preprocess(_config([inputs], tok_dir, prefix, keep_shards=True))
    shard_dir = Path(f"{prefix}.shards")
    shards = sorted(shard_dir.glob("*.json"))
    shards = [p for p in shards if p.name != "plan.json"]
    # An interruption: no merged output, one shard's .json missing (killed before it was written), one .bin
    # damaged after its .json, a worker's partial file left behind.
    for suffix in (".bin", ".idx", ".meta.json"):
        Path(f"{prefix}{suffix}").unlink()
    shards[1].unlink()
    damaged = shards[3].with_suffix(".bin")
    damaged.write_bytes(damaged.read_bytes()[:-2])
    (shard_dir / "00002.tmp-99999.bin").write_bytes(b"partial")
    stamp = shards[0].with_suffix(".bin").stat().st_mtime_ns
    summary = run_preprocess(_config([inputs], tok_dir, prefix, workers=2, keep_shards=True))
    assert summary.reused_shards == summary.shards - 2
    assert shards[0].with_suffix(".bin").stat().st_mtime_ns == stamp  # verified and kept, not rebuilt
    assert _files(prefix) == _files(single)
    assert not list(shard_dir.glob("*.tmp-*"))
    # Done: the same command again does nothing; other settings refuse to replace the output.
    again = run_preprocess(_config([inputs], tok_dir, prefix))
    assert again.up_to_date and again.documents == summary.documents
    with pytest.raises(ValueError, match="exists .* pass --overwrite"):
        run_preprocess(_config([inputs], tok_dir, prefix, prepend_bos=True))


def test_killed_run_resumes_to_the_same_bytes(tok_dir, tmp_path):
    _write_jsonl(tmp_path / "big.jsonl", _records(20000, 9))
    command = [sys.executable, "-m", "hyperp_megatron.data", "--input", str(tmp_path / "big.jsonl"),
               "--tokenizer", str(tok_dir), "--workers", "1", "--shard-mib", "0.0625", "--no-progress"]
    reference = subprocess.run(command + ["--output-prefix", str(tmp_path / "ref")], cwd=REPO, capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    proc = subprocess.Popen(command + ["--output-prefix", str(tmp_path / "run")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("run.shards/0*.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(tmp_path.glob("run.shards/0*.json")))
    assert 3 <= finished and not (tmp_path / "run.bin").exists(), "killed before the merge"
    resumed = subprocess.run(command + ["--output-prefix", str(tmp_path / "run")], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({finished} resumed)" in resumed.stdout
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")


def test_bos_eos_policy_is_applied_and_recorded(tok_dir, tmp_path):
    tok = tokenizer.load_tokenizer(tok_dir)
    _write_jsonl(tmp_path / "r.jsonl", _records(50))
    run_preprocess(_config([tmp_path / "r.jsonl"], tok_dir, tmp_path / "bos", prepend_bos=True, append_eos=False))
    dataset = IndexedDataset(str(tmp_path / "bos"))
    assert tok.bos is not None
    assert all(dataset[i][0] == tok.bos and dataset[i][-1] != tok.eod for i in range(len(dataset)))
    assert metadata.read_metadata(tmp_path / "bos")["policy"] == {"append_eos": False, "prepend_bos": True}
    with pytest.raises(ValueError, match="neither --append-eos nor --prepend-bos"):
        _config([tmp_path], tok_dir, tmp_path / "x", append_eos=False)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    no_bos = tmp_path / "no_bos"
    no_bos.mkdir()
    (no_bos / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (no_bos / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "bos_token"}))
    with pytest.raises(ValueError, match="names no bos_token"):
        run_preprocess(_config([tmp_path / "r.jsonl"], no_bos, tmp_path / "y", prepend_bos=True))


def test_long_documents_are_tokenized_in_pieces_to_the_same_ids(tok_dir):
    tok = tokenizer.load_tokenizer(tok_dir)
    text = corpus.shakespeare_text_files()[2].read_text()[:300_000]
    pieces = readers.cut_long_text(text, 10_000)
    assert len(text) > 100_000 and len(pieces) > 10 and "".join(pieces) == text and max(map(len, pieces)) <= 10_000
    assert [i for piece in pieces for i in tok.tokenize(piece)] == tok.tokenize(text)


def test_streamed_paragraph_split_equals_the_whole_text_split():
    rng = np.random.default_rng(0)
    atoms = ["word ", "x", "\n", "\n\n", " \n", "\t\n \n", "\r\n", "\r\n\r\n", "  ", "abc. ", "\n  \n\n  "]
    for _ in range(500):
        text = "".join(rng.choice(atoms, size=int(rng.integers(0, 200))))
        chars = int(rng.choice([0, 1, 5, 20, 50]))
        splitter = readers.ParagraphSplitter(chars, 1 << 30)
        streamed = [doc for line in text.splitlines(keepends=True) for doc in splitter.feed(line)] + splitter.close()
        assert streamed == documents.split_into_documents(text, chars), (text, chars)


def test_trainer_refuses_data_from_another_tokenizer(inputs, tok_dir, single, tmp_path):
    from hyperp_megatron.config import ConfigError, load_config
    from hyperp_megatron.train import _check_before_model

    other_dir = tokenizer.train_bpe_tokenizer(["some other text " * 50, "and more words"], tmp_path / "other", 300)
    other = tokenizer.load_tokenizer(other_dir)
    with pytest.raises(ValueError, match=r"was tokenized with another tokenizer .*vocab_size 400 vs 271, tokenizer_json_sha256 "):
        datasets.build_datasets([single], other, seq_length=8, seed=0, num_samples=[1, 1, 1], cache_dir=tmp_path)
    cfg = load_config(None, {"data": {"prefixes": [str(single)], "tokenizer": str(other_dir)}})
    with pytest.raises(ConfigError) as error:
        _check_before_model(cfg, None, other, [str(single)])
    assert str(error.value).startswith("data.tokenizer: ") and "\n" not in str(error.value)
    # The matching tokenizer passes the check.
    assert metadata.check_tokenizer_matches(single, tokenizer.load_tokenizer(tok_dir))["documents"] > 0
