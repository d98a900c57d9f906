"""``hyperp-convert export|import|verify`` (or ``python -m hyperp_megatron.convert``): checkpoints to and from
Hugging Face.

    export --checkpoint RUN_DIR_OR_CKPT --output HF_DIR [--target auto|qwen3|llama|qwen3_next|hyperp]
           [--dtype fp32|bf16] [--tokenizer DIR] [--max-shard-gb 5] [--overwrite]
    import --hf HF_DIR --output RUN_DIR [--parameterization standard|hyperp|muon] [--seq-length N] [--overwrite]
    verify --checkpoint RUN_DIR_OR_CKPT --hf HF_DIR [--text TEXT] [--batch 2] [--seq-length N]
           [--attn eager|sdpa] [--json] [--trust-remote-code]

Runs on CPU in one process (GPUs are hidden). Bad input fails with one line, before any heavy work, and
leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperp-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="our checkpoint -> Hugging Face directory")
    export.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ or one step_* directory")
    export.add_argument("--output", required=True, help="HF directory to create")
    export.add_argument("--target", default="auto", help="auto (the most standard exact class), qwen3, llama, "
                        "qwen3_next or hyperp (custom code)")
    export.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    export.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the run's)")
    export.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, GiB")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    imp = commands.add_parser("import", help="Hugging Face directory -> run directory the trainer continues")
    imp.add_argument("--hf", required=True, help="HF directory (Qwen3, Llama, or an export of this project)")
    imp.add_argument("--output", required=True, help="run directory to create")
    imp.add_argument("--parameterization", default=None, choices=["standard", "hyperp", "muon"],
                     help="for checkpoints from elsewhere (default standard = the HF forward exactly)")
    imp.add_argument("--seq-length", type=int, default=None, help="training sequence length of the run")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ver = commands.add_parser("verify", help="logits parity of our checkpoint and an HF directory")
    ver.add_argument("--checkpoint", required=True)
    ver.add_argument("--hf", required=True)
    ver.add_argument("--text", default=None, help="text for the first sequence (default: a fixed passage)")
    ver.add_argument("--batch", type=int, default=2)
    ver.add_argument("--seq-length", type=int, default=None)
    ver.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    ver.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ver.add_argument("--trust-remote-code", action="store_true",
                     help="run the Python files an HF directory ships (auto_map); without it only this version's "
                     "own hyperp export may (recognised by its config block and the modeling file's hash)")
    return parser


def _run(args: argparse.Namespace) -> dict:
    if args.command == "export":
        from hyperp_megatron.convert.export import export

        if not args.max_shard_gb > 0:
            raise ValueError("--max-shard-gb must be > 0")
        return export(args.checkpoint, args.output, target=args.target, dtype=args.dtype, tokenizer=args.tokenizer,
                      max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
    if args.command == "import":
        from hyperp_megatron.convert.importer import import_hf

        return import_hf(args.hf, args.output, parameterization=args.parameterization, seq_length=args.seq_length,
                         overwrite=args.overwrite)
    from hyperp_megatron.convert.verify import DEFAULT_TEXT, verify

    if args.batch < 1:
        raise ValueError("--batch must be >= 1")
    return verify(args.checkpoint, args.hf, text=args.text or DEFAULT_TEXT, batch=args.batch,
                  seq_length=args.seq_length, attn_implementation=args.attn, trust_remote_code=args.trust_remote_code)


def _report(command: str, result: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(result, indent=1)
    if command == "verify":
        return (f"max relative logits error {result['max_rel_error']:.3g} | KL {result['kl']:.3g} | top-1 agreement "
                f"{100 * result['top1_agreement']:.2f}% over {result['tokens']} tokens ({result['architecture']}, "
                f"{result['hf_dtype']}, {result['attn_implementation']} attention)")
    if command == "export":
        return (f"exported step {result['step']} to {result['output']}: {result['architecture']} ({result['dtype']}, "
                f"{'exact' if result['exact'] else 'INEXACT'}), {result['num_shards']} shard(s), "
                f"{result['total_bytes'] / 2**20:.1f} MiB")
    data = "" if result["from_our_export"] else (f" and --data.prefixes of data tokenized with "
                                                  f"{result['output']}/tokenizer")
    return (f"imported {result['architecture']} ({result['parameterization']} parameterization) into "
            f"{result['output']}: train with --config {result['output']}/config.yaml{data}")


def _return_freed_memory() -> None:
    """Large tensors come from mmap and go back to the OS when freed. glibc otherwise raises its mmap
    threshold after the first free and serves same-sized tensors from the heap, where freed layers stay
    mapped: the peak RSS of an export then looked like two copies of the model instead of one."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (fixed from now on)
    except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _return_freed_memory()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the converter runs on CPU
    warnings.filterwarnings("ignore")
    try:
        result = _run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(_report(args.command, result, getattr(args, "json", False)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
