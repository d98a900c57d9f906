"""Preprocessing throughput (tokens/s, MB/s) against ``--workers``, with the single-process baselines in the same run.

Usage (from the repository root)::

    python bench/preprocess_bench.py                          # 100 MB corpus, workers 1 2 4, + the old path
    python bench/preprocess_bench.py --mb 300 --workers 1 2 4 8 16 --no-legacy

A corpus of ``--mb`` MB of JSON lines is generated (documents of 200-8000 characters drawn from Shakespeare's
lines, seeded) and tokenized with the embedded corpus's BPE (8192 tokens, ``data/shakespeare-bpe8192``, built
if missing) by ``hyperp-preprocess`` as a subprocess per setting, one after the other:

- ``workers=1``: one process, one tokenizer thread (``TOKENIZERS_PARALLELISM=false``): the unit the workers scale;
- ``workers=1, TOKENIZERS_PARALLELISM=true``: one process with the Rust tokenizer's own thread pool (what
  ``--workers 1`` does by default; the spawned workers of ``--workers N`` always run one thread each);
- ``workers=N``: N spawned worker processes (one tokenizer thread each) plus the merge;
- ``legacy``: the previous single-process ``preprocess.preprocess_to_indexed_dataset`` (Rust thread pool on;
  unless ``--no-legacy``).

``--repeats R`` runs all settings R times, interleaved (round after round, so a change of the machine's load
hits every setting), and reports the median time of each.

Every output's ``.bin`` sha256 must agree (the parallel output is byte-identical). The machine's load during the
runs is recorded: on the shared 2-core development machine, speedups above ~2 cannot show.
Writes ``bench/results/preprocess.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, LoadSampler, provenance


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """JSON lines of ``megabytes`` MB: documents of Shakespeare lines in random order; returns the bytes."""
    from hyperp_megatron.data.corpus import shakespeare_text_files

    lines = [line.strip() for source in shakespeare_text_files() for line in source.read_text().splitlines()
             if line.strip()]
    rng = np.random.default_rng(seed)
    target, written = int(megabytes * 1e6), 0
    with path.open("w", encoding="utf-8") as out:
        while written < target:
            chars = int(rng.integers(200, 8000))
            picks = rng.integers(0, len(lines), size=chars // 30 + 1)
            record = json.dumps({"text": "\n".join(lines[i] for i in picks)[:chars]}) + "\n"
            out.write(record)
            written += len(record.encode("utf-8"))
    return written


def run_cli(corpus: Path, tokenizer: Path, prefix: Path, workers: int, env: dict, shard_mib: float) -> dict:
    command = [sys.executable, "-m", "hyperp_megatron.data", "--input", str(corpus), "--tokenizer", str(tokenizer),
               "--output-prefix", str(prefix), "--workers", str(workers), "--shard-mib", str(shard_mib),
               "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    meta = json.loads(Path(f"{prefix}.meta.json").read_text())
    return {"seconds": round(seconds, 2), "tokens": meta["tokens"], "documents": meta["documents"],
            "bin_sha256": meta["bin_sha256"]}


def run_legacy(corpus: Path, tokenizer: Path, prefix: Path, env: dict) -> dict:
    code = ("import sys; from hyperp_megatron.data import preprocess; "
            "s = preprocess.preprocess_to_indexed_dataset([sys.argv[1]], sys.argv[2], sys.argv[3]); "
            "print(s.num_tokens, s.num_documents)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(corpus), str(tokenizer), str(prefix)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    tokens, documents = map(int, proc.stdout.split()[-2:])
    from hyperp_megatron.data.indexed import sha256_file

    return {"seconds": round(seconds, 2), "tokens": tokens, "documents": documents,
            "bin_sha256": sha256_file(f"{prefix}.bin")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100, help="generated corpus size in MB")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all settings (median reported)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shard-mib", type=float, default=8, help="input MiB per shard")
    parser.add_argument("--no-legacy", action="store_true", help="skip the previous single-process path")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "preprocess.json"))
    args = parser.parse_args()
    from hyperp_megatron.data.corpus import prepare_embedded_corpus

    tokenizer = prepare_embedded_corpus(REPO / "data").tokenizer_dir
    base_env = dict(os.environ, HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="preprocess_bench_") as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.jsonl"
        input_bytes = generate_corpus(corpus, args.mb)
        settings = [("workers=1", 1, {}), ("workers=1, TOKENIZERS_PARALLELISM=true", 1,
                                            {"TOKENIZERS_PARALLELISM": "true"})]
        settings += [(f"workers={n}", n, {}) for n in args.workers if n > 1]
        if not args.no_legacy:
            settings.append(("legacy preprocess_to_indexed_dataset (one process)", 0, {}))
        times: dict[str, list] = {name: [] for name, _, _ in settings}
        runs: dict[str, dict] = {}
        with LoadSampler() as load:
            for round_index in range(args.repeats):
                for index, (name, workers, extra_env) in enumerate(settings):
                    prefix = scratch / f"out{index}"
                    for suffix in (".bin", ".idx", ".meta.json"):
                        Path(f"{prefix}{suffix}").unlink(missing_ok=True)
                    env = {**base_env, "TOKENIZERS_PARALLELISM": "false", **extra_env}
                    if workers == 0:
                        result = run_legacy(corpus, tokenizer, prefix, {**base_env, **extra_env})
                    else:
                        result = run_cli(corpus, tokenizer, prefix, workers, env, args.shard_mib)
                    times[name].append(result.pop("seconds"))
                    runs[name] = {"setting": name, "workers": max(1, workers), **result}
                    print(json.dumps({"round": round_index, **runs[name], "seconds": times[name][-1]}), flush=True)
    runs = [{**runs[name], "seconds": statistics.median(times[name]), "seconds_all": times[name]}
            for name, _, _ in settings]
    baseline = runs[0]["seconds"]
    for run in runs:
        run["tokens_per_s"] = round(run["tokens"] / run["seconds"])
        run["input_mb_per_s"] = round(input_bytes / 1e6 / run["seconds"], 3)
        run["speedup_vs_workers_1"] = round(baseline / run["seconds"], 2)
    identical = len({run["bin_sha256"] for run in runs}) == 1
    result = {**provenance("python bench/preprocess_bench.py " + " ".join(sys.argv[1:])),
              "repeats": args.repeats,
              "corpus": {"input_bytes": input_bytes, "format": "jsonl, one file", "shard_mib": args.shard_mib,
                         "tokenizer": "embedded Shakespeare byte-level BPE, 8192 tokens"},
              "cpus_available": len(os.sched_getaffinity(0)), "outputs_identical": identical, "runs": runs,
              "load": load.summary()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("outputs_identical", "cpus_available", "load")}, indent=2))
    if not identical:
        sys.exit("outputs differ between settings")


if __name__ == "__main__":
    main()
