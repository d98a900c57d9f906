"""Tokenize text files / directories / JSONL into a Megatron indexed dataset (<prefix>.bin/.idx).

Usage:
    python tools/preprocess_data.py --input books/ --tokenizer tokenizers/bpe8k --output-prefix data/books
    python tools/preprocess_data.py --input web.jsonl --json-key text --tokenizer tok --output-prefix data/web

Each document ends with the tokenizer's EOD token. JSONL records (.jsonl/.json) are documents as
they are; plain-text files are cut at blank lines into documents of about --chars-per-document
characters, so that Megatron's train/valid/test split never gets zero documents. The files are
written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hyperp_megatron.data import documents, preprocess  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text/JSONL files or directories")
    parser.add_argument("--tokenizer", required=True, type=Path, help="local Hugging Face tokenizer directory")
    parser.add_argument("--output-prefix", required=True, type=Path, help="writes <prefix>.bin and <prefix>.idx")
    parser.add_argument("--json-key", default="text", help="field holding the text in JSONL records")
    parser.add_argument("--pattern", nargs="+", default=list(documents.DEFAULT_INPUT_PATTERNS),
                        help="file patterns searched in input directories")
    parser.add_argument("--chars-per-document", type=int, default=documents.DEFAULT_CHARS_PER_DOCUMENT,
                        help="cut plain text into documents of about this many characters (0: whole files)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        stats = preprocess.preprocess_to_indexed_dataset(
            args.input, args.tokenizer, args.output_prefix, args.json_key, args.chars_per_document, args.pattern
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {args.output_prefix}.bin/.idx: {stats.num_documents} documents, {stats.num_tokens} tokens, "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
