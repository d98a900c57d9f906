"""Tokenize corpora into a Megatron indexed dataset: the same as the `hyperp-preprocess` console script.

Usage:
    python tools/preprocess_data.py --input books/ --tokenizer tokenizers/bpe8k --output-prefix data/books
    python tools/preprocess_data.py --input 'web/*.jsonl.gz' --text-key text --tokenizer tok --output-prefix data/web --workers 8

All options: hyperp-preprocess --help, and docs/data.md.
"""

from __future__ import annotations

from hyperp_megatron.data.__main__ import main

if __name__ == "__main__":
    main()
