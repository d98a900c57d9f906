"""Our side of the conversion: a checkpoint of this project in ONE CPU process, as named pieces.

Any checkpoint (saved at any TP / PP / EP layout) loads into a TP=PP=EP=1 model through
``dist_checkpointing``'s resharding, so every parameter is one full tensor. The converter never looks
at optimizer state. Memory: one copy of the model.

A model is exchanged with the target adapters as *pieces*: unfused tensors with layout-free names,

    embed [V, C], final_norm [C], lm_head [V, C]                  (V: the unpadded vocabulary)
    layers.{i}.attn_norm, q [H*hd, C], k / v [G*hd, C], o [C, H*hd], q_norm / k_norm [hd] (QK-norm),
    gate [H, C] (gated attention), mlp_norm, then dense: mlp.gate / mlp.up [F, C], mlp.down [C, F]
    or MoE: router [E, C], experts.{j}.gate / .up / .down, shared.gate / .up / .down

with the values our forward uses (no multiplier folded in).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperp_megatron import checkpoint as ckpt
from hyperp_megatron.config import Config, load_config

LAYER_PREFIX = "decoder.layers.{}."
CPU = torch.device("cpu")
"""The converter's device, also on a machine with GPUs."""


# ----------------------------------------------------------------------------------------------
# Finding and describing a checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint directory from a checkpoint, a ``checkpoints/`` root or a run directory;
    ValueError (one line) for anything missing, partial or damaged."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint not found: {path}")
    if not (path / ckpt.STATE).is_file() and not (path / ckpt.MANIFEST).is_file():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        latest = root / ckpt.LATEST
        if latest.is_file():
            path = root / latest.read_text().strip()
        else:
            found = ckpt.complete_checkpoints(root)
            if not found:
                raise ValueError(f"no checkpoint in {root}: give a run directory, its checkpoints/ directory "
                                 "or one step_* checkpoint")
            path = found[0]
    problem = ckpt.verify(path) if path.is_dir() else "directory missing"
    if problem is not None:
        raise ValueError(f"checkpoint {path} is not usable ({problem}); give another step_* checkpoint")
    return path


@dataclass
class Source:
    """A checkpoint's run configuration and vocabulary."""

    path: Path
    cfg: Config
    """The run's config, with the layout reset to one process (TP = PP = EP = 1), fp32, local layers."""
    meta: dict
    """train_state.json."""
    vocab_size: int
    """The unpadded vocabulary: model.vocab_size, else the tokenizer's size the run trained with."""
    padded_vocab_size: int
    """Rows of the saved embedding / output layer (padded for the training layout)."""

    @property
    def step(self) -> int:
        return int(self.meta.get("train_state", {}).get("step", 0))


def single_process_config(run_config: dict) -> Config:
    """The run's config for this one process: layout, precision and layers reset."""
    cfg = load_config(None, {k: v for k, v in run_config.items() if k != "parallel"})
    cfg.train.precision = "fp32"
    cfg.train.fp8 = None
    cfg.model.transformer_impl = "local"
    cfg.model.moe.grouped_gemm = "false"
    return cfg


def describe(path: str | Path) -> Source:
    """Read a checkpoint's config and shapes (no tensor data)."""
    path = resolve_checkpoint(path)
    from megatron.core import dist_checkpointing  # ~10 s import: after the cheap checks

    meta = json.loads((path / ckpt.STATE).read_text())
    if "config" not in meta:
        raise ValueError(f"{path / ckpt.STATE} has no run config: not a checkpoint of this trainer")
    cfg = single_process_config(meta["config"])
    saved = dist_checkpointing.load_tensors_metadata(str(path)).get("embedding.word_embeddings.weight")
    if saved is None:
        raise ValueError(f"checkpoint {path} has no embedding.word_embeddings.weight: not a GPT checkpoint")
    vocab = cfg.model.vocab_size or meta.get("derived", {}).get("shape", {}).get("vocab_size")
    if vocab is None:
        raise ValueError(f"checkpoint {path} records no vocabulary size (model.vocab_size or derived)")
    padded = saved.global_shape[0]
    if not vocab <= padded:
        raise ValueError(f"checkpoint {path}: vocabulary {vocab} is larger than the saved embedding ({padded} rows)")
    return Source(path, cfg, meta, int(vocab), int(padded))


# ----------------------------------------------------------------------------------------------
# One process holding the model


