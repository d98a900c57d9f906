"""hyperp-preprocess: tokenize corpora into a Megatron indexed dataset (<prefix>.bin/.idx + <prefix>.meta.json).

Usage:
    hyperp-preprocess --input web/ --tokenizer tok/ --output-prefix data/web --workers 16
    hyperp-preprocess --input 'cc/*.jsonl.zst' books.txt --text-key content --tokenizer tok --output-prefix data/mix
    hyperp-preprocess --input hf_saved_dataset/ --hf-split train --tokenizer tok --output-prefix data/hf

Inputs: files, globs and directories (searched recursively) of JSON lines (.jsonl/.json/.ndjson, also .gz and
.zst), Parquet (.parquet, the --text-key column), plain text (anything else: cut into documents at blank lines
after about --chars-per-document characters), and Hugging Face `save_to_disk` directories. Every document ends
with the tokenizer's EOD token (--no-append-eos to drop it) and may start with its BOS (--prepend-bos).
Bad records (not UTF-8, not JSON, no --text-key, empty, too long) are counted, skipped and reported with file and
line; --strict stops at the first. Shards are tokenized by --workers processes into <prefix>.shards/ and merged;
an interrupted run resumes where it stopped (finished shards are verified and kept). See docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from hyperp_megatron.data import documents


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from hyperp_megatron.data.shards import INPUT_PATTERNS

    parser = argparse.ArgumentParser(prog="hyperp-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    parser.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer directory (tokenizer.json)")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin, <prefix>.idx, <prefix>.meta.json")
    parser.add_argument("--text-key", "--json-key", dest="text_key", default="text",
                        help="JSON field / Parquet or dataset column holding the text")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="tokenizing processes (default: the CPUs available)")
    parser.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="end each document with the tokenizer's EOD token (default: on)")
    parser.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=False,
                        help="start each document with the tokenizer's bos_token (default: off)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument("--chars-per-document", type=int, default=documents.DEFAULT_CHARS_PER_DOCUMENT,
                        help="cut plain text into documents of about this many characters (0: whole files)")
    parser.add_argument("--shard-mib", type=float, default=256, help="input MiB per shard (unit of work and resume)")
    parser.add_argument("--max-record-mib", type=float, default=64,
                        help="skip records (lines, values) longer than this, read in bounded pieces")
    parser.add_argument("--hf-split", default=None, help="split of a saved Hugging Face DatasetDict")
    parser.add_argument("--pattern", nargs="+", default=list(INPUT_PATTERNS),
                        help="file patterns searched in input directories")
    parser.add_argument("--keep-shards", action="store_true", help="keep <prefix>.shards/ after the merge")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output made otherwise")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from hyperp_megatron.data.pipeline import PreprocessConfig, run_preprocess

    try:
        config = PreprocessConfig(
            inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix, text_key=args.text_key,
            workers=args.workers, append_eos=args.append_eos, prepend_bos=args.prepend_bos, strict=args.strict,
            chars_per_document=args.chars_per_document, shard_bytes=int(args.shard_mib * 2**20),
            max_record_bytes=int(args.max_record_mib * 2**20), hf_split=args.hf_split, patterns=args.pattern,
            keep_shards=args.keep_shards, overwrite=args.overwrite,
        )
        interval = 1.0 if sys.stderr.isatty() else 30.0
        summary = run_preprocess(config, None if args.no_progress else sys.stderr, interval)
    except ValueError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: run the same command again to resume ({args.output_prefix}.shards/ keeps the "
                 "finished shards)")
    if summary.up_to_date:
        print(f"{summary.output_prefix}.bin/.idx is up to date with these inputs and settings: nothing to do")
        return
    skipped = sum(summary.skipped.values())
    reasons = ", ".join(f"{reason} {count}" for reason, count in summary.skipped.items()) or "none"
    for example in summary.examples[:10]:
        print(f"skipped {example}", file=sys.stderr)
    rate = (summary.input_bytes / 2**20 / summary.seconds, summary.tokens / summary.seconds)
    print(f"wrote {summary.output_prefix}.bin/.idx (+ .meta.json): {summary.documents} documents, {summary.tokens} "
          f"tokens; skipped {skipped} records ({reasons}); {summary.shards} shards ({summary.reused_shards} "
          f"resumed), {summary.seconds:.1f} s, {rate[0]:.1f} MiB/s, {rate[1]:.0f} tokens/s")


if __name__ == "__main__":
    main()
