"""The HyperP transfer ladder of a config over depths: shape, N, tokens, steps, LR, FLOPs, memory.

Usage (``hyperp-plan``, the console script, is the same command)::

    python -m hyperp_megatron.plan --config configs/hyperp/dense_d8.yaml --depths 8,12,16,20,24
    python -m hyperp_megatron.plan --config configs/hyperp/dense_d24.yaml --tp 2 --dp 32 --format json
    python -m hyperp_megatron.plan --config configs/cpu_ladder/d2.yaml --depths 2,4,6,8 --tokens config
    python -m hyperp_megatron.plan --config configs/hyperp/dense_d24.yaml --tp 1 --gpu-memory 80

Every depth is the config's model family at that depth (``C/d``, ``heads/d``, ``ffn/C`` kept; see
:meth:`~hyperp_megatron.budget.ModelShape.at_depth`), trained for the default token budget
``T0 N(d)/N(d0)`` (``--tokens default``) or the config's ``train.steps`` (``--tokens config``), on the
config's parallel layout unless ``--tp/--pp/--dp/--ep`` say otherwise (``--dp`` defaults to 1).

Memory: each row's estimate (``mem_gib``, the most loaded pipeline stage) is checked against the GPU's memory
(``--gpu-memory GIB``; default: this machine's first GPU, none without one): ``fits`` is yes when it is at most
``hardware.MEMORY_HEADROOM`` of it, and for a row that does not fit the table is followed by the smallest
layout and the cheapest same-layout change that fit (``memory_fit``), as overrides to paste.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys

from hyperp_megatron import memory_fit
from hyperp_megatron.budget import ModelShape, attention_keeps_scores
from hyperp_megatron.config import Config, load_config
from hyperp_megatron.derived import derive, resolve_vocab_size, vocab_change_line

COLUMNS = ("depth", "width", "heads", "kv_heads", "head_dim", "ffn", "params", "params_total", "tokens",
           "steps", "batch_tokens", "lr", "min_lr", "output_std", "logit_capacity", "train_flops", "mem_gib", "fits", "tp", "pp", "dp", "ep",
           "phantoms")
"""``phantoms``: phantom experts per MoE layer that pad the routed experts to a multiple of ``ep`` (docs/moe.md)."""
FORMATS = ("table", "json", "csv")


def parse_depths(text: str) -> list[int]:
    """``'8,12,16'`` -> ``[8, 12, 16]``; ValueError on anything but positive integers."""
    try:
        depths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--depths must be comma-separated positive integers like 8,12,16, got {text!r}") from None
    if not depths or any(d < 1 for d in depths):
        raise ValueError(f"--depths must be comma-separated positive integers like 8,12,16, got {text!r}")
    return depths


def config_at_depth(cfg: Config, depth: int, *, tp: int, pp: int, ep: int) -> Config:
    """``cfg`` with the model scaled to ``depth`` within its family and the layout replaced."""
    shape = ModelShape.from_model_config(cfg.model, resolve_vocab_size(cfg, None)).at_depth(depth)
    model = dataclasses.replace(
        cfg.model, num_layers=depth, hidden_size=shape.width, num_attention_heads=shape.num_heads,
        head_dim=shape.head_dim, ffn_hidden_size=shape.ffn if cfg.model.ffn_hidden_size else None,
    )
    parallel = dataclasses.replace(cfg.parallel, tensor=tp, pipeline=pp, expert=ep,
                                   sequence_parallel=cfg.parallel.sequence_parallel and tp > 1)
    return dataclasses.replace(cfg, model=model, parallel=parallel)


def plan_rows(cfg: Config, depths: list[int] | None = None, *, tp: int | None = None, pp: int | None = None,
              dp: int = 1, ep: int | None = None, tokens: str = "default",
              gpu_memory_gib: float | None = None) -> list[dict]:
    """One row per depth (default: the config's own), every value from :func:`derived.derive` (whose layout
    check is the trainer's: a layout the trainer refuses fails here with its message and the depth).

    With ``gpu_memory_gib``: ``fits`` (bool) per row and, for a row that does not fit, ``proposals``: the
    smallest layout at the same DP and the cheapest same-layout change that fit (``memory_fit``), each
    ``{"overrides", "memory_gib", "world_size"}``. ``notes``: the vocabulary warning when there is one."""
    if tokens not in ("default", "config"):
        raise ValueError(f"tokens must be 'default' (T0 N(d)/N(d0)) or 'config' (train.steps), got {tokens!r}")
    tp, pp, ep = tp or cfg.parallel.tensor, pp or cfg.parallel.pipeline, ep or cfg.parallel.expert
    for name, size in (("tp", tp), ("pp", pp), ("dp", dp), ("ep", ep)):
        if size < 1:
            raise ValueError(f"--{name} must be >= 1, got {size}")
    rows = []
    for depth in depths or [cfg.model.num_layers]:
        try:
            run = derive(config_at_depth(cfg, depth, tp=tp, pp=pp, ep=ep), tp * pp * dp,
                         use_default_tokens=tokens == "default")
        except ValueError as exc:
            raise ValueError(f"depth {depth}: {exc}") from None
        s = run.shape
        row_cfg = config_at_depth(cfg, depth, tp=tp, pp=pp, ep=ep)
        extra = {"fits": None, "notes": list(filter(None, [vocab_change_line(run)]))}
        if gpu_memory_gib is not None:
            extra["fits"] = memory_fit.fits(run, gpu_memory_gib)
            if not extra["fits"]:
                extra["proposals"] = [dataclasses.asdict(p) for p in (
                    memory_fit.smallest_layout(row_cfg, gpu_memory_gib, data=dp),
                    memory_fit.less_activation_memory(row_cfg, gpu_memory_gib, tp * pp * dp)) if p is not None]
        rows.append(dict(
            depth=s.depth, width=s.width, heads=s.num_heads, kv_heads=s.num_kv_heads, head_dim=s.head_dim,
            ffn=s.ffn, params=run.num_params, params_total=run.num_params_total, tokens=run.tokens,
            steps=run.steps, batch_tokens=run.batch_tokens, lr=run.lr, min_lr=run.min_lr,
            output_std=run.output_init_std, logit_capacity=run.logit_capacity,
            train_flops=run.train_flops, mem_gib=run.memory.total, tp=tp, pp=pp, dp=dp, ep=ep, phantoms=run.phantom_experts, **extra,
        ))
    return rows


def _human(value: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{unit}"
    return f"{value:g}"


def _table(rows: list[dict]) -> str:
    formats = {"params": _human, "params_total": _human, "tokens": _human, "batch_tokens": _human,
               "lr": "{:.3e}".format, "min_lr": "{:.3e}".format, "output_std": "{:.3g}".format,
               "logit_capacity": "{:.3g}".format, "train_flops": "{:.3e}".format,
               "mem_gib": "{:.1f}".format, "fits": lambda fits: {None: "-", True: "yes", False: "NO"}[fits]}
    cells = [[formats.get(c, str)(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    notes = dict.fromkeys(note for row in rows for note in row.get("notes", []))
    lines += [f"# warning: {note}" for note in notes]
    for row in rows:
        if "proposals" in row:
            fixes = [f"{memory_fit.Proposal(**p).command_line()} ({p['memory_gib']:.1f} GiB on {p['world_size']} GPU{'s' if p['world_size'] > 1 else ''})"
                     for p in row["proposals"]]
            lines.append(f"# depth {row['depth']} does not fit ({row['mem_gib']:.1f} GiB): "
                         + (" | ".join(fixes) if fixes else "no layout up to TP * PP = 8 and no recompute setting fits"))
    return "\n".join(lines)


def render(rows: list[dict], fmt: str = "table") -> str:
    """Rows as an aligned table, a JSON list of objects, or CSV with a header."""
    if fmt == "table":
        return _table(rows)
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _gpu_memory(given: float | None) -> tuple[float | None, str]:
    """(GiB, where it came from): ``--gpu-memory``, else this machine's first GPU, else (None, '')."""
    if given is not None:
        if given <= 0:
            raise ValueError(f"--gpu-memory must be a positive number of GiB, got {given:g}")
        return given, "--gpu-memory"
    from hyperp_megatron.parallel import visible_gpus

    gpus = visible_gpus()
    return (gpus[0].memory_gib, gpus[0].name) if gpus else (None, "")


def main(argv: list[str] | None = None) -> int:
    """``hyperp-plan`` (the console script), ``python -m hyperp_megatron.plan``; exit status 2 on bad input."""
    parser = argparse.ArgumentParser(prog="hyperp-plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (configs/...)")
    parser.add_argument("--depths", default=None, help="comma-separated depths (default: the config's)")
    parser.add_argument("--format", default="table", help="table | json | csv")
    parser.add_argument("--tokens", default="default", help="default (T0 N(d)/N(d0)) | config (train.steps)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: config)")
    parser.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (default: config)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (default 1)")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: config)")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="GPU memory in GiB to check each row against (default: this machine's first GPU)")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
        cfg = load_config(args.config, overrides)
        depths = parse_depths(args.depths) if args.depths is not None else None
        gpu_memory, gpu_name = _gpu_memory(args.gpu_memory)
        rows = plan_rows(cfg, depths, tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep, tokens=args.tokens,
                         gpu_memory_gib=gpu_memory)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.format == "table":
        h = cfg.hyperp
        print(f"# {args.config}: optim {cfg.optim.name}, hyperp {'on' if h.enabled else 'off'} "
              f"(eta0 {h.base_lr:g}, d0 {h.base_depth}, B0 {h.base_batch_tokens:g}, T0 {h.base_tokens:g}); "
              f"memory GiB/GPU, precision {cfg.train.precision}, attention {cfg.model.attention_backend}"
              f"{' (keeps s x s scores)' if attention_keeps_scores(cfg.model.attention_backend) else ''}; "
              + (f"fits: <= {memory_fit.usable_gib(gpu_memory):.1f} GiB ({memory_fit.MEMORY_HEADROOM:.0%} of "
                 f"{gpu_memory:g} GiB, {gpu_name})" if gpu_memory else "fits: no GPU memory given (--gpu-memory)"))
        if rows and rows[0]["phantoms"]:
            print(padding_note(cfg, rows[0]["ep"]))
    print(render(rows, args.format))
    return 0


def padding_note(cfg: Config, ep: int) -> str:
    """One comment line describing the phantom-expert padding of an MoE config at expert-parallel size ``ep``."""
    moe = cfg.model.moe
    padded, phantoms = moe.padded_experts(ep), moe.phantom_experts(ep)
    return (f"# MoE at EP {ep}: {moe.num_routed_experts} routed experts padded to {padded} with {phantoms} phantom "
            f"expert(s) per layer on the last EP rank(s) (zero weights, never routed, not trained, not checkpointed; "
            f"docs/moe.md); every EP rank holds {padded // ep} experts and mem_gib counts them")


if __name__ == "__main__":
    sys.exit(main())
