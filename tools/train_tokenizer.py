"""Train a deterministic byte-level BPE tokenizer and save it as a Hugging Face tokenizer directory.

Usage:
    python tools/train_tokenizer.py --input corpus/ more.jsonl --output-dir tokenizers/bpe8k
    python tools/train_tokenizer.py --input books/ --pattern '*.txt' --vocab-size 16384 --output-dir tok

The directory (tokenizer.json + tokenizer_config.json, EOD token <|endoftext|>) loads offline with
`transformers.AutoTokenizer.from_pretrained(dir)` and `hyperp_megatron.data.tokenizer.load_tokenizer(dir)`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hyperp_megatron.data import documents, tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text/JSONL files or directories")
    parser.add_argument("--output-dir", required=True, type=Path, help="tokenizer directory to write")
    parser.add_argument("--vocab-size", type=int, default=tokenizer.DEFAULT_VOCAB_SIZE)
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    parser.add_argument("--json-key", default="text", help="field holding the text in JSONL records")
    parser.add_argument("--pattern", nargs="+", default=list(documents.DEFAULT_INPUT_PATTERNS),
                        help="file patterns searched in input directories")
    parser.add_argument("--chars-per-document", type=int, default=documents.DEFAULT_CHARS_PER_DOCUMENT,
                        help="cut plain text into documents of about this many characters (0: whole files)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        files = documents.collect_input_files(args.input, args.pattern)
        texts = documents.iter_documents(files, args.json_key, args.chars_per_document)
        output = tokenizer.train_bpe_tokenizer(
            texts, args.output_dir, args.vocab_size, args.min_frequency, args.overwrite
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    loaded = tokenizer.load_tokenizer(output)
    print(f"wrote {output}: vocab {loaded.vocab_size}, eod id {loaded.eod}, "
          f"{len(files)} files, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