@contextlib.contextmanager
def single_process_world(seed: int = 0):
    """torch.distributed (gloo, world size 1) and Megatron's parallel state at TP = PP = EP = 1 on the CPU; reuses
    both when the caller already set them up (tests), tears down only what it started."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hyperp_megatron.config import ParallelConfig
    from hyperp_megatron.parallel import init_model_parallel

    started, store_dir = False, None
    if not dist.is_initialized():
        store_dir = tempfile.mkdtemp(prefix="hyperp-convert-")
        dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=0, world_size=1)
        started = True
    elif dist.get_world_size() != 1:
        raise RuntimeError("the converter runs in one process; torch.distributed has a larger world here")
    owns_state = not parallel_state.model_parallel_is_initialized()
    try:
        pg_collection = init_model_parallel(ParallelConfig(), seed, device=CPU)  # applies the CPU patches
        if pg_collection.tp.size() != 1 or pg_collection.pp.size() != 1 or pg_collection.ep.size() != 1:
            raise RuntimeError("Megatron's parallel state is initialized with a parallel layout in this process")
        yield pg_collection
    finally:
        if owns_state:
            parallel_state.destroy_model_parallel()
        if started:
            dist.destroy_process_group()
            shutil.rmtree(store_dir, ignore_errors=True)


def build(cfg: Config, pg_collection, padded_vocab_size: int) -> torch.nn.Module:
    """Our GPTModel in this process (fp32, CPU)."""
    from hyperp_megatron.model.gpt import build_model

    (model,) = build_model(cfg, pg_collection, padded_vocab_size, device=CPU)
    return model.eval()


def load(source: Source, pg_collection) -> torch.nn.Module:
    """The checkpoint's weights in a one-process model (no optimizer state)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    model = build(source.cfg, pg_collection, source.padded_vocab_size)
    try:
        load_weights(source.path, model)
    except (CheckpointingException, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {source.path} does not match its own config ({first[:300]})") from None
    return model


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """``dist_checkpointing.load`` in place into the model's parameters.

    Megatron's sharded state dict describes SwiGLU fc1 by a factory that loads the gate and up halves and
    concatenates them into a new tensor (about half a dense model of temporaries). Built here instead,
    its shards are ``chunk`` views of the parameter, so every weight is read in place: one copy in memory.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, apply_factories

    sharded = model.sharded_state_dict()
    factories = {key for key, value in sharded.items() if isinstance(value, ShardedTensorFactory)}
    apply_factories(sharded)
    loaded = dist_checkpointing.load(sharded, str(path))
    # The other tensors were read into the parameters' own storage too; this copies each onto itself. (The
    # loaded dict also holds the checkpoint's common, non-model state: the trainer's optimizer settings.)
    tensors = {key: loaded[key] for key in sharded if key not in factories}
    incompatible = model.load_state_dict(tensors, strict=False)
    assert not incompatible.unexpected_keys and set(incompatible.missing_keys) <= factories, incompatible


# ----------------------------------------------------------------------------------------------
# Megatron names <-> pieces


def split_qkv(weight: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Megatron's fused QKV rows ``[q heads of group g; k_g; v_g]`` per query group -> (q, k, v)."""
    per_group = heads // groups
    grouped = weight.view(groups, (per_group + 2) * head_dim, -1)
    q = grouped[:, : per_group * head_dim].reshape(heads * head_dim, -1)
    k = grouped[:, per_group * head_dim: (per_group + 1) * head_dim].reshape(groups * head_dim, -1)
    v = grouped[:, (per_group + 1) * head_dim:].reshape(groups * head_dim, -1)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Inverse of :func:`split_qkv`."""
    width = q.shape[-1]
    per_group = heads // groups
    return torch.cat([q.reshape(groups, per_group * head_dim, width), k.reshape(groups, head_dim, width),
                      v.reshape(groups, head_dim, width)], dim=1).reshape(-1, width)


def _glu_names(prefix: str, fc: str) -> dict[str, str]:
    return {f"{prefix}.gate": f"{fc}.linear_fc1.weight", f"{prefix}.up": f"{fc}.linear_fc1.weight",
            f"{prefix}.down": f"{fc}.linear_fc2.weight"}


def layer_piece_names(cfg: Config) -> list[str]:
    """The piece names of one layer (``layers.{i}.`` stripped) for this architecture."""
    m = cfg.model
    names = ["attn_norm", "q", "k", "v", "o"]
    names += ["q_norm", "k_norm"] if m.qk_norm else []
    names += ["gate"] if m.gated_attention else []
    names += ["mlp_norm"]
    if not m.moe.enabled:
        return names + ["mlp.gate", "mlp.up", "mlp.down"]
    names += ["router"]
    for j in range(m.moe.num_routed_experts):
        names += [f"experts.{j}.gate", f"experts.{j}.up", f"experts.{j}.down"]
    return names + (["shared.gate", "shared.up", "shared.down"] if m.moe.shared_expert else [])


def _fc_module(piece_prefix: str) -> str:
    if piece_prefix == "mlp":
        return "mlp"
    if piece_prefix == "shared":
        return "mlp.shared_experts"
    return f"mlp.experts.local_experts.{piece_prefix.split('.')[1]}"


def layer_pieces(params: Mapping[str, torch.Tensor], i: int, cfg: Config) -> dict[str, torch.Tensor]:
    """Layer ``i``'s pieces (views of ``params``, keyed without the ``layers.{i}.`` prefix)."""
    m = cfg.model
    p = LAYER_PREFIX.format(i)
    attn = p + "self_attention."
    out = {"attn_norm": params[p + "input_layernorm.weight"], "o": params[attn + "linear_proj.weight"],
           "mlp_norm": params[p + "pre_mlp_layernorm.weight"]}
    out["q"], out["k"], out["v"] = split_qkv(params[attn + "linear_qkv.weight"], m.num_attention_heads,
                                             m.num_query_groups, m.kv_channels)
    if m.qk_norm:
        out["q_norm"], out["k_norm"] = params[attn + "q_layernorm.weight"], params[attn + "k_layernorm.weight"]
    if m.gated_attention:
        out["gate"] = params[attn + "linear_gate.weight"]
    if m.moe.enabled:
        out["router"] = params[p + "mlp.router.weight"]
    for name in layer_piece_names(cfg):
        prefix, _, kind = name.rpartition(".")
        if kind in ("gate", "up", "down") and prefix:
            module = p + _fc_module(prefix)
            if kind == "down":
                out[name] = params[module + ".linear_fc2.weight"]
            else:  # SwiGLU fc1 = [gate; up]
                gate, up = params[module + ".linear_fc1.weight"].chunk(2, dim=0)
                out[name] = gate if kind == "gate" else up
    return out


def megatron_layer(pieces: Mapping[str, torch.Tensor], i: int, cfg: Config) -> dict[str, torch.Tensor]:
    """Inverse of :func:`layer_pieces`: Megatron parameter names (TP = 1) -> tensors."""
    m = cfg.model
    p = LAYER_PREFIX.format(i)
    attn = p + "self_attention."
    out = {p + "input_layernorm.weight": pieces["attn_norm"], attn + "linear_proj.weight": pieces["o"],
           p + "pre_mlp_layernorm.weight": pieces["mlp_norm"],
           attn + "linear_qkv.weight": merge_qkv(pieces["q"], pieces["k"], pieces["v"], m.num_attention_heads,
                                                 m.num_query_groups, m.kv_channels)}
    if m.qk_norm:
        out[attn + "q_layernorm.weight"], out[attn + "k_layernorm.weight"] = pieces["q_norm"], pieces["k_norm"]
    if m.gated_attention:
        out[attn + "linear_gate.weight"] = pieces["gate"]
    if m.moe.enabled:
        out[p + "mlp.router.weight"] = pieces["router"]
    prefixes = {name.rpartition(".")[0] for name in layer_piece_names(cfg) if name.endswith(".down")}
    for prefix in prefixes:
        module = p + _fc_module(prefix)
        out[module + ".linear_fc1.weight"] = torch.cat([pieces[prefix + ".gate"], pieces[prefix + ".up"]], dim=0)
        out[module + ".linear_fc2.weight"] = pieces[prefix + ".down"]
    return out


def top_pieces(params: Mapping[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output layer, the vocabulary padding trimmed."""
    return {"embed": params["embedding.word_embeddings.weight"][:vocab_size],
            "final_norm": params["decoder.final_layernorm.weight"],
            "lm_head": params["output_layer.weight"][:vocab_size]}


def iter_pieces(model: torch.nn.Module, cfg: Config, vocab_size: int,
                release: bool = False) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``("top", pieces)`` then ``(f"layers.{i}", pieces)`` per layer. With ``release`` each layer's
    parameters are freed once its pieces were consumed, so an export holds one copy of the model."""
    owned = dict(model.named_parameters())
    params = {name: param.detach() for name, param in owned.items()}
    yield "top", top_pieces(params, vocab_size)
    for i in range(cfg.model.num_layers):
        yield f"layers.{i}", layer_pieces(params, i, cfg)
        if release:  # the storage goes once the consumer dropped its views too
            for name in [n for n in params if n.startswith(LAYER_PREFIX.format(i))]:
                del params[name]
                owned[name].data = torch.empty(0)


@torch.no_grad()
def assign(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy Megatron-named full tensors into the one-process model (shapes must match exactly)."""
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        param = params[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"shape mismatch for {name}: got {tuple(value.shape)}, the model has {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))


def assign_top(model: torch.nn.Module, pieces: Mapping[str, torch.Tensor]) -> None:
    """Embedding / final norm / output layer; rows past the vocabulary (padding) become zero."""
    params = dict(model.named_parameters())
    padded = {}
    for piece, name in (("embed", "embedding.word_embeddings.weight"), ("lm_head", "output_layer.weight")):
        value = pieces[piece]
        rows = params[name].shape[0]
        if value.shape[0] > rows or value.shape[1:] != params[name].shape[1:]:
            raise ValueError(f"{piece} has shape {tuple(value.shape)}; the model expects at most "
                             f"{tuple(params[name].shape)}")
        padded[name] = torch.cat([value.float(), value.new_zeros(rows - value.shape[0], value.shape[1]).float()])
    padded["decoder.final_layernorm.weight"] = pieces["final_norm"]
    assign(model, padded)


# ----------------------------------------------------------------------------------------------
# Forward


@torch.no_grad()
def logits(model: torch.nn.Module, tokens: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Our forward in this process: tokens [b, s] -> logits [b, s, V] (fp32, padding trimmed)."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    out = model(tokens, positions, None)
    return out[..., :vocab_size].float() if vocab_size else out.float()


@torch.no_grad()
def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Mean next-token cross entropy of ``tokens`` [b, s] (as the trainer's loss, every token counted)."""
    positions = torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1)
    losses = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])  # [b, s-1]
    return float(losses.float().mean())
